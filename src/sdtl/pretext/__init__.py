"""Self-supervised pretext tasks for ``sdtl pretrain`` (their own package: the engine runs them, the
forgetting diagnostics read their probes, and neither imports an entry point).

The tasks are declared once, in :data:`sdtl.pretext.registry.PRETEXT` (``task.name`` → options
dataclass and help line); the config's ``task`` section and its checks come from there.

:data:`PRETEXT_TASKS` maps the name of a single-clip task to its sampling-and-loss class. Its samples
come from the one clip dataset of :mod:`sdtl.data.datasets` composed with
:class:`sdtl.pretext.dataset.PretextSampler` (``ClipDataset(paths, PretextSampler(task, size, crop_area),
backend=..., seed=...)``).

``task.name: rspnet`` (:mod:`sdtl.pretext.rspnet`) is a two-clip contrastive task with a momentum key
network and a queue: its own class (:class:`~sdtl.pretext.rspnet.RSPNet`), its samples from
:func:`sdtl.pretext.dataset.RSPNetClipDataset`.

Importing this package does not import torch (the config reads the registry); the classes are
imported on first use.
"""
from __future__ import annotations

import importlib

__all__ = ["PRETEXT_TASKS", "PretextModel", "RSPNet", "RSPNetModel", "SpeedPrediction"]

_CLASSES = {"PretextModel": "sdtl.pretext.speed", "SpeedPrediction": "sdtl.pretext.speed",
            "RSPNet": "sdtl.pretext.rspnet", "RSPNetModel": "sdtl.pretext.rspnet"}


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    if name == "PRETEXT_TASKS":
        from sdtl.pretext.speed import SpeedPrediction

        return {"speed": SpeedPrediction}
    raise AttributeError(f"module 'sdtl.pretext' has no attribute {name!r}")
