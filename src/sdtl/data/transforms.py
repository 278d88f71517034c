"""Spatial clip transforms: uint8 frames ``[T, H, W, 3]`` -> normalised float ``[3, T, S, S]``.

Called by :class:`sdtl.data.datasets.VideoClipDataset` once per sample (inside DataLoader workers).
The recipe is RSPNet's (``shared/REFERENCE.md`` section 3):

* train: one random resized crop (area 0.25-1 of the frame, aspect 3/4-4/3) shared by all frames of
  the clip, resized to ``size``; horizontal flip with p = 0.5; no colour jitter;
* test: the centre square (side = min(H, W)) resized to ``size``; with ``crops=3`` also the two ends of
  the long side (left/right or top/bottom);
* both: pixels / 255, then the encoder's mean/std (``norm``; ImageNet's when not given).

Every random draw comes from the ``torch.Generator`` passed in, in a fixed order (crop, then flip), so
the same generator seed gives the same tensor on any worker -- torchvision's ``RandomResizedCrop``
draws from the global RNG, which is why the parameters are drawn here and only the resampling is
delegated to ``torchvision.transforms.v2.functional``.
"""
from __future__ import annotations

import math

import torch


def _tf():
    # Imported on first use: torchvision adds ~1-2 s to start-up, which `sdtl data check` doesn't need.
    from torchvision.transforms.v2 import functional

    return functional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def random_resized_crop_params(height: int, width: int, generator: torch.Generator,
                               scale: tuple[float, float] = (0.25, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop; torchvision's algorithm, drawing from ``generator``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # Fallback (very elongated frames): the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


Norm = tuple  # (mean, std), three floats each: the encoder's input statistics (EncoderSpec.input)


def normalize(clip_uint8_tchw: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> float ``[3, T, H, W]``: /255 then ``(x - mean) / std`` (``norm``;
    ImageNet's statistics when None)."""
    # One strided copy does the permute and the uint8 -> float conversion (the resize leaves the
    # frames channels-last); then (x/255 - mean)/std as a single multiply-add per element.
    x = clip_uint8_tchw.permute(1, 0, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)
    mean, std = norm if norm is not None else (IMAGENET_MEAN, IMAGENET_STD)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
    return x.mul_(1 / (255 * std)).sub_(mean / std)


def _check_frames(frames: torch.Tensor) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor):
        frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2)  # T, 3, H, W (a view; the resize makes it contiguous)


def train_transform(frames: torch.Tensor, size: int = 112, *, generator: torch.Generator,
                    scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    flip_p: float = 0.5, norm: Norm | None = None) -> torch.Tensor:
    """Random resized crop + horizontal flip + normalisation. ``[T,H,W,3]`` uint8 -> ``[3,T,S,S]``."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("train_transform needs an explicit torch.Generator")
    x = _check_frames(frames)
    top, left, h, w = random_resized_crop_params(x.shape[-2], x.shape[-1], generator, scale, ratio)
    flip = float(torch.rand(1, generator=generator)) < flip_p
    TF = _tf()
    x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
    if flip:
        x = TF.horizontal_flip(x)
    return normalize(x, norm)


def test_crop_boxes(height: int, width: int, crops: int = 1) -> list[tuple[int, int, int]]:
    """``(top, left, side)`` of the square test crops: centre, or start/centre/end of the long side."""
    if crops not in (1, 3):
        raise ValueError(f"crops must be 1 or 3, got {crops}")
    side = min(height, width)
    centre = ((height - side) // 2, (width - side) // 2, side)
    if crops == 1:
        return [centre]
    if width >= height:
        return [(0, 0, side), centre, (0, width - side, side)]
    return [(0, 0, side), centre, (height - side, 0, side)]


def test_transform(frames: torch.Tensor, size: int = 112, crops: int = 1, norm: Norm | None = None) -> torch.Tensor:
    """Square crop(s) resized to ``size`` + normalisation. ``[T,H,W,3]`` uint8 -> ``[crops,3,T,S,S]``."""
    x = _check_frames(frames)
    TF = _tf()
    views = [normalize(TF.resized_crop(x, top, left, side, side, [size, size], antialias=True), norm)
             for top, left, side in test_crop_boxes(x.shape[-2], x.shape[-1], crops)]
    return torch.stack(views)


# These names start with "test_" because they are the test-time transforms; keep pytest from
# collecting them when a test module imports them.
test_transform.__test__ = False  # type: ignore[attr-defined]
test_crop_boxes.__test__ = False  # type: ignore[attr-defined]
