"""Unlabelled videos as pretext samples: each item is a clip and the target its task drew.

There is no pretext dataset class: a pretext dataset is the one :class:`sdtl.data.datasets.ClipDataset`
composed with a :class:`PretextSampler`, the clip sampler that lets the task draw the clip and its
target (unlabelled pools need no labels). :func:`PretextClipDataset` builds it with the pre-training
call signature. Two-clip tasks (RSPNet) need no target: :func:`RSPNetClipDataset` composes the
ClipDataset with :class:`~sdtl.data.sampling.TwoClipColourSampler`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdtl.data.datasets import ClipDataset
from sdtl.data.sampling import ClipDraw, ClipSampler, TwoClipColourSampler
from sdtl.data.transforms import train_transform


class PretextSampler(ClipSampler):
    """The clip sampler of a single-clip pretext task.

    ``task.sample(num_frames, generator) -> (frame indices, target)`` draws the clip and its target
    (:class:`~sdtl.pretext.speed.SpeedPrediction`: the stride class, then the window); the clip then gets
    the training augmentation (random resized crop of ``crop_area`` of the frame + flip) at ``size``.
    """

    supplies_target = True

    def __init__(self, task, size: int, crop_area: tuple[float, float] = (0.25, 1.0), norm=None) -> None:
        self.task = task
        self.size = size
        self.crop_area = crop_area
        self.norm = norm  # (mean, std) of the encoder's input; ImageNet's when None

    def draw(self, num_frames: int, generator: torch.Generator) -> ClipDraw:
        indices, target = self.task.sample(num_frames, generator)
        return ClipDraw((indices,), target)

    def views(self, clips: list[torch.Tensor], generator: torch.Generator) -> dict:
        return {"video": train_transform(clips[0], self.size, generator=generator, scale=self.crop_area,
                                         norm=self.norm), "clip_index": 0}


def PretextClipDataset(paths: list[Path], task, size: int, backend: str, seed: int,
                       crop_area: tuple[float, float] = (0.25, 1.0), probe_index=None, norm=None) -> ClipDataset:
    """Unlabelled videos -> (augmented clip, pretext target) items; undecodable videos are replaced.

    ``ClipDataset(paths, PretextSampler(task, size, crop_area), backend=backend, seed=seed)``: items
    ``{"video": float[3, T, S, S], "label": target, "video_index", "clip_index": 0, "failed"}``,
    indexable by ``i`` or ``(epoch, i)``, with ``set_epoch`` and ``probe_cache`` as every ClipDataset.
    """
    return ClipDataset(paths, PretextSampler(task, size, crop_area, norm), backend=backend, seed=seed,
                       probe_index=probe_index)


def RSPNetClipDataset(paths: list[Path], clip_len: int, size: int, backend: str, seed: int,
                      crop_area: tuple[float, float] = (0.4, 1.0), norm=None, probe_index=None) -> ClipDataset:
    """Unlabelled videos -> RSPNet items: two windows of ``2 * clip_len`` consecutive frames (the 2x clip
    spans a whole window, the 1x clip is its first half), each with its own RSPNet augmentation.

    ``ClipDataset(paths, TwoClipColourSampler(2 * clip_len, size, crop_area, norm=norm), ...)``: items
    ``{"video": float[2, 3, 2 * clip_len, S, S], "label": -1, "video_index", "clip_index": 0, "failed"}``
    (a batch: ``[B, 2, 3, 2 * clip_len, S, S]``, query clip first).
    """
    return ClipDataset(paths, TwoClipColourSampler(2 * clip_len, size, crop_area, norm=norm), backend=backend,
                       seed=seed, probe_index=probe_index)
