"""Options of :class:`~sdtl.regularizers.bss.BSS` (``bss``)."""
from __future__ import annotations

from dataclasses import dataclass

from sdtl.regularizers.options.base import RegularizerOptions, need


@dataclass
class BSSOptions(RegularizerOptions):
    k: int = 1  # number of smallest singular values shrunk

    def check(self) -> None:
        need(self.k >= 1, "k", "must be >= 1", self.k)

    def check_run(self, cfg) -> None:
        batch = cfg.data.batch_size
        need(self.k < batch, "k", f"must be smaller than data.batch_size ({batch}): a batch has at most that many "
             f"singular values", self.k)

    def describe(self, weight: float) -> str:
        return f"BSS η={weight:g} k={self.k}"
