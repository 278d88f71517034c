"""Self-supervised pretext tasks for ``sdtl pretrain`` (their own package: the engine runs them, the
forgetting diagnostics read their probes, and neither imports an entry point).

:data:`PRETEXT_TASKS` maps ``task.name`` to the task's sampling-and-loss class. Its samples come from
the one clip dataset of :mod:`sdtl.data.datasets` composed with :class:`sdtl.pretext.dataset.PretextSampler`
(``ClipDataset(paths, PretextSampler(task, size, crop_area), backend=..., seed=...)``).
"""
from __future__ import annotations

from sdtl.pretext.speed import PretextModel, SpeedPrediction

PRETEXT_TASKS = {"speed": SpeedPrediction}

__all__ = ["PRETEXT_TASKS", "PretextModel", "SpeedPrediction"]
