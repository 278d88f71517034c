"""`sdtl synth`: the embedded synthetic action-video dataset.

The story
---------
The paper fine-tunes encoders pre-trained on a large unlabelled corpus (Kinetics) on small labelled
action datasets (UCF101, HMDB51). To let anyone watch that regime on a 2-core laptop, this module
renders a miniature of it as *real encoded video files* (H.264 in .avi, written by
:func:`sdtl.data.video_io.write_video`) in UCF101's own layout, so the same loader path that reads
UCF101 reads it too::

    DIR/videos/<Class>/v_<Class>_g<GG>_c<CC>.avi   labelled videos (train and test groups)
    DIR/lists/classInd.txt                        "1 DriftSlow" ... (1-based, like UCF101)
    DIR/lists/trainlist01.txt                     "DriftSlow/v_DriftSlow_g01_c01.avi 1"
    DIR/lists/testlist01.txt                      "DriftSlow/v_DriftSlow_g05_c01.avi"
    DIR/unlabelled/pool_NNNNN.avi                 the large unlabelled pool
    DIR/lists/unlabelled.txt                      relative paths of the pool
    DIR/meta.json                                 preset, seed, version, classes, counts, sizes

**Classes.** Preset ``small`` (the demo) has 5 *tempo* classes (:data:`TEMPO_CLASSES`): actors move
by the same random mixtures of motion primitives as the pool, played 0.35x ... 5.6x faster than their
natural tempo, so the class is "how fast, compared with how such things normally move" — what
playback-speed pre-training learns — at steps between the pretext's strides. Preset ``tiny`` (tests)
keeps motion classes (:data:`CLASS_MOTIONS`): gliding slowly or fast, spinning slowly or fast,
trembling, bouncing. Every class is invariant under a horizontal flip, so the standard flip
augmentation never changes a label. (Earlier designs — direction classes, then 10 motion classes —
gave pre-trained features a linear probe at 10-25%: the benchmark could not show transfer. With the
tempo classes, a linear probe on the shipped encoder's features reached ~60% vs ~25% for a random encoder
(a one-off analysis script, not an sdtl command).)

**Appearance is nuisance.** The actor's shape, size, colour and position, the textured background
(static or panning like a moving camera), small distractor objects wandering on their own, and
pixel noise are all drawn from the *same* distribution for every class. A single frame therefore
says nothing about the class (the tests check that per-class colour statistics overlap).

**Groups, like UCF101's g01-g25.** A group fixes one "actor" (its shape and size); its clips
c01.. vary scene, colours and motion parameters. Train and test use disjoint groups, so test
accuracy measures generalisation to new clips, never recognition of a remembered one.

**The unlabelled pool** mirrors Kinetics: many longer videos (long enough for a 16-frame clip at
frame stride 8, the fastest pace of the playback-speed pretext task) whose objects move by random
*mixtures* of the same motion primitives (drifting and bouncing off walls, speeding up or slowing
down, falling, swinging, spinning, pulsing), each at one narrow natural tempo, without labels.
Playing them back faster or slower produces the speeds that tell the classes apart. Pre-training on it, e.g.
by predicting playback speed, teaches motion features that transfer; that is what the demo measures.

**Measured transfer**: see README and docs/demo_regime.md (every figure there comes from ``sdtl demo``).

Generation is deterministic for a (preset, seed): every video draws from its own
``numpy.random.default_rng([seed, kind, ...])`` stream and the encoder is pinned to one thread with
x264's macroblock-tree rate control off (with it on, x264 output varied from run to run on tiny
frames). Files are written into a temporary sibling directory that is renamed into place at the
end, so an interrupted run leaves nothing half-written.

Called by the ``sdtl synth`` subcommand (:func:`register`), by ``sdtl demo`` and by the tests
(:func:`generate_synthetic`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdtl.errors import DataError, UserError

GENERATOR_VERSION = 2  # 2: preset small = tempo classes, 6+8 groups of 4 clips

# One thread and no macroblock-tree: the only x264 settings under which repeated encodes of the same
# frames were byte-identical on this project's machines (see the module docstring).
ENCODER_OPTIONS = {"threads": "1", "preset": "veryfast", "crf": "18", "x264-params": "mbtree=0"}

# What each class is, in words (also written to meta.json so a reader of the data knows the labels).
CLASS_MOTIONS: dict[str, str] = {
    "DriftSlow": "glides at a slow constant speed (0.35-0.6 px/frame at 48 px), any heading, bouncing off walls",
    "DriftFast": "glides at a fast constant speed (1.4-2.4 px/frame at 48 px), any heading, bouncing off walls",
    "SpinSlow": "rotates in place slowly (2.5-4.5 deg/frame), either direction",
    "SpinFast": "rotates in place fast (10-16 deg/frame), either direction",
    "Shake": "trembles in place (an independent 0.8-1.5 px random offset every frame)",
    "Bounce": "falls under gravity and bounces off a floor (height 12-20 px, period 14-24 frames)",
    "SpeedUp": "starts at rest and accelerates steadily along a random heading (to 2-3 px/frame)",
    "SlowDown": "starts fast and decelerates steadily to rest (the time reversal of SpeedUp)",
    "Swing": "oscillates back and forth along a random direction (amplitude 6-10 px, period 16-28 frames)",
    "Pulse": "stays in place and periodically grows and shrinks (x1.35-x1.65, period 10-20 frames)",
}

# Tempo classes (preset ``small``, the demo): the actors move by the same random mixtures of motion
# primitives as in the unlabelled pool, played k times faster than their natural tempo. What a
# video's objects do, how they look and the scene are nuisance; only "how fast, relative to how such
# things normally move" is the class. That is the knowledge playback-speed pre-training learns (as
# UCF101's actions reuse what Kinetics pre-training learnt), at steps of x2 that fall *between* the
# pretext's strides 1/2/4/8, so the pretext head alone cannot label them.
TEMPO_CLASSES: dict[str, float] = {"Crawl": 0.35, "Slow": 0.7, "Brisk": 1.4, "Fast": 2.8, "Rush": 5.6}
CLASS_MOTIONS.update({
    name: f"1-2 actors moving by the pool's motion primitives at {k:g}x their natural tempo "
          f"(scene and distractors at natural tempo)" for name, k in TEMPO_CLASSES.items()})


@dataclass(frozen=True)
class SyntheticPreset:
    """Sizes of one version of the dataset. Videos are ``size``x``size`` (even, for H.264)."""

    name: str
    classes: tuple[str, ...]
    train_groups: int  # groups g01..g<train_groups> form the training list
    test_groups: int  # the next groups form the test list (disjoint appearances)
    clips_per_group: int  # c01..c<clips_per_group>
    pool_size: int  # unlabelled videos
    frames: int  # frames per labelled video
    pool_frames: int  # frames per unlabelled video (>= 16 * 8 - 7 so stride-8 clips fit)
    size: int = 48
    fps: int = 25
    codec: str = "libx264"

    @property
    def train_per_class(self) -> int:
        return self.train_groups * self.clips_per_group

    @property
    def test_per_class(self) -> int:
        return self.test_groups * self.clips_per_group


_TINY_CLASSES = ("DriftSlow", "DriftFast", "SpinSlow", "SpinFast", "Shake", "Bounce")

PRESETS: dict[str, SyntheticPreset] = {
    # Tests and CI: a few seconds.
    "tiny": SyntheticPreset("tiny", _TINY_CLASSES, train_groups=3, test_groups=3, clips_per_group=2,
                            pool_size=48, frames=32, pool_frames=128),
    # The demo default.
    # The demo default: 5 tempo classes. 24 labelled training videos per class (6 groups; `sdtl demo`
    # holds 2 groups out for validation, leaving 16 to train on) and 32 test videos per class (8
    # unseen groups): 40 validation and 160 test videos, so model selection is not a coin flip (an
    # earlier 30-video validation swung 10-27% between epochs). training videos per class (6 groups; `sdtl demo` holds 2 groups
    # out for validation, leaving 12 to train on) and 24 test videos per class (8 unseen groups): a
    "small": SyntheticPreset("small", tuple(TEMPO_CLASSES), train_groups=6, test_groups=8, clips_per_group=4,
                             pool_size=600, frames=32, pool_frames=128),
}

# Seed-stream tags, so labelled videos, groups and the pool never share random numbers.
_KIND_GROUP, _KIND_CLIP, _KIND_POOL = 1, 2, 3

# ---------------------------------------------------------------------------------------------
# Rendering. Everything is in pixels of a 48-px frame and multiplied by ``size / 48`` so that other
# sizes keep the same look. Objects are drawn as soft-edged shapes (coverage = clip(0.5 - signed
# distance)), which makes sub-pixel motion visible instead of jumping a pixel at a time.
# ---------------------------------------------------------------------------------------------

_SHAPES = ("bar", "triangle", "ellipse", "ell", "tee")


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (in units of the object's radius) to a unit shape.

    All shapes are elongated or asymmetric, so rotation is visible whatever the shape.
    """
    if shape == "bar":
        return np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.4)
    if shape == "ellipse":
        return (np.sqrt((u / 1.0) ** 2 + (v / 0.5) ** 2) - 1.0) * 0.5
    if shape == "triangle":  # isosceles, apex at +u
        d1 = -u - 0.6
        d2 = (0.45 * u + 0.9 * v - 0.45) / 1.0
        d3 = (0.45 * u - 0.9 * v - 0.45) / 1.0
        return np.maximum(d1, np.maximum(d2, d3))
    if shape == "ell":
        a = np.maximum(np.abs(u + 0.2) - 0.8, np.abs(v + 0.65) - 0.3)
        b = np.maximum(np.abs(u + 0.7) - 0.3, np.abs(v) - 0.95)
        return np.minimum(a, b)
    if shape == "tee":
        a = np.maximum(np.abs(u) - 1.0, np.abs(v + 0.6) - 0.3)
        b = np.maximum(np.abs(u) - 0.3, np.abs(v - 0.2) - 0.8)
        return np.minimum(a, b)
    raise ValueError(shape)


