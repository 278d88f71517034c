"""Options of the distillation family (sd, fixed_teacher, ema_sd share ``reduction`` and ``teacher_bn``)
and of :class:`~sdtl.regularizers.self_distillation.SelfDistillation` (``sd``)."""
from __future__ import annotations

from dataclasses import dataclass

from sdtl.regularizers.options.base import RegularizerOptions, choice, need

REDUCTIONS = ("mean", "sum")
TEACHER_BN = ("eval", "batch")


@dataclass
class DistillOptions(RegularizerOptions):
    reduction: str = choice("mean", REDUCTIONS)  # mean (MSE over batch and features) | sum (per-sample squared L2)
    teacher_bn: str = choice("batch", TEACHER_BN)  # batch (batch stats, no updates) | eval (running stats)


@dataclass
class SDOptions(DistillOptions):
    snapshot_every: int = 0  # also refresh the teacher every N optimizer steps (0 = once per epoch)

    def check(self) -> None:
        need(self.snapshot_every >= 0, "snapshot_every", "must be >= 0 (0 = once per epoch)", self.snapshot_every)

    def describe(self, weight: float) -> str:
        every = f", teacher refreshed every {self.snapshot_every} steps" if self.snapshot_every else ""
        return f"self-distillation λ={weight:g} ({self.reduction}, teacher BN {self.teacher_bn}{every})"
