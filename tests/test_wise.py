"""`sdtl wise`: WiSE-FT weight-space ensembles (interpolation, end to end, bad input)."""
from __future__ import annotations

import json
import math
from collections import Counter

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


# ----------------------------------------------------------------------------- decoding once
def _count_opens(monkeypatch) -> Counter:
    """Count every video the datasets open (one open = one decoding pass over all of an item's clips)."""
    from sdtl.data import datasets

    opened = Counter()
    real = datasets.open_video

    def counting(path, *args, **kwargs):
        opened[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "open_video", counting)
    return opened


def _record_logits(monkeypatch) -> list:
    """Every logits tensor ``evaluate`` computes, in order."""
    from sdtl.engine import evaluate as ev

    logits, real = [], ev.forward_clips

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        logits.append(out.clone())
        return out

    monkeypatch.setattr(ev, "forward_clips", recording)
    return logits


def _lists(b, overrides):
    """The run's validation and test video paths (as wise builds them)."""
    from sdtl.engine.build import build_datasets
    from sdtl.engine.evaluate import checkpoint_config

    cfg = checkpoint_config(torch.load(b, map_location="cpu", weights_only=True), overrides)
    _, val_ds, test_ds, _ = build_datasets(cfg)
    return [str(p) for p in val_ds.paths], [str(p) for p in test_ds.paths]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))  # NaN == NaN here


def test_wise_decodes_each_video_once_and_scores_each_alpha_as_its_own_pass(wise_runs, tmp_path, monkeypatch):
    """Three alphas open each validation and test video once (not three times), and alpha 0.5's logits
    and metrics equal, bit for bit, an evaluation of θ_0.5 that decodes the lists itself (today's way)."""
    from sdtl.engine import distributed as dist_utils
    from sdtl.engine.build import build_datasets
    from sdtl.engine.evaluate import checkpoint_config, evaluate, make_eval_loader
    from sdtl.models.checkpoints import build_model_from_checkpoint
    from sdtl.studies.wise import METRICS, load_theta0, run_wise

    b, _ = wise_runs
    overrides = ["eval.batch_size=4"]  # 2 clips per test video: 2 videos a batch, several batches per list
    val_paths, test_paths = _lists(b, overrides)
    assert len(val_paths) > 2 and len(test_paths) > 2 and not set(val_paths) & set(test_paths)

    opened, logits = _count_opens(monkeypatch), _record_logits(monkeypatch)
    rep = run_wise(b, tmp_path / "w", alphas=[0.0, 0.5, 1.0], overrides=overrides)
    assert dict(opened) == {p: 1 for p in val_paths + test_paths}  # once for the whole sweep, not per alpha
    assert len(logits) % 3 == 0
    per_alpha = len(logits) // 3
    wise_mid = logits[per_alpha:2 * per_alpha]  # alpha 0.5: its validation batches, then its test batches

    # alpha 0.5 the old way: a model of its own, loaders that decode again
    opened.clear()
    logits.clear()
    model, payload = build_model_from_checkpoint(b)
    cfg = checkpoint_config(payload, overrides)
    theta1 = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    theta0, _ = load_theta0(cfg.model.pretrained, model, payload)
    model.load_state_dict(interpolate(theta0, theta1, 0.5))
    info = dist_utils.setup(cfg.run.device)
    try:
        _, val_ds, test_ds, classes = build_datasets(cfg)
        outs = {part: evaluate(model, make_eval_loader(ds, 4, info, 0), len(classes), info, 4, None)
                for part, ds in (("val", val_ds), ("test", test_ds))}
    finally:
        dist_utils.teardown()
    assert dict(opened) == {p: 1 for p in val_paths + test_paths}
    assert len(logits) == per_alpha
    for got, want in zip(wise_mid, logits):
        assert torch.equal(got, want)  # the same clips, crops and normalisation: the same logits
    row = rep["results"][1]
    assert row["alpha"] == 0.5
    for part, out in outs.items():
        assert row[f"num_{part}_videos"] == out.num_videos
        for key in METRICS:
            assert _same(row[part][key], out.metrics[key]), (part, key, row[part][key], out.metrics[key])