@dataclass
class _Track:
    """One object's appearance and its per-frame pose (arrays of length T)."""

    shape: str
    colour: np.ndarray  # [3] float 0-255
    radius: float
    cx: np.ndarray
    cy: np.ndarray
    angle: np.ndarray  # radians
    scale: np.ndarray


def _draw(canvas: np.ndarray, track: _Track, xs: np.ndarray) -> None:
    """Alpha-composite one object onto ``canvas`` [T,S,S,3] (float32), all frames at once.

    Only a square window around the object is evaluated each frame (the object is small next to
    the frame), gathered and scattered back by fancy indexing.
    """
    f32 = np.float32
    frames, size = canvas.shape[0], canvas.shape[1]
    r_max = float(np.max(track.radius * track.scale))
    width = min(size, 2 * int(np.ceil(1.2 * r_max)) + 4)
    # Window origins clipped into the frame: an object partly outside still has its visible part
    # inside the clipped window because the window is wider than the object.
    ox = np.clip(np.floor(track.cx - width / 2).astype(np.int64), 0, size - width)
    oy = np.clip(np.floor(track.cy - width / 2).astype(np.int64), 0, size - width)
    cols = ox[:, None] + np.arange(width)  # [T, W]
    rows = oy[:, None] + np.arange(width)
    dx = xs[cols][:, None, :] - track.cx.astype(f32)[:, None, None]  # [T, 1, W] - [T, 1, 1]
    dy = xs[rows][:, :, None] - track.cy.astype(f32)[:, None, None]  # [T, W, 1]
    cos = np.cos(track.angle).astype(f32)[:, None, None]
    sin = np.sin(track.angle).astype(f32)[:, None, None]
    r = (track.radius * track.scale).astype(f32)[:, None, None]
    inv_r = f32(1.0) / r
    u = (cos * dx + sin * dy) * inv_r
    v = (cos * dy - sin * dx) * inv_r
    alpha = np.clip(f32(0.5) - _shape_distance(track.shape, u, v) * r, f32(0.0), f32(1.0))[..., None]
    index = (np.arange(frames)[:, None, None], rows[:, :, None], cols[:, None, :])
    patch = canvas[index]
    canvas[index] = patch * (f32(1.0) - alpha) + alpha * track.colour.astype(f32)


