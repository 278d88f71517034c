"""Guards for the engine's load-bearing arithmetic and plumbing, each against values worked out by hand.

Every test here was checked to FAIL with a realistic bug planted in the source (one at a time) and to
pass without it:

* model selection: ``best.pt`` / ``results.json`` pick the *best* validation epoch, not the worst;
* evaluation metrics: per-class accuracy is recall (row sums of the confusion), video scores average
  raw logits over clips, acc@5, clip accuracy, loss — hand-computed numbers;
* DDP: two gloo ranks end fine-tuning with identical weights (the model really is wrapped);
* self-distillation ``teacher_bn="eval"``: a re-snapshot copies BatchNorm running statistics too;
* linear CKA: centred (HSIC with H = I - 11ᵀ/n), against a numpy hand computation;
* learning-rate schedule: every epoch's lr for cosine / multistep / warm-up / LP-FT offset, through a
  real optimizer and scheduler stepped once per epoch as the engine does;
* ``sdtl sweep``: a diverging point is recorded as failed while the others run (in process and with
  ``--parallel 2``), and ``--extend`` really runs the added points.

The engine's modules are being reorganised; everything is imported lazily, through :func:`_import`
(which tries today's and yesterday's module paths), or driven through the ``sdtl`` CLI.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _import(name: str, *modules: str):
    """``name`` from the first of ``modules`` that defines it (module paths are moving)."""
    errors = []
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{mod}: {exc}")
    raise ImportError(f"{name} not found in any of {modules}: {errors}")


def _lr_api():
    mods = ("sdtl.engine.optim", "sdtl.engine.training", "sdtl.engine.schedule")
    return _import("lr_factor", *mods), _import("build_scheduler", *mods)


def sdtl_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "sdtl", "-q", *args]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# =================================================================== 1. model selection (best.pt)
def _first_argmax(values: list[float]) -> int:
    """Index of the first maximum: a later epoch must be *strictly* better to be selected."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


@pytest.mark.slow
def test_selected_checkpoint_is_the_best_validation_epoch(tiny_synth, tiny_encoder, tmp_path):
    from sdtl.engine.config import load_config
    from sdtl.engine.finetune import run_finetune

    select = "val_video_acc1"
    # Seeds tried in turn until the three validation accuracies all differ (without distinct values the
    # test could not tell best from worst). With seed 1 they are [16.7, 25.0, 8.3] %, the best in the
    # middle: "worst", "last" and "first" selection all pick another epoch; the other seeds are a fallback
    # for machines whose floating point gives other numbers. run.threads=1 makes the numbers reproducible
    # (and is much faster on a loaded 2-core machine).
    for seed in (1, 7, 5, 2):
        overrides = [f"data.root={tiny_synth}", f"model.pretrained={tiny_encoder}", "optim.epochs=3",
                     "optim.lr=0.05", f"run.seed={seed}", "run.threads=1", "eval.probe_videos=0",
                     "eval.num_clips=1", "run.tensorboard=false", f"eval.select={select}"]
        cfg = load_config("synthetic_tiny", overrides)
        assert cfg.eval.select == select
        out = tmp_path / f"seed{seed}"
        run_finetune(cfg, out)
        records = [r for r in read_jsonl(out / "metrics.jsonl") if r["epoch"] >= 1]
        assert [r["epoch"] for r in records] == [1, 2, 3]
        values = [r[select] for r in records]
        if len(set(values)) == len(values):
            break
    else:
        pytest.fail(f"precondition: no seed gave distinct validation values, the test cannot tell (last: {values})")
    expected = records[_first_argmax(values)]["epoch"]

    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    results = json.loads((out / "results.json").read_text())
    assert best["epoch"] == expected, f"best.pt is epoch {best['epoch']}, validation {values} -> epoch {expected}"
    assert results["selected"]["epoch"] == expected, (results["selected"], values)
    assert results["protocol"]["epoch"] == expected
    # the running best recorded with every epoch is the best so far
    for i, r in enumerate(records):
        if "best_epoch" in r:
            assert r["best_epoch"] == records[_first_argmax(values[: i + 1])]["epoch"], (i, values, r["best_epoch"])
    # the selected checkpoint holds the weights of that epoch, not the last epoch's
    last = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3
    if expected != 3:
        assert any(not torch.equal(best["model"][k], last["model"][k]) for k in last["model"]
                   if last["model"][k].is_floating_point())
    # the engine steps the cosine schedule once per epoch: lr = 0.05 * [1, (1 + 1e-3) / 2, 1e-3]
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.025025, 0.00005], rel=1e-9)