def test_wise_decodes_per_alpha_what_does_not_fit_the_cache(wise_runs, tmp_path, monkeypatch, caplog, capsys):
    """--cache-gib bounds the kept clips: the validation part first, then the test list with what is
    left; a list that does not fit is decoded again for each alpha (logged), with the same results."""
    import logging

    from sdtl.engine.build import build_datasets
    from sdtl.engine.evaluate import checkpoint_config
    from sdtl.studies.wise import cache_budget, run_wise

    b, _ = wise_runs
    overrides = ["eval.num_clips=1"]
    val_paths, test_paths = _lists(b, overrides)
    cfg = checkpoint_config(torch.load(b, map_location="cpu", weights_only=True), overrides)
    _, val_ds, test_ds, _ = build_datasets(cfg)
    clip = 3 * cfg.data.clip_len * cfg.data.size ** 2 * 4
    val_bytes = len(val_ds) * cfg.eval.val_clips * clip
    test_bytes = len(test_ds) * cfg.eval.num_clips * cfg.eval.crops * clip
    assert cache_budget(1.0)[0] > 100 * (val_bytes + test_bytes)  # this machine's memory does not decide below
    either = (max(val_bytes, test_bytes) + clip) / 2 ** 30  # room for either list, not both: validation first

    opened = _count_opens(monkeypatch)
    reps = {}
    for name, gib, val_n, test_n in (("none", 0.0, 2, 2), ("val", either, 1, 2),
                                     ("all", 1.0, 1, 1)):
        opened.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sdtl.wise"):
            reps[name] = run_wise(b, tmp_path / name, alphas=[0.0, 1.0], overrides=overrides, cache_gib=gib)
        assert dict(opened) == {**{p: val_n for p in val_paths}, **{p: test_n for p in test_paths}}, name
        for part, n in (("val", val_n), ("test", test_n)):
            if n == 2:
                assert f"{part}: its decoded clips would take" in caplog.text, (name, caplog.text)
                assert "decoding it again for each of the 2 alphas" in caplog.text
            else:
                assert f"{part}: decoding once for all 2 alphas" in caplog.text, (name, caplog.text)
    assert reps["none"]["results"] == reps["val"]["results"] == reps["all"]["results"]

    # one alpha: nothing to keep, nothing logged about it
    opened.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdtl.wise"):
        run_wise(b, tmp_path / "one", alphas=[1.0], overrides=overrides)
    assert dict(opened) == {p: 1 for p in val_paths + test_paths}
    assert "decod" not in caplog.text

    for bad in ("-1", "nan", "inf"):
        assert main(["-q", "wise", "--finetuned", str(b), "--out", str(tmp_path / "bad"), "--cache-gib", bad]) == 2
        assert f"--cache-gib {bad}: must be a number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------ the run's own split
def test_wise_refuses_set_that_moves_the_validation_split(wise_runs, tmp_path, capsys):
    """data.val_fraction, run.seed and data.split choose the validation videos from the training list:
    a --set changing one would choose alpha on videos the run trained on, so it is refused (exit 2,
    one line naming the key and the run's value); the run's own values are accepted."""
    b, _ = wise_runs
    stored = torch.load(b, map_location="cpu", weights_only=True)["config"]
    fraction, seed, split = stored["data"]["val_fraction"], stored["run"]["seed"], stored["data"]["split"]
    out = tmp_path / "w"
    for key, value, ours in (("data.val_fraction", 0.4, fraction), ("run.seed", seed + 3, seed),
                             ("data.split", split + 1, split)):
        err = _fails(capsys, ["--finetuned", str(b), "--out", str(out), "--alphas", "1", "--set", "eval.num_clips=1",
                              "--set", f"{key}={value}"],
                     f"--set {key}={value}", f"with {key}={ours}", "videos the run trained on")
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
        assert not out.exists()  # refused before anything is written

    assert main(["-q", "wise", "--finetuned", str(b), "--out", str(out), "--alphas", "1", "--set", "eval.num_clips=1",
                 "--set", f"data.val_fraction={fraction}", "--set", f"run.seed={seed}"]) == 0
    rep = json.loads((out / "wise.json").read_text())
    assert f"data.val_fraction={fraction}" in rep["protocol"]["val"]["validation_part"]
