"""`sdtl wise`: WiSE-FT weight-space ensembles (interpolation, end to end, bad input)."""
from __future__ import annotations

import json

import pytest
import torch

from sdtl.cli import main
from sdtl.engine.config import load_config
from sdtl.errors import UserError
from sdtl.studies.wise import check_same_layout, interpolate, parse_alphas, select


@pytest.fixture(scope="module")
def wise_runs(tiny_synth, tiny_encoder, tmp_path_factory):
    """B: a one-epoch fine-tune from the tiny encoder; P: a plain (λ=0) run at a smaller lr, another θ₀."""
    from sdtl.engine.finetune import run_finetune

    root = tmp_path_factory.mktemp("wise")
    common = [f"data.root={tiny_synth}", f"model.pretrained={tiny_encoder}", "optim.epochs=1", "eval.probe_videos=0"]
    run_finetune(load_config("synthetic_tiny", common), root / "b")
    run_finetune(load_config("synthetic_tiny", [*common, "regularizer.weight=0", "optim.lr=0.005"]), root / "p")
    return root / "b" / "checkpoints" / "best.pt", root / "p" / "checkpoints" / "best.pt"


# --------------------------------------------------------------------------------- interpolation
def test_wise_interpolation_ends_are_exact_and_middle_is_the_mean():
    from sdtl.models import build_model

    torch.manual_seed(0)
    theta0 = build_model("r2plus1d_vcop", 6, width=0.0625).state_dict()
    torch.manual_seed(1)
    model1 = build_model("r2plus1d_vcop", 6, width=0.0625)
    model1.train()(torch.randn(2, 3, 8, 16, 16))  # moves BN running stats and num_batches_tracked
    theta1 = model1.state_dict()
    ints = [k for k, v in theta1.items() if not v.is_floating_point()]
    assert ints and all(not torch.equal(theta0[k], theta1[k]) for k in ints)
    assert any(not torch.equal(theta0[k], theta1[k]) for k in theta1 if "running_mean" in k)

    at0, at1, mid = (interpolate(theta0, theta1, a) for a in (0.0, 1.0, 0.5))
    for key in theta1:
        assert torch.equal(at1[key], theta1[key]), key
        if key in ints:  # integer buffers come from θ₁ at every alpha
            assert torch.equal(at0[key], theta1[key]) and torch.equal(mid[key], theta1[key]), key
        else:  # BN running stats included
            assert torch.equal(at0[key], theta0[key]), key
            assert torch.equal(mid[key], (theta0[key] + theta1[key]) / 2), key
    assert at1[next(iter(theta1))].data_ptr() != theta1[next(iter(theta1))].data_ptr()  # copies, not views

    check_same_layout(theta0, theta1, "--pretrained x")
    with pytest.raises(UserError, match="--pretrained x.*missing 1 key"):
        check_same_layout({k: v for k, v in theta0.items() if k != "head.weight"}, theta1, "--pretrained x")


def test_wise_alphas_and_selection_rule():
    assert parse_alphas("1, 0.5,0,0.5") == [0.0, 0.5, 1.0]
    for text, words in (("0,abc", ["--alphas 0,abc", "'abc' is not a number"]),
                        ("0,1.5", ["--alphas 0,1.5", "1.5 outside [0, 1]"]),
                        ("-0.1", ["-0.1 outside"]), ("nan", ["nan outside"]), ("", ["not a number"])):
        with pytest.raises(UserError) as err:
            parse_alphas(text)
        for word in words:
            assert word in str(err.value), (text, str(err.value))
    rows = [{"alpha": a, "val": {"video_acc1": v}} for a, v in ((0.0, 50.0), (0.3, 70.0), (0.6, 70.0), (1.0, 60.0))]
    assert select(rows) == 2  # a tie goes to the larger alpha
    rows[2]["val"]["video_acc1"] = float("nan")
    assert select(rows) == 1


