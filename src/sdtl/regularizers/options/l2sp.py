"""Options of :class:`~sdtl.regularizers.l2sp.L2SP` (``l2sp``)."""
from __future__ import annotations

from dataclasses import dataclass

from sdtl.regularizers.options.base import RegularizerOptions, need


@dataclass
class L2SPOptions(RegularizerOptions):
    head_weight: float = 0.01  # beta of the head's L2 (the optimizer's weight decay is then off)

    def check(self) -> None:
        need(self.head_weight >= 0, "head_weight", "must be >= 0", self.head_weight)

    def describe(self, weight: float) -> str:
        return f"L2-SP α={weight:g} β={self.head_weight:g}"