def _background(rng: np.random.Generator, t: np.ndarray, xs: np.ndarray, unit: float) -> np.ndarray:
    """Base colour plus a few coloured plane waves; a quarter of the time the texture pans (a moving camera).

    Plane waves make panning exact at sub-pixel speeds without resampling an image.
    """
    base = rng.uniform(30, 225, size=3)
    canvas = np.empty((len(t), len(xs), len(xs), 3), dtype=np.float32)
    canvas[...] = base.astype(np.float32)
    pan = np.zeros(2)
    # A panning texture changes every pixel every frame and so dwarfs the actor's own motion:
    # kept rare and slow, or it becomes the only thing a model attends to.
    if rng.random() < 0.25:
        theta = rng.uniform(0, 2 * np.pi)
        pan = rng.uniform(0.1, 0.3) * unit * np.array([np.cos(theta), np.sin(theta)])
    for _ in range(int(rng.integers(1, 4))):
        wavelength = rng.uniform(6, 20) * unit
        theta = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / wavelength * np.array([np.cos(theta), np.sin(theta)])
        amp = rng.uniform(0, 20) * rng.uniform(-1, 1, size=3)
        # sin(spatial + shift(t)) = sin(spatial)cos(shift) + cos(spatial)sin(shift): two
        # multiply-adds per pixel instead of a transcendental on the whole [T,S,S] volume.
        spatial = k[0] * xs[None, :] + k[1] * xs[:, None] + rng.uniform(0, 2 * np.pi)
        shift = -(k @ pan) * t
        wave = (np.sin(spatial).astype(np.float32)[None] * np.cos(shift).astype(np.float32)[:, None, None]
                + np.cos(spatial).astype(np.float32)[None] * np.sin(shift).astype(np.float32)[:, None, None])
        canvas += wave[..., None] * amp.astype(np.float32)
    return canvas