# ==================================================================== 2. evaluation metrics by hand
NUM_CLASSES = 6
# (video index, true label, its clips' raw logits). Two clips per video; class 5 has no video.
VIDEOS = [
    (0, 0, [[4.0, 1.0, 0.0, 0.5, 0.2, 0.3], [3.0, 2.0, 0.1, 0.4, 0.6, 0.7]]),
    (1, 0, [[2.0, 3.0, 0.1, 0.2, 0.3, 0.4], [5.0, 0.5, 0.1, 0.2, 0.3, 0.4]]),
    (2, 0, [[1.0, 2.0, 0.1, 0.2, 0.3, 0.4], [1.5, 1.0, 0.1, 0.2, 0.3, 0.4]]),
    # mean of raw logits -> class 1 (right); mean of softmax -> class 0; max logit -> class 0
    (3, 1, [[100.0, 0.0, 0.1, 0.2, 0.3, 0.4], [-100.0, 3.0, 0.1, 0.2, 0.3, 0.4]]),
    (4, 2, [[0.1, 0.2, 3.0, 0.3, 0.4, 0.5], [0.1, 0.2, 2.0, 0.3, 0.4, 0.5]]),
    (5, 2, [[3.0, 0.2, 1.0, 0.3, 0.4, 0.5], [2.0, 0.2, 2.5, 0.3, 0.4, 0.5]]),
    (6, 3, [[2.0, 1.0, 0.5, -1.0, 0.3, 0.4], [1.0, 0.5, 0.2, -2.0, 0.3, 0.4]]),  # true class last: top-5 miss
    (7, 4, [[0.1, 0.2, 0.3, 0.4, 2.0, 0.5], [0.1, 0.2, 0.3, 0.4, 1.0, 1.5]]),
]
# Worked out by hand from VIDEOS (rows: true class, columns: predicted class of the logit mean):
#   video sums -> predictions 0, 0, 1, 1, 2, 0, 0, 4 ; right: videos 0, 1, 3, 4, 7 -> 5/8
EXPECTED_CONFUSION = [
    [2, 1, 0, 0, 0, 0],
    [0, 1, 0, 0, 0, 0],
    [1, 0, 1, 0, 0, 0],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0],
]
# recall = diagonal / row sum: 2/3, 1/1, 1/2, 0/1, 1/1, no video (NaN). (Precision, diagonal / column sum,
# would be 2/4, 1/2, 1/1, -, 1/1: this confusion tells the two apart.)
EXPECTED_PER_CLASS = [200.0 / 3.0, 100.0, 50.0, 0.0, 100.0]
EXPECTED_MEAN_CLASS = (200.0 / 3.0 + 100.0 + 50.0 + 0.0 + 100.0) / 5  # 63.333..., classes with videos only
EXPECTED_VIDEO_ACC1 = 62.5  # 5 of 8
EXPECTED_VIDEO_ACC5 = 87.5  # 7 of 8: only video 6 (true class has the lowest mean logit) misses
EXPECTED_CLIP_ACC1 = 56.25  # 9 of 16: clips 0a 0b 1b 2b 3b 4a 4b 5b 7a
EXPECTED_CLIP_ACC5 = 81.25  # 13 of 16: clips 3a, 6a, 6b have the true class last


def _hand_cross_entropy(logits: list[float], label: int) -> float:
    top = max(logits)
    return top + math.log(sum(math.exp(v - top) for v in logits)) - logits[label]


