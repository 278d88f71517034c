"""The fine-tuned model: an encoder ``f`` plus one linear head ``g``, and the factories that build them.

``VideoClassifier`` keeps the encoder and the head as separate attributes because the
self-distillation regularizer needs the pooled feature ``f(x)`` (and a frozen copy of the encoder)
while the loss needs ``g(f(x))``: ``forward_features`` returns both from one pass.

Adding a backbone: write a module whose ``forward`` returns ``[B, D]`` and which has ``.feature_dim``
(and, ideally, ``forward_features`` for the map before pooling), then add one line to ``ARCHS``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from sdtl.errors import UserError
from sdtl.models.c3d import C3D
from sdtl.models.r2plus1d_vcop import R2Plus1DVCOP
from sdtl.models.torchvision_video import mc3_18, r2plus1d_18, r3d_18


class Arch(NamedTuple):
    """One available encoder: how to build it and what it is."""

    constructor: Callable[..., nn.Module]
    description: str


# The one place that maps an arch name to code. Options are the constructor's keyword arguments.
ARCHS: dict[str, Arch] = {
    "c3d": Arch(C3D, "C3D with BatchNorm, RSPNet layout (27.7M params, 512-d); option width"),
    "r2plus1d_vcop": Arch(R2Plus1DVCOP, "R(2+1)D-10, VCOP/RSPNet layout (14.4M params, 512-d); option width"),
    "r2plus1d_18": Arch(r2plus1d_18, "torchvision R(2+1)D-18 (31.3M params, 512-d); width fixed at 1"),
    "r3d_18": Arch(r3d_18, "torchvision R3D-18 (33.2M params, 512-d); width fixed at 1"),
    "mc3_18": Arch(mc3_18, "torchvision MC3-18 (11.5M params, 512-d); width fixed at 1"),
}


def list_archs() -> dict[str, str]:
    """Available arch names, each with a one-line description."""
    return {name: arch.description for name, arch in ARCHS.items()}


def _arch(arch: str) -> Arch:
    if arch not in ARCHS:
        raise UserError(f"arch {arch!r}: unknown; valid archs: {', '.join(ARCHS)}")
    return ARCHS[arch]


def arch_option_names(arch: str) -> list[str]:
    """The keyword options ``build_encoder(arch, ...)`` accepts."""
    return list(inspect.signature(_arch(arch).constructor).parameters)


def build_encoder(arch: str, **options: Any) -> nn.Module:
    """Build encoder ``arch`` with random weights: ``forward(x[B,3,T,H,W]) -> [B, D]``, ``.feature_dim``.

    The returned module records ``sdtl_arch`` and ``sdtl_arch_options`` (what to write into a
    checkpoint so it can be rebuilt). Unknown arch or option -> :class:`UserError`.
    """
    spec = _arch(arch)
    valid = arch_option_names(arch)
    unknown = [key for key in options if key not in valid]
    if unknown:
        raise UserError(
            f"arch {arch!r}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid) or 'none'}"
        )
    encoder = spec.constructor(**options)
    encoder.sdtl_arch = arch
    encoder.sdtl_arch_options = dict(options)
    return encoder


class VideoClassifier(nn.Module):
    """``encoder`` (f) followed by ``head`` = Linear(D, num_classes) (g), with optional dropout before g.

    Dropout is a separate module so the state-dict keys are always ``encoder.*`` and
    ``head.weight``/``head.bias`` whatever the dropout rate.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if int(num_classes) < 1:
            raise UserError(f"num_classes={num_classes!r}: must be >= 1")
        if not 0.0 <= float(dropout) < 1.0:
            raise UserError(f"dropout={dropout!r}: must be in [0, 1)")
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.dropout = nn.Dropout(float(dropout)) if dropout else nn.Identity()
        self.head = nn.Linear(encoder.feature_dim, self.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], features [B, D])`` from one encoder pass; features are before dropout."""
        features = self.encoder(x)
        return self.head(self.dropout(features)), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.forward_features(x)[0]


def build_model(arch: str, num_classes: int, dropout: float = 0.0, **options: Any) -> VideoClassifier:
    """``VideoClassifier(build_encoder(arch, **options), num_classes, dropout)`` with random weights."""
    return VideoClassifier(build_encoder(arch, **options), num_classes, dropout=dropout)


class FeaturesAndLogits(nn.Module):
    """Wraps a VideoClassifier so that one DDP-visible forward returns logits and features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def model_options(cfg) -> dict:
    """Architecture options recorded in checkpoints (what `build_model` needs besides the arch)."""
    opts = {"dropout": cfg.model.dropout}
    if cfg.model.width != 1.0:
        opts["width"] = cfg.model.width
    return opts