def _contrasting_colour(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """A random colour kept visibly different from the background's mean colour."""
    bg = canvas[0].reshape(-1, 3).mean(0)
    colour = rng.uniform(0, 255, size=3)
    if np.abs(colour - bg).max() < 70:
        colour = np.where(bg > 127, bg - rng.uniform(80, 120, 3), bg + rng.uniform(80, 120, 3))
    return np.clip(colour, 0, 255)


def _distractors(rng: np.random.Generator, canvas: np.ndarray, t: np.ndarray, xs: np.ndarray,
                 size: int, unit: float, count: int) -> None:
    """Small objects wandering along smooth random paths (slow sinusoids), spinning slowly."""
    for _ in range(count):
        paths = []
        for _axis in range(2):
            # Peak speed <= 2*pi*6/20 ~ 1.9 px/frame: distractors move at the same natural speeds
            # as actors, so "how fast is normal" (what playback-speed pre-training learns) holds.
            amp, period = rng.uniform(2, 6) * unit, rng.uniform(20, 40)
            paths.append(rng.uniform(0.15, 0.85) * size
                         + amp * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)))
        track = _Track(shape=str(rng.choice(_SHAPES)), colour=_contrasting_colour(rng, canvas),
                       radius=rng.uniform(2.0, 3.5) * unit, cx=paths[0], cy=paths[1],
                       angle=rng.uniform(0, 2 * np.pi) + rng.uniform(-0.06, 0.06) * t,
                       scale=np.ones(len(t)))
        _draw(canvas, track, xs)


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Add luminance noise (strength varies per video) and quantise to uint8."""
    # Mild: temporally white noise drowns the frame-to-frame differences that motion is made of.
    sigma = rng.uniform(0, 2)
    canvas += rng.standard_normal(canvas.shape[:3] + (1,), dtype=np.float32) * np.float32(sigma)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _reflect(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold an unbounded path into [lo, hi], i.e. bounce off the walls."""
    span = hi - lo
    q = np.mod(p - lo, 2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


# Motion primitives shared by the labelled classes and the pool, so the pool "covers the same kinds
# of dynamics". Each returns per-frame (cx, cy, angle, scale) for frames t, starting from (x0, y0);
# lengths are in 48-px pixels times ``unit``, paths bounce off the walls [lo, hi].


def _drift(rng, t, x0, y0, speed, lo, hi):
    """Constant speed along a random heading, bouncing off the walls (speed in px/frame)."""
    heading = rng.uniform(0, 2 * np.pi)
    return (_reflect(x0 + speed * np.cos(heading) * t, lo, hi),
            _reflect(y0 + speed * np.sin(heading) * t, lo, hi))


def _ramp(rng, t, x0, y0, top_speed, lo, hi, accelerate: bool):
    """Speed changing linearly between 0 and ``top_speed`` over the video, bouncing off walls."""
    frac = t / max(len(t) - 1, 1)
    distance = top_speed * len(t) * (frac**2 / 2 if accelerate else frac - frac**2 / 2)
    heading = rng.uniform(0, 2 * np.pi)
    return (_reflect(x0 + distance * np.cos(heading), lo, hi),
            _reflect(y0 + distance * np.sin(heading), lo, hi))


def _shake(rng, t, x0, y0, amplitude):
    """Tremor in place: an independent random offset every frame (high temporal frequency)."""
    offsets = rng.normal(0, amplitude, size=(2, len(t)))
    return x0 + offsets[0], y0 + offsets[1]


def _bounce(rng, t, x0, y0, height, period, lo, hi, unit):
    """Falls under gravity and bounces off a floor (parabolic arcs), drifting a little sideways."""
    phase = (t / period + rng.uniform(0, 1)) % 1.0
    cy = y0 + height / 2 - 4 * height * phase * (1 - phase)
    return _reflect(x0 + rng.uniform(-0.4, 0.4) * unit * t, lo, hi), cy


def _swing(rng, t, x0, y0, amplitude, period):
    """Oscillation along a random direction (a pendulum seen from the front)."""
    theta = rng.uniform(0, 2 * np.pi)
    wave = amplitude * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    return x0 + wave * np.cos(theta), y0 + wave * np.sin(theta)


def _spin(rng, t, degrees_per_frame):
    """Rotation in either direction (either, so a horizontal flip never changes the class)."""
    return rng.uniform(0, 2 * np.pi) + rng.choice([-1, 1]) * np.deg2rad(degrees_per_frame) * t


def _pulse(rng, t, amplitude, period):
    """Scale oscillating in log space: alternating grow and shrink phases."""
    return np.exp(amplitude * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)))