def _batches(videos, per_batch: int) -> list[dict]:
    """Test-mode batches as the data pipeline collates them: each video's clips consecutive, with
    ``label`` and ``video_index`` repeated per clip. Here the "clip" is its logits (identity model)."""
    out = []
    for i in range(0, len(videos), per_batch):
        chunk = videos[i:i + per_batch]
        clips = [c for _, _, cs in chunk for c in cs]
        out.append({"video": torch.tensor(clips, dtype=torch.float32),
                    "label": torch.tensor([y for _, y, cs in chunk for _ in cs]),
                    "video_index": torch.tensor([v for v, _, cs in chunk for _ in cs]),
                    "clip_index": torch.tensor([k for _, _, cs in chunk for k in range(len(cs))]),
                    "failed": []})
    return out


@pytest.mark.parametrize("videos_per_batch, clips_per_forward", [(3, 16), (1, 1), (8, 5)])
def test_evaluate_metrics_against_hand_computed_values(videos_per_batch, clips_per_forward):
    evaluate = _import("evaluate", "sdtl.engine.evaluate")
    DistInfo = _import("DistInfo", "sdtl.engine.distributed")

    loader = _batches(VIDEOS, videos_per_batch)
    out = evaluate(nn.Identity(), loader, NUM_CLASSES, DistInfo(), clips_per_forward)
    m = out.metrics
    assert [list(map(int, row)) for row in out.confusion] == EXPECTED_CONFUSION
    per_class = list(m["per_class_acc"])
    assert len(per_class) == NUM_CLASSES and math.isnan(per_class[5])  # no video of class 5: undefined
    assert per_class[:5] == pytest.approx(EXPECTED_PER_CLASS, abs=1e-9), "per-class accuracy must be recall"
    assert m["mean_class_acc"] == pytest.approx(EXPECTED_MEAN_CLASS, abs=1e-9)
    assert m["video_acc1"] == pytest.approx(EXPECTED_VIDEO_ACC1, abs=1e-9)
    assert m["video_acc5"] == pytest.approx(EXPECTED_VIDEO_ACC5, abs=1e-9)
    assert m["clip_acc1"] == pytest.approx(EXPECTED_CLIP_ACC1, abs=1e-9)
    assert m["clip_acc5"] == pytest.approx(EXPECTED_CLIP_ACC5, abs=1e-9)
    hand_loss = sum(_hand_cross_entropy(c, y) for _, y, cs in VIDEOS for c in cs) / 16
    assert m["loss"] == pytest.approx(hand_loss, rel=1e-5)
    assert out.num_videos == 8 and out.num_clips == 16


def test_evaluate_restores_training_mode():
    evaluate = _import("evaluate", "sdtl.engine.evaluate")
    DistInfo = _import("DistInfo", "sdtl.engine.distributed")

    model = nn.Identity().train()
    evaluate(model, _batches(VIDEOS, 4), NUM_CLASSES, DistInfo())
    assert model.training


