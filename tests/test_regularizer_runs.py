"""Every regularizer and schedule through the real engine: exact resume, weight decay, LP-FT, sweep keys."""
from __future__ import annotations

import json

import pytest
import torch

from sdtl.engine import finetune as ft
from sdtl.engine.config import load_config

VARIANTS = {
    "sd_every_2_steps": ["regularizer.name=sd", "regularizer.snapshot_every=2"],
    "fixed_teacher": ["regularizer.name=fixed_teacher"],
    "ema_sd": ["regularizer.name=ema_sd", "regularizer.ema_decay=0.9"],
    "l2sp": ["regularizer.name=l2sp", "regularizer.weight=0.01"],
    "delta": ["regularizer.name=delta", "regularizer.weight=0.01", "regularizer.attention_samples=8"],
    "bss": ["regularizer.name=bss", "regularizer.weight=0.01"],
    "lp_ft_and_layer_decay": ["optim.lp_epochs=1", "optim.layer_decay=0.5"],
}


def cfg_for(data, encoder, epochs: int, *extra):
    # constant lr: a run stopped after epoch 2 and resumed to 3 then follows the same schedule as a
    # run of 3 epochs; deterministic kernels make the two comparable bit for bit
    return load_config("synthetic_tiny", [f"data.root={data}", f"model.pretrained={encoder}", "optim.schedule=constant",
                                          f"optim.epochs={epochs}", "run.deterministic=true", "run.threads=1",
                                          "eval.probe_videos=4", *extra])


def last_state(out):
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_resume_is_bit_exact_for_each_regularizer(name, tiny_synth, tiny_encoder, tmp_path):
    extra = VARIANTS[name]
    ft.run_finetune(cfg_for(tiny_synth, tiny_encoder, 3, *extra), tmp_path / "ref")
    ft.run_finetune(cfg_for(tiny_synth, tiny_encoder, 2, *extra), tmp_path / "cut")
    # the run stopped at an epoch boundary; resuming must restore the regularizer's state exactly
    # (a fixed or averaged teacher, L2-SP's anchor, DELTA's reference and attention)
    ft.run_finetune(cfg_for(tiny_synth, tiny_encoder, 3, *extra), tmp_path / "cut", resume="auto")
    ref, cut = last_state(tmp_path / "ref"), last_state(tmp_path / "cut")
    for key in ref["model"]:
        assert torch.equal(ref["model"][key], cut["model"][key]), f"{name}: {key} differs after resume"
    if ref["task_state"]["regularizer"] is not None:
        flat = lambda s: {k: v for k, v in _leaves(s)}  # noqa: E731
        a, b = flat(ref["task_state"]["regularizer"]), flat(cut["task_state"]["regularizer"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    histories = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ref", "cut")]
    part = [k for k in histories[0][1] if k.startswith("train_") and k not in ("train_loss", "train_ce")]
    for key in ["train_loss", *part]:
        assert [r.get(key) for r in histories[0]] == [r.get(key) for r in histories[1]], key


class _Crash(BaseException):
    """Stands for a kill: nothing in the engine catches it, nothing is written after it."""


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_crash_inside_an_epoch_resumes_bit_exact_for_each_regularizer(name, tiny_synth, tiny_encoder, tmp_path,
                                                                        monkeypatch):
    from sdtl.engine.loop import Loop

    extra = [*VARIANTS[name], "model.dropout=0.5"]
    ft.run_finetune(cfg_for(tiny_synth, tiny_encoder, 3, *extra), tmp_path / "ref")
    steps = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[1])["steps"]
    real_step, calls = Loop.train_step, []

    def crash_in_epoch_2(self, epoch, step, batch):  # at its third step, before it runs
        calls.append((epoch, step))
        if len(calls) == steps + 3:
            raise _Crash
        return real_step(self, epoch, step, batch)

    monkeypatch.setattr(Loop, "train_step", crash_in_epoch_2)
    cfg = cfg_for(tiny_synth, tiny_encoder, 3, *extra, "run.checkpoint_every_steps=1")
    with pytest.raises(_Crash):
        ft.run_finetune(cfg, tmp_path / "cut")
    monkeypatch.setattr(Loop, "train_step", real_step)
    crashed = last_state(tmp_path / "cut")
    assert (crashed["epoch"], crashed["step_in_epoch"]) == (1, 2), calls  # written after the last good step
    ft.run_finetune(cfg, tmp_path / "cut", resume="auto")
    ref, cut = last_state(tmp_path / "ref"), last_state(tmp_path / "cut")
    for key in ref["model"]:
        assert torch.equal(ref["model"][key], cut["model"][key]), f"{name}: {key} differs after a mid-epoch resume"
    histories = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ref", "cut")]
    keys = [k for k in histories[0][1] if k.startswith(("train_", "val_", "feat_", "param_", "epoch_drift"))]
    for key in keys:
        assert [r.get(key) for r in histories[0]] == [r.get(key) for r in histories[1]], key


def _leaves(state, prefix=""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(state, list):
        for i, v in enumerate(state):
            yield from _leaves(v, f"{prefix}[{i}]")


@pytest.mark.parametrize("name, decay", [("l2sp", 0.0), ("delta", 0.0), ("bss", 1e-4), ("sd", 1e-4)])
def test_weight_decay_is_off_only_where_the_penalty_replaces_it(name, decay, tiny_synth, tiny_encoder, tmp_path):
    extra = [f"regularizer.name={name}", "optim.weight_decay=0.0001", "regularizer.attention_samples=8"
             if name == "delta" else "regularizer.reduction=mean" if name == "sd" else "regularizer.weight=0.01"]
    ft.run_finetune(cfg_for(tiny_synth, tiny_encoder, 1, *extra), tmp_path / "run")
    groups = last_state(tmp_path / "run")["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {decay}


def test_linear_probe_epochs_leave_the_encoder_untouched(tiny_synth, tiny_encoder, tmp_path):
    cfg = cfg_for(tiny_synth, tiny_encoder, 2, "optim.lp_epochs=1", "optim.layer_decay=0.5")
    ft.run_finetune(cfg, tmp_path / "run")
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert history[1]["param_drift"] == 0.0 and history[1]["feat_drift"] == 0.0  # LP epoch: frozen, BN too
    assert "train_sd" not in history[1] and history[2]["param_drift"] > 0  # then everything trains, with SD
    names = [g["name"] for g in last_state(tmp_path / "run")["optimizer"]["param_groups"]]
    assert names == [f"encoder.stage{i}" for i in range(5)] + ["head"]