def _class_pose(name: str, rng: np.random.Generator, t: np.ndarray, size: int, unit: float):
    """Per-frame (cx, cy, angle, scale) of the actor for labelled class ``name``.

    Start points are uniform in the same central box for every class and paths bounce off the
    same walls, so where the actor is in any single frame says (almost) nothing about the class.
    """
    lo, hi = 0.2 * size, 0.8 * size
    x0, y0 = rng.uniform(lo, hi, size=2)
    cx, cy = x0 + 0 * t, y0 + 0 * t
    angle, scale = rng.uniform(0, 2 * np.pi) + 0 * t, np.ones_like(t)
    if name == "DriftSlow":
        cx, cy = _drift(rng, t, x0, y0, _log_uniform(rng, 0.35, 0.6) * unit, lo, hi)
    elif name == "DriftFast":
        cx, cy = _drift(rng, t, x0, y0, _log_uniform(rng, 1.4, 2.4) * unit, lo, hi)
    elif name == "SpinSlow":
        angle = _spin(rng, t, _log_uniform(rng, 2.5, 4.5))
    elif name == "SpinFast":
        angle = _spin(rng, t, _log_uniform(rng, 10, 16))
    elif name in ("SpeedUp", "SlowDown"):
        cx, cy = _ramp(rng, t, x0, y0, _log_uniform(rng, 2.0, 3.0) * unit, lo, hi, name == "SpeedUp")
    elif name == "Shake":
        cx, cy = _shake(rng, t, x0, y0, rng.uniform(0.8, 1.5) * unit)
    elif name == "Bounce":
        cx, cy = _bounce(rng, t, x0, y0, rng.uniform(12, 20) * unit, rng.uniform(14, 24), lo, hi, unit)
    elif name == "Swing":
        cx, cy = _swing(rng, t, x0, y0, rng.uniform(6, 10) * unit, rng.uniform(16, 28))
    elif name == "Pulse":
        scale = _pulse(rng, t, rng.uniform(0.3, 0.5), rng.uniform(10, 20))
    else:
        raise ValueError(f"unknown class {name!r}")
    return cx, cy, angle, scale