# ============================================================ 3. DDP: both ranks end with one model
_DDP_LAUNCHER = r'''
"""Run `sdtl finetune` (argv[2:]) under torchrun; save this rank's parameters after its last optimizer step."""
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

snap = {}


def after_step(optimizer, args, kwargs):
    snap["params"] = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    snap["steps"] = snap.get("steps", 0) + 1


register_optimizer_step_post_hook(after_step)
from sdtl.cli import main  # noqa: E402

rc = main(sys.argv[2:])
torch.save(snap, os.path.join(sys.argv[1], "rank%s.pt" % os.environ.get("RANK", "0")))
sys.exit(rc)
'''


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_weights(tiny_synth, tmp_path):
    from data_helpers import free_port

    out, snaps = tmp_path / "ddp", tmp_path / "snaps"
    snaps.mkdir()
    launcher = tmp_path / "launch.py"
    launcher.write_text(_DDP_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(launcher), str(snaps),
           "-q", "finetune", "--config", "synthetic_tiny", "--out", str(out), "--set", f"data.root={tiny_synth}",
           "--set", "data.batch_size=2", "--set", "run.threads=1", "--set", "optim.epochs=2",
           # epoch 1: LP-FT's head-only step (gradients averaged outside DDP); epoch 2: the DDP-wrapped model
           "--set", "optim.lp_epochs=1", "--set", "eval.probe_videos=0", "--set", "eval.num_clips=1",
           "--set", "run.tensorboard=false"]
    proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["epoch"] >= 1]
    assert [r["world_size"] for r in records] == [2, 2]

    r0 = torch.load(snaps / "rank0.pt", weights_only=True)
    r1 = torch.load(snaps / "rank1.pt", weights_only=True)
    steps = 2 * (24 // 2 // 2)  # 2 epochs x 24 videos sharded over 2 ranks, batch 2 per rank
    assert r0["steps"] == r1["steps"] == steps
    assert len(r0["params"]) == len(r1["params"]) > 0
    # rank 0's snapshot is what it saved: the hook saw the final weights
    saved = [v for v in torch.load(out / "checkpoints" / "last.pt", map_location="cpu",
                                   weights_only=True)["model"].values()]
    for p in r0["params"]:
        assert any(p.shape == v.shape and torch.equal(p, v) for v in saved)
    diffs = [float((a - b).abs().max()) for a, b in zip(r0["params"], r1["params"])]
    assert max(diffs) == 0.0, (f"ranks ended with different weights: {sum(d > 0 for d in diffs)} of {len(diffs)} "
                               f"parameter tensors differ, max |diff| {max(diffs):.3g}")


# ============================================== 4. self-distillation teacher_bn="eval": BN statistics
def _bn_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                         nn.Conv3d(4, 5, 3, padding=1), nn.BatchNorm3d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(5, 6))


