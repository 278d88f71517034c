"""Regularizers that keep a fine-tuned encoder close to what it knew (the self-distillation family).

Each is a drop-in ``nn.Module`` with the protocol of :class:`~sdtl.regularizers.base.Regularizer`.
The family is declared once, in :data:`sdtl.regularizers.registry.REGULARIZERS` (name → class,
options, metric part, help); :func:`build_regularizer` builds the one a config names
(``regularizer.name``).

Importing this package does not import torch (the config reads the registry); the classes are
imported on first use.
"""
from __future__ import annotations

import importlib

from sdtl.regularizers.registry import REGULARIZERS, RegSpec, build_regularizer

__all__ = [
    "BSS",
    "DELTA",
    "L2SP",
    "REGULARIZERS",
    "EMASelfDistillation",
    "FixedTeacherDistillation",
    "RegSpec",
    "Regularizer",
    "SelfDistillation",
    "build_regularizer",
]

_CLASSES = {
    "BSS": "sdtl.regularizers.bss",
    "DELTA": "sdtl.regularizers.delta",
    "EMASelfDistillation": "sdtl.regularizers.ema",
    "FixedTeacherDistillation": "sdtl.regularizers.fixed_teacher",
    "L2SP": "sdtl.regularizers.l2sp",
    "Regularizer": "sdtl.regularizers.base",
    "SelfDistillation": "sdtl.regularizers.self_distillation",
}


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'sdtl.regularizers' has no attribute {name!r}")