def _group_look(seed: int, class_index: int, group: int) -> dict:
    """What a group fixes (like one UCF101 actor): the actor's shape and size.

    Only that: when a group also fixed the scene and colours, its clips shared a look that
    identified the class on the training list, and every model (pre-trained or not) learnt the
    look instead of the motion and scored chance on the test groups. Shapes repeat across classes,
    so the shared shape is no shortcut.
    """
    rng = np.random.default_rng([seed, _KIND_GROUP, class_index, group])
    return {"shape": str(rng.choice(_SHAPES)), "radius": float(rng.uniform(6.0, 10.0))}


def render_labelled(preset: SyntheticPreset, seed: int, class_index: int, group: int, clip: int) -> np.ndarray:
    """Frames ``uint8 [T, S, S, 3]`` of labelled clip ``c<clip>`` of group ``g<group>``."""
    size, unit = preset.size, preset.size / 48.0
    look = _group_look(seed, class_index, group)
    t = np.arange(preset.frames, dtype=np.float64)
    xs = np.arange(size, dtype=np.float32) + np.float32(0.5)
    rng = np.random.default_rng([seed, _KIND_CLIP, class_index, group, clip])
    canvas = _background(rng, t, xs, unit)
    _distractors(rng, canvas, t, xs, size, unit, int(rng.integers(0, 3)))
    tempo = TEMPO_CLASSES.get(preset.classes[class_index])
    if tempo is not None:
        for i in range(int(rng.integers(1, 3))):
            track = _natural_actor(rng, t * tempo, canvas, size, unit)
            if i == 0:  # the group's "actor"
                track.shape, track.radius = look["shape"], look["radius"] * unit
            _draw(canvas, track, xs)
        return _finish(rng, canvas)
    cx, cy, angle, scale = _class_pose(preset.classes[class_index], rng, t, size, unit)
    colour = _contrasting_colour(rng, canvas)
    _draw(canvas, _Track(look["shape"], colour, look["radius"] * unit, cx, cy, angle, scale), xs)
    return _finish(rng, canvas)


def _natural_actor(rng: np.random.Generator, t: np.ndarray, canvas: np.ndarray, size: int, unit: float) -> _Track:
    """One actor moving by a random mixture of motion primitives, each at its natural tempo.

    ``t`` is the actor's own clock in frames: ``t = frame * k`` plays the same motion ``k`` times
    faster (what the tempo classes of the ``small`` preset are made of).
    """
    lo, hi = 0.2 * size, 0.8 * size
    x0, y0 = rng.uniform(lo, hi, size=2)
    cx, cy = x0 + 0 * t, y0 + 0 * t
    path = rng.choice(["drift", "drift", "ramp", "bounce", "swing", "still"])
    if path == "drift":
        cx, cy = _drift(rng, t, x0, y0, _log_uniform(rng, 0.6, 1.0) * unit, lo, hi)
    elif path == "ramp":  # pool videos are long: speed up (or slow down) every 64 frames
        cx, cy = _ramp(rng, t % 64, x0, y0, _log_uniform(rng, 1.2, 1.8) * unit, lo, hi, rng.random() < 0.5)
    elif path == "bounce":
        cx, cy = _bounce(rng, t, x0, y0, rng.uniform(12, 20) * unit, rng.uniform(20, 28), lo, hi, unit)
    elif path == "swing":
        cx, cy = _swing(rng, t, x0, y0, rng.uniform(6, 10) * unit, rng.uniform(24, 36))
    angle = rng.uniform(0, 2 * np.pi) + 0 * t
    if path == "still" or rng.random() < 0.4:
        angle = _spin(rng, t, _log_uniform(rng, 4, 7))
    scale = np.ones_like(t)
    if path == "still" or rng.random() < 0.3:
        scale = _pulse(rng, t, rng.uniform(0.3, 0.5), rng.uniform(20, 32))
    return _Track(str(rng.choice(_SHAPES)), _contrasting_colour(rng, canvas), rng.uniform(6.0, 10.0) * unit,
                  cx, cy, angle, scale)


