"""`sdtl compare` on the embedded benchmark, shortened: selection on validation, paired differences, reuse."""
from __future__ import annotations

import json

import pytest

import sdtl.studies.compare as cmp
from sdtl.cli import main
from sdtl.studies.stats import paired_difference

SHORT = ["optim.epochs=2", "eval.num_clips=1", "eval.val_clips=1", "eval.probe_videos=0", "run.threads=1"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from sdtl.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("small") / "data", preset="small", seed=0, pool_size=48)


def test_compare_selects_on_validation_and_pairs_with_plain(small_data, tmp_path, monkeypatch, capsys):
    table = {"plain": cmp.method_table()["plain"],
             "sd": cmp.Method("SD", ("regularizer.name=sd",), "regularizer.weight", ("0.3", "3"))}
    monkeypatch.setattr(cmp, "method_table", lambda: table)
    out = tmp_path / "cmp"
    summary = cmp.run_compare(out, methods=["sd"], seeds=2, data_dir=str(small_data), sets=SHORT)
    sd, plain = summary["methods"]["sd"], summary["methods"]["plain"]
    assert list(summary["methods"]) == ["plain", "sd"]  # plain is always the reference
    for tag, point in sd["points"].items():
        for seed, test in zip(point["seeds"], point["test"]):
            res = json.loads((out / "runs" / "sd" / tag / f"seed{seed}" / "results.json").read_text())
            assert res["video_acc1"] == test
            assert res["regularizer"]["weight"] == float(tag.split("=")[1])
    means = {t: sum(p["val"]) / len(p["val"]) for t, p in sd["points"].items()}
    assert sd["selected"] == max(means, key=lambda t: (means[t], -list(means).index(t)))
    chosen, ref = sd["points"][sd["selected"]], plain["points"]["default"]
    assert sd["vs_plain"]["mean"] == pytest.approx(paired_difference(chosen["test"], ref["test"])["mean"])
    md = (out / "compare.md").read_text()
    assert summary["num_classes"] == 5 and "acc@5" not in md.lower()  # with 5 classes acc@5 is always 100
    assert f"regularizer.weight={sd['selected'].split('=')[1]}" in md and (out / "compare.png").exists()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["methods"]["sd"]["selected"] == sd["selected"]

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/seed*/results.json")}
    assert len(stamps) == 6
    again = cmp.run_compare(out, methods=["sd"], seeds=2, data_dir=str(small_data), sets=SHORT)  # reuses every run
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["wall_time_s"]["invocations"] == 2
    assert again["wall_time_s"]["total"] >= summary["wall_time_s"]["total"]


def test_compare_bad_input(tmp_path, capsys):
    assert main(["-q", "compare", "--methods", "sd,magic", "--out", str(tmp_path / "c")]) == 2
    assert "magic" in capsys.readouterr().err and not (tmp_path / "c").exists()
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    assert main(["-q", "compare", "--out", str(foreign)]) == 2
    assert "not an sdtl compare folder" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