def _clips(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _train_a_little(enc: nn.Module, seed: int) -> None:
    """Move both the weights and the BatchNorm running statistics, as an epoch of training does."""
    enc.train()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    for k in range(3):
        x = _clips(seed + k) * (2.0 + k) + 1.5  # shifted, scaled inputs: the running stats move far
        loss = enc(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _assert_teacher_is_student(sd, enc: nn.Module, when: str) -> None:
    teacher = sd.teacher
    t_bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    s_bns = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(t_bns) == len(s_bns) == 2
    for i, (t, s) in enumerate(zip(t_bns, s_bns)):
        for name in ("running_mean", "running_var"):
            assert getattr(t, name) is not None, f"{when}: teacher BN {i} has no {name} with teacher_bn='eval'"
            assert torch.equal(getattr(t, name), getattr(s, name)), f"{when}: teacher BN {i} {name} is stale"
    t_params = dict(teacher.named_parameters())
    for name, p in enc.named_parameters():
        assert torch.equal(t_params[name], p), f"{when}: teacher {name} differs from the student's"
    # the teacher computes the student's inference-mode function exactly
    x = _clips(99)
    enc.eval()
    with torch.no_grad():
        expected = enc(x)
    enc.train()
    got = sd.teacher_features(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), f"{when}: teacher output != student eval output"


def test_eval_bn_teacher_snapshot_refreshes_running_statistics():
    SelfDistillation = _import("SelfDistillation", "sdtl", "sdtl.regularizers.self_distillation",
                               "sdtl.regularizers")
    enc = _bn_encoder()
    _train_a_little(enc, seed=1)  # running stats away from their (0, 1) init before the first snapshot
    sd = SelfDistillation(enc, weight=1.0, teacher_bn="eval")
    sd.epoch_start()
    _assert_teacher_is_student(sd, enc, "first snapshot")
    for epoch in (2, 3):
        before = [m.running_mean.clone() for m in enc.modules() if isinstance(m, nn.BatchNorm3d)]
        _train_a_little(enc, seed=10 * epoch)
        after = [m.running_mean for m in enc.modules() if isinstance(m, nn.BatchNorm3d)]
        assert all(not torch.equal(a, b) for a, b in zip(after, before))  # the student's stats did move
        # ... so the teacher from the previous snapshot is now out of date in both weights and statistics
        assert not torch.equal(sd.teacher[1].running_mean, enc[1].running_mean)
        sd.epoch_start()
        _assert_teacher_is_student(sd, enc, f"snapshot at epoch {epoch}")
    # the teacher is still frozen and in eval mode after re-snapshots
    assert not sd.teacher.training and not any(p.requires_grad for p in sd.teacher.parameters())


# ====================================================================== 5. linear CKA, by hand
def _hand_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC formula: CKA = tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)), K = XXᵀ, L = YYᵀ, H = I - 11ᵀ/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = (lambda a, b: np.trace(a @ h @ b @ h))
    return float(hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_matches_the_centred_hsic_formula():
    linear_cka = _import("linear_cka", "sdtl.engine.diagnostics")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 7)) + rng.normal(size=(1, 7)) * 5 + 3.0  # far from zero mean
    y = x @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(20, 5)) - 4.0  # related, also off-centre
    z = rng.normal(size=(20, 5)) + 10.0  # unrelated

    tx, ty, tz = (torch.tensor(a, dtype=torch.float32) for a in (x, y, z))
    xf, yf, zf = (t.double().numpy() for t in (tx, ty, tz))  # the float32 values the function sees
    for a, b, ta, tb in ((xf, yf, tx, ty), (xf, zf, tx, tz), (yf, zf, ty, tz)):
        assert linear_cka(ta, tb) == pytest.approx(_hand_linear_cka(a, b), abs=1e-9)
    # the related pair is far more similar than the unrelated one (sanity of the hand formula itself)
    assert _hand_linear_cka(xf, yf) > 0.5 > _hand_linear_cka(xf, zf)
    assert linear_cka(tx, tx) == pytest.approx(1.0, abs=1e-12)
    # invariances (in float64, so rounding does not blur them): a constant offset on either side,
    # isotropic scaling, an orthogonal transform
    dx, dy = tx.double(), ty.double()
    ref = linear_cka(dx, dy)
    assert ref == pytest.approx(_hand_linear_cka(xf, yf), abs=1e-12)
    assert linear_cka(dx, dy + 100.0) == pytest.approx(ref, abs=1e-9)
    assert linear_cka(dx + torch.arange(7.0, dtype=torch.float64), dy) == pytest.approx(ref, abs=1e-9)
    assert linear_cka(dx, 3.0 * dy) == pytest.approx(ref, abs=1e-9)
    q = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    assert linear_cka(dx, dy @ q) == pytest.approx(ref, abs=1e-9)
    assert linear_cka(dx, dx + 5.0) == pytest.approx(1.0, abs=1e-9)