def render_pool(preset: SyntheticPreset, seed: int, index: int) -> np.ndarray:
    """Frames of unlabelled video ``index``: 1-3 actors moving by random mixtures of primitives.

    Every primitive runs at one narrow *natural* tempo (drift 0.6-1.0 px/frame, spin 4-7
    deg/frame, ...). That is what makes playback speed predictable, and so what makes a
    playback-speed model learn to measure speed: a clip sampled at stride 2 looks like DriftFast,
    one whose objects move slower than ever seen naturally looks like DriftSlow. With speeds drawn
    over the classes' whole range instead, stride was unpredictable from the actors' motion and the
    pre-trained features carried no class information (linear probe at chance).
    """
    size, unit = preset.size, preset.size / 48.0
    rng = np.random.default_rng([seed, _KIND_POOL, index])
    t = np.arange(preset.pool_frames, dtype=np.float64)
    xs = np.arange(size, dtype=np.float32) + np.float32(0.5)
    canvas = _background(rng, t, xs, unit)
    _distractors(rng, canvas, t, xs, size, unit, int(rng.integers(0, 3)))
    for _actor in range(int(rng.integers(1, 4))):
        _draw(canvas, _natural_actor(rng, t, canvas, size, unit), xs)
    return _finish(rng, canvas)


# ---------------------------------------------------------------------------------------------
# Dataset layout
# ---------------------------------------------------------------------------------------------


def _video_name(cls: str, group: int, clip: int) -> str:
    return f"{cls}/v_{cls}_g{group:02d}_c{clip:02d}.avi"


def _write(path: Path, frames: np.ndarray, preset: SyntheticPreset) -> None:
    from sdtl.data.video_io import write_video

    write_video(path, frames, fps=preset.fps, codec=preset.codec, options=dict(ENCODER_OPTIONS))


def written_by_synth(out_dir: Path) -> bool:
    """True when ``out_dir`` is a dataset folder `sdtl synth` wrote (its meta.json says so)."""
    try:
        return json.loads((out_dir / "meta.json").read_text()).get("name") == "sdtl-synthetic"
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; choose another output folder", path=out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise DataError(f"{out_dir}: directory is not empty; replace a dataset sdtl synth wrote there with "
                            f"force=True (`sdtl synth --force`), or choose another output folder", path=out_dir)
        if not written_by_synth(out_dir):
            # force replaces only what `sdtl synth` wrote: never a folder of someone else's files.
            raise DataError(f"{out_dir}: not a dataset written by `sdtl synth` (no sdtl meta.json), so "
                            f"force will not replace it; nothing was deleted. Choose another output folder",
                            path=out_dir)
        foreign = _files_synth_did_not_write(out_dir)
        if foreign:
            raise DataError(f"{out_dir}: an `sdtl synth` dataset, but it also holds files synth did not "
                            f"write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), so force "
                            f"will not replace it; nothing was deleted. Move them out, or choose another output "
                            f"folder", path=out_dir)


def _files_synth_did_not_write(out_dir: Path) -> list[str]:
    """Files under a synth dataset that neither its meta.json nor its lists name (a user's additions)."""
    lists = out_dir / "lists"
    own = {"meta.json", *(f"lists/{n}" for n in ("classInd.txt", "trainlist01.txt", "testlist01.txt",
                                                  "unlabelled.txt"))}
    for name, prefix in (("trainlist01.txt", "videos/"), ("testlist01.txt", "videos/"), ("unlabelled.txt", "")):
        try:
            lines = (lists / name).read_text().splitlines()
        except OSError:
            continue
        own.update(prefix + line.split()[0] for line in lines if line.strip())
    found = (p for p in out_dir.rglob("*") if p.is_symlink() or not p.is_dir())
    return sorted(rel for rel in (p.relative_to(out_dir).as_posix() for p in found) if rel not in own)


