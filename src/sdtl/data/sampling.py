"""Which frames make a clip: frame indices only, no decoding.

Called by :class:`sdtl.data.datasets.VideoClipDataset` (and by anything that needs the same clips, e.g.
the forgetting-diagnostics probe). The recipe is RSPNet's (``shared/REFERENCE.md`` section 3):

* train: one window of ``clip_len`` frames ``stride`` apart, starting uniformly at random; a video
  shorter than the window is looped (frames 0, 1, ..., n-1, 0, 1, ...);
* test: ``num_clips`` windows whose starts are ``round(linspace(0, n - span, num_clips))``.

The random start comes from the caller's ``torch.Generator``, never the global RNG, so a sample is
a pure function of its generator's seed (what makes runs reproducible and resumable).

**Clip samplers** (the part :class:`sdtl.data.datasets.ClipDataset` is composed with, as pytorchvideo's
``LabeledVideoDataset`` takes a ``ClipSampler``): a :class:`ClipSampler` decides, for one open video,
which clips an item cuts (:meth:`~ClipSampler.draw`, frame indices and possibly a target) and how the
decoded clips become the item's tensor (:meth:`~ClipSampler.views`, the augmentation). The dataset
owns everything else: the per-item generator, decoding, replacing undecodable videos, the item dict.

* :class:`RandomClipSampler` -- supervised training: one random clip, one random augmentation;
* :class:`UniformClipsSampler` -- evaluation: ``num_clips`` evenly spread clips x ``crops`` views;
* :class:`TwoClipSampler` -- two independent clips of the same video, each with its own augmentation
  (the input of two-clip pretext tasks such as RSPNet's);
* :class:`TwoClipColourSampler` -- the same two clips with RSPNet's colour augmentation (greyscale,
  then colour jitter) on top of crop and flip: ``task.name: rspnet``'s input;
* ``sdtl.pretext.dataset.PretextSampler`` -- a pretext task draws the clip *and* its target.

Random draws happen in a fixed order, all from the item's generator: ``draw`` (while the video is
open, after its frame count is known), then ``views`` (after decoding), clip by clip.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdtl.data.transforms import colour_train_transform, test_transform, train_transform


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


# --------------------------------------------------------------------------- clip samplers

@dataclass(frozen=True)
class ClipDraw:
    """What a :class:`ClipSampler` drew for one video.

    ``clips``: the frame indices of each clip (decoded together, in one pass over the video);
    ``target``: the item's target when the sampler makes it (a pretext task's class, e.g. the speed),
    else None and the item's label is the video's own label.
    """

    clips: tuple[list[int], ...]
    target: Any = None


class ClipSampler(ABC):
    """Which clips an item cuts from a video, and how they become the item's ``video`` tensor.

    Subclasses set two class attributes:

    * ``replaces_failed`` -- True (training): an undecodable video is replaced by another random one;
      False (evaluation): every video is scored, an undecodable one gives :meth:`empty` (0 clips);
    * ``supplies_target`` -- True when :meth:`draw` returns the target (pretext tasks; the dataset
      then needs no labels), False when the item's label is the video's label.

    Both methods draw from ``generator`` only (never the global RNG), ``draw`` before ``views``.
    """

    replaces_failed: bool = True
    supplies_target: bool = False

    @abstractmethod
    def draw(self, num_frames: int, generator: torch.Generator) -> ClipDraw:
        """The clips (frame indices) of a video of ``num_frames`` frames, and the target if any."""

    @abstractmethod
    def views(self, clips: list[torch.Tensor], generator: torch.Generator) -> dict:
        """``{"video": tensor, "clip_index": int or long tensor}`` from the decoded clips (uint8
        ``[T, H, W, 3]`` each, in :meth:`draw`'s order).

        ``clip_index`` an int: one sample per video (batches stack ``video``); a long tensor: one
        entry per view along ``video``'s first dimension (batches concatenate, test-style)."""

    def empty(self) -> dict:
        """The ``views`` of a video that could not be decoded (only when ``replaces_failed`` is False)."""
        raise NotImplementedError(f"{type(self).__name__} replaces undecodable videos; it has no empty item")


class RandomClipSampler(ClipSampler):
    """Training: one window of ``clip_len`` frames ``stride`` apart at a random start
    (:func:`sample_train_clip`), then one random resized crop + flip (``crop_area``: share of the frame)."""

    def __init__(self, clip_len: int = 16, stride: int = 1, size: int = 112,
                 crop_area: tuple[float, float] = (0.25, 1.0), norm=None) -> None:
        self.clip_len, self.stride, self.size, self.norm = clip_len, stride, size, norm
        self.crop_area = (float(crop_area[0]), float(crop_area[1]))

    def draw(self, num_frames: int, generator: torch.Generator) -> ClipDraw:
        return ClipDraw((sample_train_clip(num_frames, self.clip_len, self.stride, generator),))

    def views(self, clips: list[torch.Tensor], generator: torch.Generator) -> dict:
        return {"video": train_transform(clips[0], self.size, generator=generator, scale=self.crop_area,
                                         norm=self.norm),
                "clip_index": 0}


class UniformClipsSampler(ClipSampler):
    """Evaluation: ``num_clips`` evenly spread windows (:func:`sample_test_clips`), each as ``crops``
    deterministic crops; ``video`` is ``[num_clips * crops, 3, T, S, S]``, clip-major."""

    replaces_failed = False

    def __init__(self, clip_len: int = 16, stride: int = 1, num_clips: int = 10, size: int = 112,
                 crops: int = 1, norm=None) -> None:
        self.clip_len, self.stride, self.num_clips, self.size, self.crops = clip_len, stride, num_clips, size, crops
        self.norm = norm

    def draw(self, num_frames: int, generator: torch.Generator) -> ClipDraw:
        return ClipDraw(tuple(sample_test_clips(num_frames, self.clip_len, self.stride, self.num_clips)))

    def views(self, clips: list[torch.Tensor], generator: torch.Generator) -> dict:
        video = torch.cat([test_transform(clip, self.size, self.crops, self.norm) for clip in clips])
        return {"video": video, "clip_index": torch.arange(self.num_clips * self.crops)}

    def empty(self) -> dict:
        return {"video": torch.zeros(0, 3, self.clip_len, self.size, self.size),
                "clip_index": torch.zeros(0, dtype=torch.long)}


class TwoClipSampler(ClipSampler):
    """Two independent random clips of the same video, each with its own augmentation:
    ``video`` is ``[2, 3, T, S, S]`` (a batch ``[B, 2, 3, T, S, S]``).

    Draw order: window of clip 0, window of clip 1, then the augmentation of clip 0, then of clip 1.
    A two-clip pretext task (e.g. RSPNet's relative speed: a stride per clip, the target their
    relation) overrides :meth:`draw` and returns its target there; :meth:`views` stays.
    """

    def __init__(self, clip_len: int = 16, stride: int = 1, size: int = 112,
                 crop_area: tuple[float, float] = (0.25, 1.0), norm=None) -> None:
        self.clip_len, self.stride, self.size, self.norm = clip_len, stride, size, norm
        self.crop_area = (float(crop_area[0]), float(crop_area[1]))

    def draw(self, num_frames: int, generator: torch.Generator) -> ClipDraw:
        return ClipDraw(tuple(sample_train_clip(num_frames, self.clip_len, self.stride, generator) for _ in range(2)))

    def views(self, clips: list[torch.Tensor], generator: torch.Generator) -> dict:
        video = torch.stack([train_transform(c, self.size, generator=generator, scale=self.crop_area, norm=self.norm) for c in clips])
        return {"video": video, "clip_index": 0}


class TwoClipColourSampler(TwoClipSampler):
    """RSPNet's input: two independent windows of ``clip_len`` consecutive frames of one video (a short
    video loops), each through :func:`~sdtl.data.transforms.colour_train_transform` with its own draws:
    crop of ``crop_area`` of the frame, greyscale with ``grey_p``, colour jitter ``jitter`` (always on),
    flip, normalisation. ``video`` is ``[2, 3, clip_len, S, S]``.

    ``clip_len`` is the *loaded* length: RSPNet loads 2 x the encoder's frames and picks its 1x / 2x
    clips from them on the device (:func:`sdtl.pretext.rspnet.split_speeds`). Draw order as
    :class:`TwoClipSampler`: window 0, window 1, augmentation of clip 0, of clip 1.
    """

    def __init__(self, clip_len: int = 32, size: int = 112, crop_area: tuple[float, float] = (0.4, 1.0),
                 grey_p: float = 0.2, jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4),
                 norm=None) -> None:
        super().__init__(clip_len, 1, size, crop_area, norm)
        self.grey_p, self.jitter = float(grey_p), tuple(float(j) for j in jitter)

    def views(self, clips: list[torch.Tensor], generator: torch.Generator) -> dict:
        video = torch.stack([colour_train_transform(c, self.size, generator=generator, scale=self.crop_area,
                                                    grey_p=self.grey_p, jitter=self.jitter, norm=self.norm)
                             for c in clips])
        return {"video": video, "clip_index": 0}