# ------------------------------------------------------------------------------------ end to end
def test_wise_end_to_end(wise_runs, tiny_encoder, tmp_path, capsys, caplog):
    import logging

    from sdtl.engine.evaluate import evaluate_checkpoint

    b, p = wise_runs
    out = tmp_path / "w"
    one_clip = ["--set", "eval.num_clips=1"]  # fewer decodes; the protocol still comes from B's config
    with caplog.at_level(logging.INFO, logger="sdtl.wise"):
        assert main(["-q", "wise", "--finetuned", str(b), "--alphas", "1,0,0.5", "--out", str(out), *one_clip]) == 0
    # no --pretrained was given: the log names where θ₀ came from
    assert "from the fine-tuned run's model.pretrained" in caplog.text and "--pretrained" not in caplog.text
    printed = capsys.readouterr().out
    assert "<- selected" in printed and "val v@1" in printed
    for name in ("wise.json", "wise.md", "wise.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    rep = json.loads((out / "wise.json").read_text())
    assert rep["pretrained"] == str(tiny_encoder) and rep["pretrained_format"] == "sdtl-pretrain"  # B's model.pretrained
    assert "B's classification head" in rep["theta0"]
    assert rep["alphas"] == [0.0, 0.5, 1.0] and [r["alpha"] for r in rep["results"]] == [0.0, 0.5, 1.0]
    for r in rep["results"]:
        for part in ("val", "test"):
            for key in ("video_acc1", "clip_acc1", "mean_class_acc"):
                assert 0.0 <= r[part][key] <= 100.0
        assert r["num_val_videos"] > 0 and r["num_test_videos"] == 36
    assert rep["results"][0]["test"] != rep["results"][-1]["test"]  # θ₀ and θ₁ differ
    best_val = max(r["val"]["video_acc1"] for r in rep["results"])
    expected = max(r["alpha"] for r in rep["results"] if r["val"]["video_acc1"] == best_val)
    assert rep["selected"]["alpha"] == expected
    assert "largest alpha" in rep["selected"]["rule"]
    assert rep["protocol"]["test"]["views"] == 1 and rep["protocol"]["val"]["views"] == 1
    assert rep["protocol"]["test"]["crops"] == 1 and "test list" in rep["protocol"]["test"]["split"]
    md = (out / "wise.md").read_text()
    assert md.count("← selected") == 1 and f"| **{expected:g}** |" in md
    # A and B are defined before the description of θ₀ uses them
    assert "- B, the fine-tuned checkpoint (--finetuned), gives θ₁" in md
    assert "- A, the pre-trained checkpoint (the fine-tuned run's model.pretrained), gives θ₀" in md
    assert md.index("- A, the pre-trained") < md.index("B's classification head")
    assert rep["num_classes"] == 6 and rep["pretrained_from"] == "the fine-tuned run's model.pretrained"

    # α = 1 is B itself: the same test figures as `sdtl evaluate` of B with the same protocol
    ev = evaluate_checkpoint(b, tmp_path / "ev", ["eval.num_clips=1"])
    at1 = rep["results"][-1]["test"]
    for key in ("video_acc1", "clip_acc1", "mean_class_acc"):
        assert at1[key] == pytest.approx(ev[key], abs=1e-9), key

    # θ₀ = another fine-tune checkpoint: its whole model, so α = 0 is `sdtl evaluate` of it
    out2 = tmp_path / "w2"
    assert main(["-q", "wise", "--finetuned", str(b), "--pretrained", str(p), "--alphas", "0",
                 "--out", str(out2), *one_clip]) == 0
    rep2 = json.loads((out2 / "wise.json").read_text())
    assert rep2["pretrained_format"] == "sdtl-finetune" and "whole model" in rep2["theta0"]
    assert "- A, the pre-trained checkpoint (--pretrained), gives θ₀" in (out2 / "wise.md").read_text()
    ev0 = evaluate_checkpoint(p, tmp_path / "ev0", ["eval.num_clips=1"])
    assert rep2["results"][0]["test"]["clip_acc1"] == pytest.approx(ev0["clip_acc1"], abs=1e-9)
    assert rep2["results"][0]["test"]["video_acc1"] == pytest.approx(ev0["video_acc1"], abs=1e-9)
    assert rep2["protocol"]["test"]["views"] == 1


# -------------------------------------------------------------------------------------- bad input
def _fails(capsys, argv, *words):
    assert main(["-q", "wise", *argv]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    return err


def test_wise_bad_input_exits_2_naming_it(wise_runs, tiny_encoder, tmp_path, capsys):
    from sdtl.models import build_encoder
    from sdtl.models.checkpoints import export_encoder, save_checkpoint

    b, _ = wise_runs
    out = tmp_path / "w"
    base = ["--finetuned", str(b), "--out", str(out)]
    _fails(capsys, [*base, "--alphas", "0,abc"], "--alphas 0,abc", "'abc' is not a number")
    _fails(capsys, [*base, "--alphas", "0,1.5"], "--alphas 0,1.5", "1.5 outside [0, 1]")

    c3d = export_encoder(build_encoder("c3d", width=0.0625), tmp_path / "c3d.pt")
    _fails(capsys, [*base, "--pretrained", str(c3d), "--alphas", "0,1"], f"--pretrained {c3d}", "c3d")
    wide = export_encoder(build_encoder("r2plus1d_vcop", width=0.125), tmp_path / "wide.pt")
    _fails(capsys, [*base, "--pretrained", str(wide), "--alphas", "0,1"], f"--pretrained {wide}", "shape")
    _fails(capsys, [*base, "--pretrained", str(tmp_path / "nope.pt")], "--pretrained", "nope.pt",
           "no such checkpoint file")

    _fails(capsys, ["--finetuned", str(tiny_encoder), "--out", str(out)], f"--finetuned {tiny_encoder}",
           "not an sdtl fine-tune checkpoint")
    _fails(capsys, ["--finetuned", str(tmp_path / "missing.pt"), "--out", str(out)], "missing.pt",
           "no such checkpoint file")
    payload = torch.load(b, map_location="cpu", weights_only=True)
    payload["config"]["model"]["pretrained"] = None
    scratch = save_checkpoint(payload, tmp_path / "scratch.pt")
    _fails(capsys, ["--finetuned", str(scratch), "--out", str(out)], f"--finetuned {scratch}",
           "model.pretrained is null", "--pretrained")
    assert not out.exists()  # bad input leaves no folder behind

    out.mkdir()
    (out / "wise.json").write_text("{}")
    err = _fails(capsys, base, f"--out {out}", "already holds wise.json", "`sdtl wise`")
    assert "sweep" not in err  # it called its own report "a finished sweep"
    assert (out / "wise.json").read_text() == "{}"
    (out / "wise.json").unlink()
    (out / "notes.txt").write_text("mine")
    _fails(capsys, base, f"--out {out}", "not empty", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_wise_help_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom sdtl.cli import main\n"
            "for argv in (['--help'], ['wise', '--help'], ['wise', '--out', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'av', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "wise" in proc.stdout and "--finetuned" in proc.stderr  # listed; a missing flag is named
    assert proc.stdout.strip().splitlines()[-1] == "[]"
