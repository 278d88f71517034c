"""Self-supervised pretext tasks for ``sdtl pretrain`` (their own package: the engine runs them, the
forgetting diagnostics read their probes, and neither imports an entry point).

:data:`PRETEXT_TASKS` maps ``task.name`` to a single-clip task's sampling-and-loss class. Its samples
come from the one clip dataset of :mod:`sdtl.data.datasets` composed with
:class:`sdtl.pretext.dataset.PretextSampler` (``ClipDataset(paths, PretextSampler(task, size, crop_area),
backend=..., seed=...)``).

``task.name: rspnet`` (:mod:`sdtl.pretext.rspnet`) is a two-clip contrastive task with a momentum key
network and a queue: its own class (:class:`~sdtl.pretext.rspnet.RSPNet`), its samples from
:func:`sdtl.pretext.dataset.RSPNetClipDataset`.
"""
from __future__ import annotations

from sdtl.pretext.rspnet import RSPNet, RSPNetModel
from sdtl.pretext.speed import PretextModel, SpeedPrediction

PRETEXT_TASKS = {"speed": SpeedPrediction}

__all__ = ["PRETEXT_TASKS", "PretextModel", "RSPNet", "RSPNetModel", "SpeedPrediction"]
