"""Spatial clip transforms: uint8 frames ``[T, H, W, 3]`` -> normalised float ``[3, T, S, S]``.

Called by :class:`sdtl.data.datasets.VideoClipDataset` once per sample (inside DataLoader workers).
The recipe is RSPNet's (``shared/REFERENCE.md`` section 3):

* train: one random resized crop (area 0.25-1 of the frame, aspect 3/4-4/3) shared by all frames of
  the clip, resized to ``size``; horizontal flip with p = 0.5; no colour jitter;
* test: the centre square (side = min(H, W)) resized to ``size``; with ``crops=3`` also the two ends of
  the long side (left/right or top/bottom);
* RSPNet's pretext views (:func:`colour_train_transform`, for ``task.name: rspnet``): crop (area 0.4-1),
  greyscale (p = 0.2) *then* colour jitter (always on, hue 0.4), flip;
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


# --------------------------------------------------------------------- colour (RSPNet's pretext views)
# ITU-R 601 luma, as torchvision's rgb_to_grayscale and RSPNet's copy of it.
GREY_WEIGHTS = (0.2989, 0.587, 0.114)

#: the order of :func:`colour_jitter_params`' ops: ``order`` is a permutation of these indices
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def rgb_to_grey(x: torch.Tensor) -> torch.Tensor:
    """Float ``[..., 3, H, W]`` in [0, 1] -> its luma ``[..., 1, H, W]``."""
    r, g, b = x.unbind(-3)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(-3)


def colour_jitter_params(generator: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                         saturation: float = 0.4, hue: float = 0.4) -> dict:
    """One draw of a colour jitter, from ``generator`` in torchvision's ``ColorJitter.get_params`` order:
    the order of the four ops (a permutation of :data:`JITTER_OPS`), then the brightness, contrast and
    saturation factors ~ U[max(0, 1 - s), 1 + s] and the hue shift ~ U[-hue, hue]."""
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue={hue}: must be in [0, 0.5] (a shift of the hue circle)")
    order = torch.randperm(4, generator=generator).tolist()
    factors = {name: _uniform(max(0.0, 1 - s), 1 + s, generator)
               for name, s in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation))}
    return {"order": order, **factors, "hue": _uniform(-hue, hue, generator)}


def _blend(x: torch.Tensor, other, factor: float) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def shift_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of float RGB ``[..., 3, H, W]`` in [0, 1] by ``shift`` turns (HSV: ``h = (h + shift)
    mod 1``, saturation and value kept): torchvision's ``adjust_hue`` to ~1e-6, about 3x faster on CPU
    (it goes to HSV and back through per-pixel sector indices; this uses the closed form
    ``channel = v - c * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``, n = 5, 3, 1 for R, G, B)."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3), x.amin(-3)
    chroma = maxc - minc
    inv = 1 / torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey pixels: any hue, chroma 0
    h = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2, (r - g) * inv + 4))
    h.add_(6 * shift + 6)  # in sixths of a turn, kept positive for the remainder
    out = torch.empty_like(x)
    for channel, n in enumerate((5, 3, 1)):
        k = torch.remainder(h + n, 6)
        torch.minimum(k, 4 - k, out=k).clamp_(0, 1)
        torch.sub(maxc, chroma * k, out=out[..., channel, :, :])
    return out


def apply_colour_jitter(x: torch.Tensor, params: dict) -> torch.Tensor:
    """The jitter ``params`` (:func:`colour_jitter_params`) on a float clip ``[T, 3, H, W]`` in [0, 1].

    Each op is applied to the whole clip with one factor. Brightness scales; contrast blends with the
    mean grey of the **whole clip** (one scalar, as RSPNet's video transform; torchvision's image op
    would take each frame's own); saturation blends with each pixel's grey; hue rotates the hue circle
    (:func:`shift_hue`). Blends are clamped to [0, 1] after each op."""
    for op in params["order"]:
        name = JITTER_OPS[op]
        if name == "brightness":
            x = _blend(x, 0.0, params["brightness"])
        elif name == "contrast":
            x = _blend(x, rgb_to_grey(x).mean(), params["contrast"])
        elif name == "saturation":
            x = _blend(x, rgb_to_grey(x), params["saturation"])
        else:
            x = shift_hue(x, params["hue"])
    return x


def normalize_float(x_tchw: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
    """Float ``[T, 3, H, W]`` in [0, 1] -> ``[3, T, H, W]`` with ``(x - mean) / std`` (``norm``; ImageNet's when None)."""
    mean, std = norm if norm is not None else (IMAGENET_MEAN, IMAGENET_STD)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
    return x_tchw.permute(1, 0, 2, 3).sub(mean).div_(std).contiguous()


def colour_train_transform(frames: torch.Tensor, size: int = 112, *, generator: torch.Generator,
                           scale: tuple[float, float] = (0.4, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                           grey_p: float = 0.2, jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4),
                           flip_p: float = 0.5, norm: Norm | None = None) -> torch.Tensor:
    """RSPNet's pretext augmentation of one clip. ``[T,H,W,3]`` uint8 -> ``[3,T,S,S]`` float.

    In order: random resized crop (``scale`` of the area, ``ratio`` aspect) resized to ``size`` x
    ``size``; greyscale with probability ``grey_p`` (luma copied to the three channels), **before** the
    jitter (MoCo v2 has them the other way round); colour jitter ``(brightness, contrast, saturation,
    hue)``, always applied, its four ops in a random order, one draw per clip
    (:func:`apply_colour_jitter`); horizontal flip with ``flip_p``; normalisation with ``norm``.

    Draw order, all from ``generator``: crop, greyscale, jitter (order, then factors), flip. The resize
    is sdtl's antialiased one on the uint8 frames (RSPNet resizes the float clip with bilinear
    ``F.interpolate``, without antialiasing): the same as every other sdtl training clip.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError("colour_train_transform needs an explicit torch.Generator")
    x = _check_frames(frames)
    top, left, h, w = random_resized_crop_params(x.shape[-2], x.shape[-1], generator, scale, ratio)
    grey = float(torch.rand(1, generator=generator)) < grey_p
    params = colour_jitter_params(generator, *jitter)
    flip = float(torch.rand(1, generator=generator)) < flip_p
    TF = _tf()
    x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True).float().div_(255)
    if grey:
        x = rgb_to_grey(x).expand_as(x).contiguous()
    x = apply_colour_jitter(x, params)
    if flip:
        x = TF.horizontal_flip(x)
    return normalize_float(x, norm)


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
