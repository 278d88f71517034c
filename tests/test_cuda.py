"""The CUDA path on a real GPU (skipped without one; benchmarks/device_check.sh runs these)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from sdtl.engine import finetune as ft
from sdtl.engine.config import load_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")]


def tiny(data, *extra):
    return load_config("synthetic_tiny", [f"data.root={data}", "run.device=cuda", "optim.epochs=2", *extra])


@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16"])
def test_fast_defaults_on_cuda(amp, tiny_synth, tmp_path):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this card has no bf16")
    ft.run_finetune(tiny(tiny_synth, f"optim.amp={amp}"), tmp_path / "run")
    rt = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["runtime"]
    expected = {"auto": "bf16" if torch.cuda.is_bf16_supported() else "fp16"}.get(amp, amp)
    assert rt["amp"] == expected and rt["grad_scaler"] == (expected == "fp16")
    assert rt["channels_last"] and rt["fused_optimizer"] and rt["cudnn_benchmark"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert bool(state["scaler"]) == (expected == "fp16")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["video_acc1"] <= 100


def test_teacher_matches_student_precision_and_format_on_cuda():
    from sdtl.engine.runtime import prepare_model, to_memory_format
    from sdtl.models import build_model
    from sdtl.regularizers import SelfDistillation

    cfg = load_config("synthetic_tiny", ["run.device=cuda"])
    model = build_model("r2plus1d_vcop", 5, width=0.125)
    assert prepare_model(model, cfg, torch.device("cuda"))
    sd = SelfDistillation(model.encoder, weight=1.0)
    sd.epoch_start()
    clips = to_memory_format(torch.randn(4, 3, 8, 32, 32, device="cuda"), True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        target = sd.prepare(clips)
        _, features = model.forward_features(clips)
    assert target.dtype == features.dtype
    w_t = sd.teacher.conv1.spatial_conv.weight
    assert w_t.is_cuda and w_t.is_contiguous(memory_format=torch.channels_last_3d)


def test_resume_on_cuda_is_exact_when_deterministic(tiny_synth, tmp_path):
    common = ["run.deterministic=true", "optim.schedule=constant", "data.workers=2"]
    ft.run_finetune(tiny(tiny_synth, *common, "optim.epochs=3"), tmp_path / "ref")
    ft.run_finetune(tiny(tiny_synth, *common), tmp_path / "cut")
    ft.run_finetune(tiny(tiny_synth, *common, "optim.epochs=3"), tmp_path / "cut", resume="auto")
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
