"""Channel-width scaling shared by the sdtl-built encoders (C3D and R(2+1)D-VCOP).

``width`` multiplies every channel count of the reference layout so CPU demos and tests stay fast.
Rounding is half-up to the nearest integer with a floor of one channel: ``max(1, floor(c * width + 0.5))``.
Half-up (not Python's banker's ``round``) keeps the mapping monotone and easy to state; widths that
are multiples of 1/64 (0.125, 0.25, 0.5, ...) give exact integer channels at every stage, and
``width=1`` reproduces the released layouts exactly.
"""
from __future__ import annotations

import math

from sdtl.errors import UserError


def check_width(width: float, arch: str) -> float:
    """Validate the ``width`` option of ``arch`` (a positive finite number) and return it as float."""
    try:
        value = float(width)
    except (TypeError, ValueError):
        raise UserError(f"width={width!r} for arch {arch!r}: not a number; use e.g. width=1.0 or 0.25") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"width={width!r} for arch {arch!r}: must be > 0; use e.g. width=1.0 or 0.25")
    return value


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width`` (half-up rounding, at least 1)."""
    return max(1, int(math.floor(channels * width + 0.5)))
