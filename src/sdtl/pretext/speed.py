"""Playback-speed prediction (the "Pace" baseline the paper cites, and one half of RSPNet's objective).

A clip of ``clip_len`` frames is sampled with a frame stride drawn from ``task.strides`` (default
1/2/4/8) and the encoder + a linear head classify which stride it was. Doing so needs motion
features: the same features the action classes of the downstream task need.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdtl.data.sampling import sample_train_clip
from sdtl.errors import ConfigError


class SpeedPrediction:
    """Classify the frame stride (playback speed) a clip was sampled with."""

    def __init__(self, strides: list[int], clip_len: int) -> None:
        if not strides or any(s < 1 for s in strides) or len(set(strides)) != len(strides):
            raise ConfigError("task.strides", f"{strides} must be distinct integers >= 1", "e.g. [1, 2, 4, 8]")
        self.strides = list(strides)
        self.clip_len = clip_len
        self.num_outputs = len(strides)

    def sample(self, num_frames: int, generator: torch.Generator) -> tuple[list[int], int]:
        """Draw the stride class (the target), then a window with that stride: ``(frame indices, target)``."""
        target = int(torch.randint(len(self.strides), (1,), generator=generator))
        indices = sample_train_clip(num_frames, self.clip_len, self.strides[target], generator)
        return indices, target

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target)


class PretextModel(nn.Module):
    def __init__(self, encoder: nn.Module, num_outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_outputs)

    def forward(self, x):
        return self.head(self.encoder(x))