def generate_synthetic(out_dir, preset: str = "small", seed: int = 0, force: bool = False,
                       progress=None, pool_size: int | None = None) -> Path:
    """Render and encode the dataset of ``preset`` into ``out_dir``; returns ``out_dir``.

    Refuses a non-empty ``out_dir`` unless ``force`` (then it is replaced only once the new data is
    complete). ``progress``, if given, is called as ``progress(done, total)`` after every video.
    ``pool_size`` renders only the first videos of the unlabelled pool (each is identical to the same
    video of the full pool): ``sdtl demo --quick`` needs a few for its retention probe, not 600.
    """
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    if pool_size is not None:
        if not 0 <= pool_size <= spec.pool_size:
            raise UserError(f"pool_size={pool_size}: must be between 0 and {spec.pool_size} for preset {preset}")
        spec = dataclasses.replace(spec, pool_size=int(pool_size))
    seed = int(seed)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling temp dir: same filesystem, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        total = len(spec.classes) * (spec.train_groups + spec.test_groups) * spec.clips_per_group + spec.pool_size
        done = 0
        train_lines, test_lines = [], []
        for ci, cls in enumerate(spec.classes):
            for group in range(1, spec.train_groups + spec.test_groups + 1):
                for clip in range(1, spec.clips_per_group + 1):
                    name = _video_name(cls, group, clip)
                    _write(tmp / "videos" / name, render_labelled(spec, seed, ci, group, clip), spec)
                    if group <= spec.train_groups:
                        train_lines.append(f"{name} {ci + 1}")
                    else:
                        test_lines.append(name)
                    done += 1
                    if progress:
                        progress(done, total)
        pool_lines = []
        for index in range(spec.pool_size):
            rel = f"unlabelled/pool_{index:05d}.avi"
            _write(tmp / rel, render_pool(spec, seed, index), spec)
            pool_lines.append(rel)
            done += 1
            if progress:
                progress(done, total)
        lists = tmp / "lists"
        lists.mkdir()
        (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(spec.classes)))
        (lists / "trainlist01.txt").write_text("".join(line + "\n" for line in train_lines))
        (lists / "testlist01.txt").write_text("".join(line + "\n" for line in test_lines))
        (lists / "unlabelled.txt").write_text("".join(line + "\n" for line in pool_lines))
        meta = {
            "name": "sdtl-synthetic",
            "generator_version": GENERATOR_VERSION,
            "preset": asdict(spec),
            "seed": seed,
            "classes": [{"index": i + 1, "name": c, "motion": CLASS_MOTIONS[c]} for i, c in enumerate(spec.classes)],
            "counts": {"train": len(train_lines), "test": len(test_lines), "unlabelled": len(pool_lines),
                       "train_per_class": spec.train_per_class, "test_per_class": spec.test_per_class},
            "groups": {"train": [f"g{g:02d}" for g in range(1, spec.train_groups + 1)],
                       "test": [f"g{g:02d}" for g in range(spec.train_groups + 1,
                                                            spec.train_groups + spec.test_groups + 1)]},
            "frames": spec.frames, "pool_frames": spec.pool_frames, "height": spec.size, "width": spec.size,
            "fps": spec.fps, "codec": spec.codec, "encoder_options": ENCODER_OPTIONS, "container": "avi",
            "layout": {"videos": "videos", "lists": "lists", "unlabelled": "unlabelled"},
        }
        # No timestamps or timings in meta.json: it must be identical for identical (preset, seed).
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():  # only reachable with force=True
            _check_out_dir(out_dir, force)  # again: files may have been added while the new data rendered
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``sdtl synth`` to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "synth", help="generate the embedded synthetic action-video dataset",
        description="Render a deterministic synthetic action dataset (classes defined by motion, "
                    "appearance as nuisance) as H.264 .avi files in UCF101 layout, with a large "
                    "unlabelled pool for pre-training.")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must be empty or absent)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="dataset size (default: small)")
    parser.add_argument("--seed", default=0, type=int, help="generation seed (default: 0)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="render only the first N unlabelled pool videos (default: the preset's full pool)")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds a dataset sdtl synth wrote (anything else is refused)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    spec = PRESETS.get(args.preset)
    started = time.perf_counter()
    out = generate_synthetic(args.out, preset=args.preset, seed=args.seed, force=args.force,
                             pool_size=args.pool_size)
    print(f"sdtl synth: wrote preset {args.preset!r} (seed {args.seed}) to {out}: "
          f"{len(spec.classes)} classes, {spec.train_per_class}+{spec.test_per_class} train+test videos per "
          f"class, {spec.pool_size if args.pool_size is None else args.pool_size} unlabelled, in {time.perf_counter() - started:.1f} s")
    return 0
