"""`sdtl demo`: the orchestration on tiny plans (full-style and from the shipped encoder), reuse and
refusal of mismatched runs, the statistics it reports, and the shipped encoder's integrity check."""
from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

from sdtl.studies.demo import DemoPlan, run_demo
from sdtl.errors import UserError
from sdtl.studies.stats import describe_difference, mean_ci95, paired_difference, t_critical_95

TINY_FULL = DemoPlan(name="full", preset="tiny", seeds=2, pretrain=True, pool_videos=None,
                     pretrain_recipe="synthetic_tiny_pretrain", finetune_recipe="synthetic_tiny",
                     finetune_overrides=("optim.epochs=1",), sd_weight=1.0)
# The shipped encoder is width 1/8 at 16x32x32: the tiny recipe is run at that size.
TINY_QUICK = DemoPlan(name="quick", preset="tiny", seeds=1, pretrain=False, pool_videos=12,
                      pretrain_recipe="synthetic_pretrain", finetune_recipe="synthetic_tiny",
                      finetune_overrides=("optim.epochs=1", "model.width=0.125", "data.size=32", "data.clip_len=16"),
                      sd_weight=1.0)


def test_paired_difference_and_t_interval_by_hand():
    assert t_critical_95(2) == 4.303 and t_critical_95(1000) == 1.96 and math.isnan(t_critical_95(0))
    d = paired_difference([3.0, 5.0, 7.0], [1.0, 1.0, 1.0], seeds=[0, 1, 2])
    assert d["differences"] == [2.0, 4.0, 6.0] and d["mean"] == 4.0 and d["std"] == 2.0 and d["n"] == 3
    half = 4.303 * 2.0 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([4.0 - half, 4.0 + half])
    assert "not distinguishable" in describe_difference(d, "x")  # [-1.0, +9.0] holds 0
    assert "better" in describe_difference(paired_difference([3.0, 4.0, 5.0], [1.0, 1.0, 1.0]), "x")
    assert "worse" in describe_difference(paired_difference([-3.0, -2.0, -4.0], [0.0, 0.0, 0.0]), "x")
    assert math.isnan(mean_ci95([5.0])["ci95"][0])
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def full_demo(tiny_synth, tmp_path_factory):
    """One full-style demo on the tiny preset (2 seeds); tests that modify it work on a copy."""
    out = tmp_path_factory.mktemp("full") / "demo"
    return out, run_demo(out, data_dir=str(tiny_synth), plan=TINY_FULL)