# ========================================================== 6. learning-rate schedule, epoch by epoch
LO = 0.01
# cos(pi/4) = 0.70710678: 0.01 + 0.99 * (1 + cos(pi t)) / 2 at t = 1/4, 1/2, 3/4 -> 0.855017856687, 0.505,
#                         0.154982143313
# cos(pi/3) = 0.5:          t = 1/3, 2/3 -> 0.01 + 0.99 * 0.75 = 0.7525, 0.01 + 0.99 * 0.25 = 0.2575
SCHEDULES = {
    # name: (optim overrides, factor of every 1-based epoch 1..epochs, written by hand)
    "cosine": ({"epochs": 5, "schedule": "cosine", "min_lr_ratio": LO},
               [1.0, 0.855017856687, 0.505, 0.154982143313, 0.01]),
    "cosine_warmup2": ({"epochs": 6, "schedule": "cosine", "min_lr_ratio": LO, "warmup_epochs": 2},
                       [1 / 3, 2 / 3, 1.0, 0.7525, 0.2575, 0.01]),
    # milestones are 1-based epoch numbers: after epoch 2 (from epoch 3 on) x0.1, after epoch 4 x0.01
    "multistep": ({"epochs": 6, "schedule": "multistep", "milestones": [2, 4], "gamma": 0.1},
                  [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]),
    "multistep_warmup1": ({"epochs": 5, "schedule": "multistep", "milestones": [3], "gamma": 0.5, "warmup_epochs": 1},
                          [0.5, 1.0, 1.0, 0.5, 0.5]),
    "constant_warmup3": ({"epochs": 5, "schedule": "constant", "warmup_epochs": 3},
                         [0.25, 0.5, 0.75, 1.0, 1.0]),
    # LP-FT: 2 head-only epochs at full lr, then warm-up 1 and cosine over epochs 4..6 (span 2)
    "lpft_cosine_warmup1": ({"epochs": 6, "schedule": "cosine", "min_lr_ratio": LO, "warmup_epochs": 1, "lp_epochs": 2},
                            [1.0, 1.0, 0.5, 1.0, 0.505, 0.01]),
    # LP-FT 1 epoch, then multistep whose milestone 2 counts fine-tuning epochs: x0.1 from epoch 4 on
    "lpft_multistep": ({"epochs": 5, "schedule": "multistep", "milestones": [2], "gamma": 0.1, "lp_epochs": 1},
                       [1.0, 1.0, 1.0, 0.1, 0.1]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lr_of_every_epoch_through_optimizer_and_scheduler(name):
    from sdtl.engine.config import OptimConfig

    lr_factor, build_scheduler = _lr_api()
    options, factors = SCHEDULES[name]
    cfg = OptimConfig(lr=0.2, head_lr_mult=10.0, **options)
    assert len(factors) == cfg.epochs
    assert [lr_factor(cfg, e) for e in range(cfg.epochs)] == pytest.approx(factors, abs=1e-8)

    enc_w, head_w = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [enc_w], "lr": cfg.lr}, {"params": [head_w], "lr": cfg.lr * 10}],
                                lr=cfg.lr, momentum=0.9)
    scheduler = build_scheduler(cfg, optimizer)
    seen = []
    for epoch in range(1, cfg.epochs + 1):  # as the engine: train the epoch at the current lr, then step
        for _ in range(3):  # the lr is constant within an epoch
            seen.append((epoch, [g["lr"] for g in optimizer.param_groups]))
            (enc_w.sum() + head_w.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
    for epoch, (enc_lr, head_lr) in seen:
        f = factors[epoch - 1]
        assert enc_lr == pytest.approx(0.2 * f, abs=1e-9), f"{name}: epoch {epoch} encoder lr"
        assert head_lr == pytest.approx(2.0 * f, abs=1e-9), f"{name}: epoch {epoch} head lr"

    assert scheduler.state_dict()["last_epoch"] == cfg.epochs

    # a run resumed after epoch k restores optimizer and scheduler and continues the same sequence
    def fresh():
        opt = torch.optim.SGD([{"params": [enc_w], "lr": cfg.lr}, {"params": [head_w], "lr": cfg.lr * 10}],
                              lr=cfg.lr, momentum=0.9)
        return opt, build_scheduler(cfg, opt)

    k = cfg.epochs // 2
    first_opt, first = fresh()
    for _ in range(k):
        first_opt.step()
        first.step()
    resumed_opt, resumed = fresh()
    resumed_opt.load_state_dict(first_opt.state_dict())
    resumed.load_state_dict(first.state_dict())
    for epoch in range(k + 1, cfg.epochs + 1):
        assert resumed_opt.param_groups[0]["lr"] == pytest.approx(0.2 * factors[epoch - 1], abs=1e-9), \
            f"{name}: epoch {epoch} after a resume at epoch {k}"
        resumed_opt.step()
        resumed.step()


# ============================================================================ 7. sdtl sweep
def _sweep(data, out, *args, timeout=600):
    cmd = sdtl_cmd("sweep", "--config", "synthetic_tiny", "--out", str(out), "--set", f"data.root={data}",
                   "--set", "optim.epochs=1", "--set", "eval.probe_videos=0", "--set", "run.threads=1",
                   "--set", "eval.num_clips=1", "--set", "run.tensorboard=false", *args)
    return subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=timeout)


