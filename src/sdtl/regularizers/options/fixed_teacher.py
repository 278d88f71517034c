"""Options of :class:`~sdtl.regularizers.fixed_teacher.FixedTeacherDistillation` (``fixed_teacher``)."""
from __future__ import annotations

from dataclasses import dataclass

from sdtl.regularizers.options.self_distillation import DistillOptions


@dataclass
class FixedTeacherOptions(DistillOptions):
    def describe(self, weight: float) -> str:
        return (f"distillation from the fixed pre-trained encoder λ={weight:g} ({self.reduction}, "
                f"teacher BN {self.teacher_bn})")
