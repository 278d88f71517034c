"""Which frames make a clip: frame indices only, no decoding.

Called by :class:`sdtl.data.datasets.VideoClipDataset` (and by anything that needs the same clips, e.g.
the forgetting-diagnostics probe). The recipe is RSPNet's (``shared/REFERENCE.md`` section 3):

* train: one window of ``clip_len`` frames ``stride`` apart, starting uniformly at random; a video
  shorter than the window is looped (frames 0, 1, ..., n-1, 0, 1, ...);
* test: ``num_clips`` windows whose starts are ``round(linspace(0, n - span, num_clips))``.

The random start comes from the caller's ``torch.Generator``, never the global RNG, so a sample is
a pure function of its generator's seed (what makes runs reproducible and resumable).
"""
from __future__ import annotations

import numpy as np
import torch


def clip_span(clip_len: int, stride: int) -> int:
    """Number of consecutive source frames one clip covers."""
    return (clip_len - 1) * stride + 1


def _check(num_frames: int, clip_len: int, stride: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got {clip_len}, {stride}")


def _window(start: int, num_frames: int, clip_len: int, stride: int) -> list[int]:
    # The modulo only matters for videos shorter than one span: they loop from their first frame.
    return [(start + k * stride) % num_frames for k in range(clip_len)]


def sample_train_clip(num_frames: int, clip_len: int = 16, stride: int = 1,
                      generator: torch.Generator | None = None) -> list[int]:
    """Frame indices of one training clip with a uniformly random start (``generator`` is required)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("sample_train_clip needs an explicit torch.Generator (the global RNG would make "
                        "samples depend on worker scheduling)")
    _check(num_frames, clip_len, stride)
    max_start = num_frames - clip_span(clip_len, stride)
    if max_start < 0:
        return _window(0, num_frames, clip_len, stride)
    start = int(torch.randint(0, max_start + 1, (1,), generator=generator))
    return _window(start, num_frames, clip_len, stride)


def test_clip_starts(num_frames: int, clip_len: int = 16, stride: int = 1, num_clips: int = 10) -> list[int]:
    """Start frames of the test clips: ``round(linspace(0, max(n - span, 0), num_clips))``."""
    _check(num_frames, clip_len, stride)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    max_start = max(num_frames - clip_span(clip_len, stride), 0)
    # np.round rounds halves to even, as RSPNet's numpy code does.
    return [int(s) for s in np.round(np.linspace(0, max_start, num_clips))]


def sample_test_clips(num_frames: int, clip_len: int = 16, stride: int = 1, num_clips: int = 10) -> list[list[int]]:
    """Frame indices of ``num_clips`` evenly spread test clips (deterministic; short videos loop)."""
    return [_window(s, num_frames, clip_len, stride)
            for s in test_clip_starts(num_frames, clip_len, stride, num_clips)]


test_clip_starts.__test__ = False  # type: ignore[attr-defined]  (not a pytest test)