def _finished(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())
            for p in sorted(out.glob("runs/*/seed*/results.json"))}


def _check_diverged_sweep(out: Path, bad: str, good: list[str]) -> None:
    finished = _finished(out)
    assert sorted(finished) == sorted(f"runs/optim.lr={v}/seed0" for v in good), sorted(finished)
    summary = json.loads((out / "sweep.json").read_text())
    rows = {r["point"]["optim.lr"]: r for r in summary["points"]}
    assert set(rows) == {bad, *good}
    assert rows[bad]["finished"] == 0 and len(rows[bad]["failed"]) == 1, rows[bad]
    assert not rows[bad]["best_on_val"]
    message = next(iter(rows[bad]["failed"].values()))
    assert "nan" in message.lower(), message  # "loss part 'ce' became nan ..." (in process or a child's exit)
    for v in good:
        assert rows[v]["finished"] == 1 and not rows[v]["failed"], rows[v]
    assert summary["best"] is not None and summary["best"]["optim.lr"] in good
    table = (out / "sweep.md").read_text()
    assert "failed" in table.lower() and f"optim.lr={bad}" in table


@pytest.mark.slow
def test_sweep_records_a_diverging_point_as_failed_and_runs_the_others(tiny_synth, tmp_path):
    out = tmp_path / "s"
    # the diverging point comes first: the points after it must still run
    proc = _sweep(tiny_synth, out, "--grid", "optim.lr=1e6,0.05", "--seeds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_diverged_sweep(out, "1e6", ["0.05"])


@pytest.mark.slow
def test_sweep_parallel_runs_every_point_and_records_a_failure(tiny_synth, tmp_path):
    out = tmp_path / "p"
    # 3 points on 2 slots: the third starts only when a slot frees (the diverging one fails first)
    proc = _sweep(tiny_synth, out, "--grid", "optim.lr=1e6,0.05,0.01", "--seeds", "1", "--parallel", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_diverged_sweep(out, "1e6", ["0.05", "0.01"])
    assert len(list((out / "logs").iterdir())) == 3


@pytest.mark.slow
def test_sweep_extend_runs_the_added_points_and_reuses_the_finished(tiny_synth, tmp_path):
    out = tmp_path / "s"
    proc = _sweep(tiny_synth, out, "--grid", "regularizer.weight=0", "--seeds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = out / "runs" / "regularizer.weight=0" / "seed0" / "results.json"
    stamp = first.stat().st_mtime_ns
    assert sorted(_finished(out)) == ["runs/regularizer.weight=0/seed0"]

    proc = _sweep(tiny_synth, out, "--grid", "regularizer.weight=0,1", "--seeds", "2")
    assert proc.returncode == 2 and "--extend" in proc.stderr  # another grid: refused without --extend
    assert sorted(_finished(out)) == ["runs/regularizer.weight=0/seed0"]

    proc = _sweep(tiny_synth, out, "--grid", "regularizer.weight=0,1", "--seeds", "2", "--extend")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_finished(out)) == [f"runs/regularizer.weight={w}/seed{s}" for w in (0, 1) for s in (0, 1)]
    assert first.stat().st_mtime_ns == stamp  # the finished run was reused, not re-run
    summary = json.loads((out / "sweep.json").read_text())
    assert [(r["point"]["regularizer.weight"], r["finished"], r["runs"]) for r in summary["points"]] == \
        [("0", 2, 2), ("1", 2, 2)]
    assert summary["identity"]["grid"] == {"regularizer.weight": ["0", "1"]} and summary["identity"]["seeds"] == 2
    cfg = (out / "runs" / "regularizer.weight=1" / "seed1" / "config.yaml").read_text()
    assert "weight: 1.0" in cfg and "seed: 1" in cfg