@pytest.fixture(scope="module")
def quick_demo(tiny_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "demo"
    return out, run_demo(out, data_dir=str(tiny_synth), plan=TINY_QUICK)


def test_full_style_demo_on_tiny_plan_reports_effects_and_forgetting(full_demo, tiny_synth, caplog):
    out, summary = full_demo
    saved = json.loads((out / "summary.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["dataset"]["preset"] == "tiny" and saved["dataset"]["classes"] == 6
    for method in ("scratch", "plain", "sd"):
        m = saved["methods"][method]
        assert len(m["video_acc1"]["values"]) == 2
        assert m["video_acc1"]["mean"] == pytest.approx(sum(m["video_acc1"]["values"]) / 2)
        f = m["forgetting"]
        assert all(math.isfinite(v) for v in f["feat_drift"]["values"] + f["retention_acc"]["values"])
    # paired differences are per seed, in seed order
    sd, plain = saved["methods"]["sd"]["video_acc1"]["values"], saved["methods"]["plain"]["video_acc1"]["values"]
    comp = saved["comparisons"]["sd_vs_plain"]
    assert comp["differences"] == pytest.approx([a - b for a, b in zip(sd, plain)]) and comp["seeds"] == [0, 1]
    assert len(comp["ci95"]) == 2 and "plain_vs_scratch" in saved["comparisons"]
    # plain and sd start from the encoder pre-trained here, with its retention probe; scratch does not
    assert saved["encoder"]["source"] == "pre-trained here"
    assert "encoder.pt" in (out / "runs" / "plain_s0" / "config.yaml").read_text()
    assert "pretrained: null" in (out / "runs" / "scratch_s0" / "config.yaml").read_text()
    assert saved["methods"]["plain"]["forgetting"]["retention_acc_initial"]["values"][0] >= 0
    md = (out / "summary.md").read_text()
    assert "95% CI" in md and "λ=1" in md
    assert (out / "summary.png").is_file() and (out / "forgetting.png").is_file()
    # a second call reuses every finished run instead of training again, and says so
    before = (out / "runs" / "sd_s1" / "results.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="sdtl"):
        again = run_demo(out, data_dir=str(tiny_synth), plan=TINY_FULL)
    assert (out / "runs" / "sd_s1" / "results.json").stat().st_mtime_ns == before
    assert again["methods"]["sd"]["video_acc1"] == summary["methods"]["sd"]["video_acc1"]
    assert "demo: 6 runs: 6 finished earlier (reused as they are: scratch_s0, plain_s0" in caplog.text
    assert "reusing the encoder pre-trained by an earlier invocation" in caplog.text
    # ... and keeps the measured wall time (it said "total 0.0 min" after a re-run)
    first, second = summary["wall_time_s"], again["wall_time_s"]
    assert first["invocations"] == 1 and second["invocations"] == 2 and again["reused_runs"] == 6
    for key in ("total_s", "data_s", "encoder_s", "finetune_s"):
        assert second[key] >= first[key] > 0, key
    assert f"Wall time: total {second['total_s'] / 60:.1f} min" in (out / "summary.md").read_text()
    assert "summed over the 2 invocations" in (out / "summary.md").read_text()
    assert json.loads((out / "demo.json").read_text())["wall_time_s"] == second
    # fewer seeds than the folder's summary are refused; nothing is touched
    summary_md = (out / "summary.md").read_bytes()
    with pytest.raises(UserError, match=r"--seeds 1: .*2-seed demo summary"):
        run_demo(out, data_dir=str(tiny_synth), plan=TINY_FULL, seeds=1)
    assert (out / "summary.md").read_bytes() == summary_md
    # another plan on the same folder is refused, and nothing is touched
    other = DemoPlan(**{**TINY_FULL.__dict__, "finetune_overrides": ("optim.epochs=2",)})
    with pytest.raises(UserError, match="other settings"):
        run_demo(out, data_dir=str(tiny_synth), plan=other)
    assert (out / "runs" / "sd_s1" / "results.json").stat().st_mtime_ns == before
    assert json.loads((out / "demo.json").read_text())["identity"]["finetune_overrides"] == ["optim.epochs=1"]


def test_a_run_folder_with_another_config_is_never_reused(full_demo, tiny_synth):
    out = full_demo[0]
    cfg = out / "runs" / "scratch_s0" / "config.yaml"
    original = cfg.read_text()
    results = out / "runs" / "scratch_s0" / "results.json"
    before = results.read_bytes()
    cfg.write_text(original.replace("epochs: 1", "epochs: 7"))
    try:
        with pytest.raises(UserError, match=r"scratch_s0.*optim.epochs: 7 -> 1"):
            run_demo(out, data_dir=str(tiny_synth), plan=TINY_FULL)
        assert results.read_bytes() == before
    finally:
        cfg.write_text(original)


def test_quick_style_demo_starts_from_the_shipped_encoder(quick_demo):
    from sdtl.assets import demo_encoder_info, sha256_file

    out, saved = quick_demo
    enc = saved["encoder"]
    assert enc["source"] == "shipped" and enc["sha256"] == demo_encoder_info()["sha256"]
    assert sha256_file(out / "pretrained" / "encoder.pt") == enc["sha256"]
    assert str(out / "pretrained" / "encoder.pt") in (out / "runs" / "sd_s0" / "config.yaml").read_text()
    # the frozen pretext head scores the shipped encoder's pretext skill at the start of fine-tuning
    assert saved["methods"]["plain"]["forgetting"]["retention_acc_initial"]["values"][0] >= 60.0
    assert saved["methods"]["scratch"]["forgetting"]["retention_acc_initial"]["values"][0] <= 50.0


def test_quick_and_full_do_not_share_an_output_folder(quick_demo, tiny_synth):
    out = quick_demo[0]
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match="plan 'quick'"):
        run_demo(out, data_dir=str(tiny_synth), plan=TINY_FULL)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing


def test_default_outputs_differ_by_mode():
    from sdtl.studies.demo import DEFAULT_OUT

    assert len(set(DEFAULT_OUT.values())) == len(DEFAULT_OUT)


def test_corrupt_shipped_encoder_is_refused_with_the_regeneration_command(tmp_path):
    from sdtl.assets import demo_encoder

    bad = tmp_path / "demo_encoder.pt"
    shutil.copyfile(demo_encoder(), bad)
    with open(bad, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match=r"corrupt.*sdtl pretrain --config synthetic_pretrain"):
        demo_encoder(bad)
    with pytest.raises(UserError, match="missing"):
        demo_encoder(tmp_path / "absent.pt")


def test_force_adds_to_a_foreign_folder_but_never_writes_over_its_files(tmp_path, capsys):
    from sdtl.cli import main
    from sdtl.studies.demo import QUICK, claim

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert claim(out, QUICK, force=True) is None  # unrelated files: --force may add the demo's
    (out / "summary.md").write_text("my own summary")
    assert main(["-q", "demo", "--quick", "--force", "--out", str(out)]) == 2
    assert "summary.md" in capsys.readouterr().err
    assert (out / "summary.md").read_text() == "my own summary"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "summary.md"]
