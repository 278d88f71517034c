"""The fine-tuned model: an encoder ``f`` plus one linear head ``g``, and the factories that build them.

``VideoClassifier`` keeps the encoder and the head as separate attributes because the
self-distillation regularizer needs the pooled feature ``f(x)`` (and a frozen copy of the encoder)
while the loss needs ``g(f(x))``: ``forward_features`` returns both from one pass.

Adding a backbone: see :mod:`sdtl.models.registry` (each encoder module declares its ``SPECS``).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from sdtl.errors import ConfigError, UserError
from sdtl.models.registry import spec_of, specs


def list_archs() -> dict[str, str]:
    """Available arch names, each with a one-line description."""
    return {name: spec.description for name, spec in specs().items()}


def arch_option_names(arch: str) -> list[str]:
    """The keyword options ``build_encoder(arch, ...)`` accepts."""
    return list(inspect.signature(spec_of(arch).build).parameters)


def build_encoder(arch: str, **options: Any) -> nn.Module:
    """Build encoder ``arch`` with random weights: ``forward(x[B,3,T,H,W]) -> [B, D]``, ``.feature_dim``.

    The returned module records ``sdtl_arch`` and ``sdtl_arch_options`` (what to write into a
    checkpoint so it can be rebuilt). Unknown arch or option -> :class:`ConfigError` naming the
    ``model.*`` key (options are ``model.<option>`` in a config).
    """
    spec = spec_of(arch)
    valid = arch_option_names(arch)
    unknown = [key for key in options if key not in valid]
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", f"not an option of model.arch={arch}",
                          f"{arch} takes: {', '.join('model.' + v for v in valid) or 'no options'}; "
                          "remove it or pick an arch that has it")
    encoder = spec.build(**options)
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
    """Architecture options recorded in checkpoints (what `build_model` needs besides the arch): the head's
    dropout and every ``model.*`` encoder option set away from its neutral value."""
    opts = {"dropout": cfg.model.dropout}
    if cfg.model.width != 1.0:
        opts["width"] = cfg.model.width
    if cfg.model.variant:
        opts["variant"] = cfg.model.variant
    if cfg.model.drop_path:
        opts["drop_path"] = cfg.model.drop_path
    return opts
