"""Feature taps: where a transformer encoder shows DELTA (and any hook) a block's output as a 5-D map."""
from __future__ import annotations

from torch import nn


class FeatureTap(nn.Identity):
    """A named point where a transformer presents a block's output as a 5-D map ``[B, C, T, H, W]``.

    The encoder calls the tap on a channel-first *view* of its patch tokens and continues from what the
    tap returns, so a forward hook on the tap (DELTA) sees the map and may replace it (zeroing a channel
    there zeroes it in the tokens). Class tokens are not part of the map.
    """
