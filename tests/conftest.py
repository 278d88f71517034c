"""Shared fixtures: one tiny synthetic dataset and one tiny pre-trained encoder per test session."""
from __future__ import annotations

import os

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them when tests spawn workers.
torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """The 'tiny' preset of the embedded synthetic dataset (real H.264 files), generated once."""
    from sdtl.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synth") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_synth, tmp_path_factory):
    """An encoder pre-trained for one epoch on the tiny pool (sdtl-pretrain checkpoint path)."""
    from sdtl.engine.config import load_config
    from sdtl.engine.pretrain import run_pretrain

    cfg = load_config("synthetic_tiny_pretrain", [f"data.root={tiny_synth}"], kind="pretrain")
    return run_pretrain(cfg, tmp_path_factory.mktemp("pretrain") / "run")
