"""The decoder a run used is recorded (config.yaml, checkpoints) and evaluation warns when it differs."""
from __future__ import annotations

import logging

import torch
import yaml

from sdtl.engine import finetune as ft
from sdtl.engine.config import load_config


def test_decoder_is_recorded_and_a_different_one_is_flagged(tiny_synth, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = load_config("synthetic_tiny", [f"data.root={tiny_synth}", "data.backend=auto", "optim.epochs=1",
                                         "eval.probe_videos=0", "eval.num_clips=1", "data.val_fraction=0",
                                         "data.size=8", "data.clip_len=4", "run.threads=1"])  # seconds, not tens
    ft.run_finetune(cfg, out)
    text = (out / "config.yaml").read_text()
    assert "# decoder: pyav: PyAV " in text
    assert yaml.safe_load(text)["data"]["backend"] == "auto"  # the setting itself is kept as given
    ckpt = out / "checkpoints" / "last.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["decoder"]["backend"] == "pyav" and "PyAV" in state["decoder"]["decoder"]
    assert (out / "video_index.jsonl").is_file()  # the run's probe index, shared by its workers

    with caplog.at_level(logging.WARNING):
        ft.evaluate_checkpoint(ckpt, tmp_path / "eval_same")
    assert "decoded the videos with" not in caplog.text

    # a checkpoint trained with torchcodec, evaluated with PyAV
    state["decoder"] = {"backend": "torchcodec", "decoder": "torchcodec: torchcodec 0.17 (system FFmpeg 5.1)"}
    other = tmp_path / "torchcodec_trained.pt"
    torch.save(state, other)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ft.evaluate_checkpoint(other, tmp_path / "eval_other")
    assert "training decoded the videos with torchcodec" in caplog.text
    assert "this run decodes with pyav" in caplog.text and "--set data.backend=torchcodec" in caplog.text
