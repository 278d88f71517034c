"""Options of :class:`~sdtl.regularizers.delta.DELTA` (``delta``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from sdtl.regularizers.options.base import RegularizerOptions, choice, need
from sdtl.regularizers.options.self_distillation import TEACHER_BN


@dataclass
class DELTAOptions(RegularizerOptions):
    head_weight: float = 0.01  # beta of the head's L2 (the optimizer's weight decay is then off)
    layers: list[str] = field(default_factory=list)  # encoder module names ([] = last conv of each stage)
    attention: str = choice("channel", ("channel", "none"))  # channel (computed once, as the paper) | none (uniform)
    attention_samples: int = 128  # training clips used to compute the channel attention
    teacher_bn: str = choice("batch", TEACHER_BN)  # the frozen reference's BatchNorm, as sd's teacher

    def check(self) -> None:
        need(self.head_weight >= 0, "head_weight", "must be >= 0", self.head_weight)
        need(self.attention_samples >= 2, "attention_samples", "must be >= 2", self.attention_samples)

    def describe(self, weight: float) -> str:
        return f"DELTA α={weight:g} β={self.head_weight:g} (attention {self.attention})"
