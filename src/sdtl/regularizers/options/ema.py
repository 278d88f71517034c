"""Options of :class:`~sdtl.regularizers.ema.EMASelfDistillation` (``ema_sd``)."""
from __future__ import annotations

from dataclasses import dataclass

from sdtl.regularizers.options.base import need
from sdtl.regularizers.options.self_distillation import DistillOptions


@dataclass
class EMAOptions(DistillOptions):
    ema_decay: float = 0.999  # teacher <- a*teacher + (1-a)*student after every optimizer step

    def check(self) -> None:
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1), e.g. 0.999", self.ema_decay)

    def describe(self, weight: float) -> str:
        return f"self-distillation from an EMA teacher λ={weight:g} (decay {self.ema_decay:g}, {self.reduction})"
