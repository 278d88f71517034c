"""The decoder a run used is recorded (config.yaml, checkpoints) and evaluation/resume warn when it differs;
the run's probe index is written."""
from __future__ import annotations

import logging

import av
import torch
import yaml

from sdtl.engine.evaluate import evaluate_checkpoint
from sdtl.engine import finetune as ft
from sdtl.engine.config import load_config


def test_decoder_is_recorded_and_a_different_one_is_flagged(tiny_synth, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = load_config("synthetic_tiny", [f"data.root={tiny_synth}", "data.backend=auto", "optim.epochs=1",
                                         "eval.probe_videos=0", "eval.num_clips=1", "data.val_fraction=0",
                                         "data.size=8", "data.clip_len=4", "run.threads=1"])  # seconds, not tens
    ft.run_finetune(cfg, out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["decoder"].startswith(f"pyav {av.__version__}")
    assert saved["data"]["backend"] == "auto"  # the setting itself is kept as given
    ckpt = out / "checkpoints" / "last.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["decoder"] == saved["decoder"]
    assert (out / "video_index.jsonl").read_text().count("\n") >= 1  # the run's shared probe index

    with caplog.at_level(logging.WARNING):
        evaluate_checkpoint(ckpt, tmp_path / "eval_same")
    assert "decoded by" not in caplog.text

    # a checkpoint trained with torchcodec, evaluated (and resumed) with PyAV
    state["decoder"] = "torchcodec 0.17.0 (system FFmpeg 5.1.9)"
    other = tmp_path / "torchcodec_trained.pt"
    torch.save(state, other)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluate_checkpoint(other, tmp_path / "eval_other")
    assert "trained on frames decoded by torchcodec 0.17.0" in caplog.text
    assert "set the config key data.backend=torchcodec" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ft.run_finetune(cfg, out, resume=str(other))  # finished: the final test only
    assert f"resuming {other}: its epochs were trained on frames decoded by torchcodec" in caplog.text
