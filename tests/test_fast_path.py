"""The fast GPU defaults, checked on CPU: option plumbing, teacher precision/format, loss-scaler state,
torch.compile, persistent workers that still draw each epoch's own clips."""
from __future__ import annotations


import pytest
import torch
import yaml

from sdtl.engine import build
from sdtl.engine import finetune as ft
from sdtl.engine import optim, runtime
from sdtl.engine.config import load_config
from sdtl.errors import UserError


def tiny(data, *extra):
    return load_config("synthetic_tiny", [f"data.root={data}", "optim.epochs=1", "eval.probe_videos=0", *extra])


def test_auto_options_resolve_to_fp32_contiguous_on_cpu_and_are_recorded(tiny_synth, tmp_path):
    ft.run_finetune(tiny(tiny_synth), tmp_path / "run")
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["optim"]["amp"] == "auto" and stored["run"]["channels_last"] == "auto"
    rt = stored["runtime"]
    assert rt["device"] == "cpu" and rt["amp"] == "off" and rt["channels_last"] is False
    assert rt["cudnn_benchmark"] is False and rt["fused_optimizer"] is False and rt["compile"] is False
    # the runtime line is informational: the stored config loads back as a config
    load_config(str(tmp_path / "run" / "config.yaml"))


def test_auto_on_cuda_picks_bf16_or_fp16_and_explicit_bf16_needs_support(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.amp_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.amp_dtype("auto", cuda) is torch.float16  # fp16, and then a GradScaler
    assert optim.make_scaler(torch.float16, torch.device("cpu")).is_enabled()
    with pytest.raises(UserError, match=r"optim.amp: bf16 is not supported by Old GPU.*optim.amp=fp16"):
        runtime.amp_dtype("bf16", cuda)
    assert runtime.amp_dtype("auto", torch.device("cpu")) is None


def test_channels_last_bf16_run_on_cpu_with_a_teacher_in_the_students_precision_and_format(tiny_synth, tmp_path):
    cfg = tiny(tiny_synth, "run.channels_last=on", "optim.amp=bf16", "optim.fused=on")
    ft.run_finetune(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    weight = state["model"]["encoder.conv1.spatial_conv.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    rt = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["runtime"]
    assert rt["amp"] == "bf16" and rt["channels_last"] is True and rt["fused_optimizer"] is True

    from sdtl.models import build_model
    from sdtl.regularizers import SelfDistillation

    model = build_model("r2plus1d_vcop", 5, width=0.0625)
    assert runtime.prepare_model(model, cfg, torch.device("cpu"))
    sd = SelfDistillation(model.encoder, weight=1.0)
    sd.epoch_start()
    for name, p in sd.teacher.named_parameters():
        student = dict(model.encoder.named_parameters())[name]
        assert p.dtype == student.dtype and p.stride() == student.stride(), name
    clips = runtime.to_memory_format(torch.randn(2, 3, 8, 16, 16), True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = sd.prepare(clips)
        _, features = model.forward_features(clips)
    assert target.dtype == features.dtype


def test_fp16_loss_scaler_state_is_checkpointed_and_restored(tiny_synth, tmp_path):
    out = tmp_path / "run"
    ft.run_finetune(tiny(tiny_synth, "optim.amp=fp16", "run.deterministic=true", "optim.schedule=constant"), out)
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert saved and saved["scale"] > 0  # an enabled GradScaler's state, not the disabled {}
    seen = {}
    original = torch.amp.GradScaler.load_state_dict

    def spy(self, state):
        seen.update(state)
        return original(self, state)

    torch.amp.GradScaler.load_state_dict = spy
    try:
        ft.run_finetune(tiny(tiny_synth, "optim.amp=fp16", "run.deterministic=true", "optim.schedule=constant",
                             "optim.epochs=2"), out, resume="auto")
    finally:
        torch.amp.GradScaler.load_state_dict = original
    assert seen["scale"] == saved["scale"] and seen["_growth_tracker"] == saved["_growth_tracker"]


def test_compile_runs_on_cpu_and_a_failing_backend_names_the_option(tiny_synth, tmp_path):
    ft.run_finetune(tiny(tiny_synth, "run.compile=true", "run.compile_backend=eager"), tmp_path / "ok")
    assert (tmp_path / "ok" / "results.json").exists()
    with pytest.raises(UserError, match=r"run.compile.*no_such_backend.*run.compile=false"):
        ft.run_finetune(tiny(tiny_synth, "run.compile=true", "run.compile_backend=no_such_backend"), tmp_path / "bad")


def test_persistent_workers_draw_each_epochs_own_clips(tiny_synth):
    from sdtl.engine.distributed import DistInfo

    cfg = tiny(tiny_synth, "data.workers=2", "data.val_fraction=0")
    train, _, _, _ = build.build_datasets(cfg)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def epoch_batches(workers: int, epochs=(1, 2)):
        cfg.data.workers = workers
        sampler, loader = runtime.make_train_loader(train, cfg.data, info, seed=0)
        out = []
        for epoch in epochs:
            sampler.set_epoch(epoch)
            out.append([b["video"] for b in loader])
        return loader, out

    loader, persistent = epoch_batches(2)
    assert loader.persistent_workers
    _, fresh = epoch_batches(0)
    for e in range(2):  # same clips as the in-process loader, epoch by epoch
        assert all(torch.equal(a, b) for a, b in zip(persistent[e], fresh[e]))
    assert not all(torch.equal(a, b) for a, b in zip(persistent[0], persistent[1]))  # epochs differ


def test_resume_that_switches_loss_scaling_on_starts_a_fresh_scale(tiny_synth, tmp_path, caplog):
    # e.g. amp=auto saved on a bf16 card (or CPU), resumed on a card without bf16 (auto -> fp16)
    out = tmp_path / "run"
    ft.run_finetune(tiny(tiny_synth, "optim.amp=off"), out)
    ft.run_finetune(tiny(tiny_synth, "optim.amp=fp16", "optim.epochs=2"), out, resume="auto")
    assert "starting from a fresh scale" in caplog.text
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"] > 0
