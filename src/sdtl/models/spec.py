"""What one encoder *is*, declared beside its code: :class:`EncoderSpec` and its :class:`InputSpec`.

timm keeps a pretrained config and a group matcher next to each model, torchvision a ``Weights`` enum
with its transforms and meta; sdtl's encoders carry one ``EncoderSpec`` each (``SPECS`` in the encoder's
module). Everything the rest of sdtl needs to know about an arch is asked of its spec:

* the input (:class:`InputSpec`): default frames and crop, mean/std, minimum or fixed sizes and
  multiples. :meth:`InputSpec.check` refuses a size the model cannot take *before* any video is decoded;
* ``depth_of(name)``: the depth id of an encoder parameter for layer-wise lr decay (0 = stem or
  embeddings, then one id per stage of a CNN or per block of a ViT), or ``None`` for a parameter trained
  with the head at the full lr (VideoMAE's ``fc_norm``); raises ``ValueError`` for a name it does not know;
* ``no_weight_decay(name, param)``: parameters that get no weight decay (transformers: norms, biases,
  position embeddings, class tokens, relative position tables);
* ``feature_layers(encoder)``: DELTA's default layers, module names whose *output is a 5-D map*
  ``[B, C, T, H, W]`` (CNNs: convolutions; transformers: :class:`FeatureTap` modules that present a
  block's tokens as a channel-first map);
* ``source_classifier``: key prefixes of the source model's own classifier, dropped when loading;
* ``adapt_checkpoint(obj, source=...)``: turns a foreign checkpoint layout (a release file; a Hugging Face folder,
  which :func:`sdtl.models.checkpoints.safe_load` reads as ``{"hf_config": dict, "state_dict": tensors}``)
  into ``(format name, encoder state dict, {ignored key group: count})``; returns ``None`` for a layout
  it does not know (the generic path then runs). Loading stays strict: every key is checked after it;
* ``width_probes``: ``(key, reference channels)`` pairs whose shape reveals ``width`` (scalable archs).

Only :mod:`sdtl.models` knows arch names; :data:`sdtl.models.ARCH_NAMES` is a torch-free copy of the
registered names that a test keeps equal to :func:`sdtl.models.registry.specs`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdtl.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)  # torchvision's VideoClassification preset (K400 video models)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


@dataclass(frozen=True)
class InputSpec:
    """The clips an encoder takes: ``[B, 3, frames, size, size]`` normalised with ``mean``/``std``.

    ``frames``/``size`` are the defaults (a recipe or ``--set data.clip_len/size`` may override them within
    the limits); ``fixed_*`` pin a value (MViT's hard-coded token grid), ``min_*`` bound it from below
    (S3D's non-adaptive pooling), ``*_multiple`` ask for a multiple (a ViT's tubelet and patch).
    """

    frames: int = 16
    size: int = 112
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    min_frames: int = 1
    min_size: int = 8
    fixed_frames: int | None = None
    fixed_size: int | None = None
    frame_multiple: int = 1
    size_multiple: int = 1

    def problems(self, frames: int, size: int) -> list[tuple[str, str]]:
        """``[(config key, what is wrong and the valid values)]`` for clips of ``frames`` x ``size``²."""
        out = []
        for key, value, fixed, low, multiple in (
                ("data.clip_len", frames, self.fixed_frames, self.min_frames, self.frame_multiple),
                ("data.size", size, self.fixed_size, self.min_size, self.size_multiple)):
            if fixed is not None and value != fixed:
                out.append((key, f"{value} is not accepted; this encoder takes exactly {fixed}"))
            elif value < low:
                out.append((key, f"{value} is too small; this encoder needs >= {low}"))
            elif value % multiple:
                out.append((key, f"{value} is not a multiple of {multiple}; use e.g. "
                                 f"{max(multiple, value // multiple * multiple)}"))
        return out

    def check(self, frames: int, size: int, arch: str) -> None:
        """Raise :class:`ConfigError` naming the first bad key unless the clips fit."""
        problems = self.problems(frames, size)
        if problems:
            key, problem = problems[0]
            raise ConfigError(key, f"{problem} (model.arch={arch})",
                              "set it within those limits, or leave it unset for the encoder's default "
                              f"({self.frames} frames x {self.size} px)")


def no_decay_none(name: str, param) -> bool:
    """CNN default: every parameter is decayed (RSPNet's and the paper's recipe)."""
    return False


def no_decay_transformer(name: str, param) -> bool:
    """VideoMAE / timm convention: no decay on 1-D parameters (norms, biases), position embeddings,
    class tokens and relative position tables."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf in {"pos_embed", "class_token", "cls_token", "pos_embedding"} or \
        "relative_position" in name or "rel_pos" in name


@dataclass(frozen=True)
class EncoderSpec:
    """One arch: how to build it (``build(**options)``, random weights) and what it is."""

    name: str
    build: Callable[..., Any]  # -> nn.Module
    description: str
    input: InputSpec
    depth_of: Callable[[str], int | None]
    feature_layers: Callable[[Any], list[str]]  # encoder -> module names
    no_weight_decay: Callable[[str, Any], bool] = no_decay_none
    source_classifier: tuple[str, ...] = ()
    adapt_checkpoint: Callable[..., tuple[str, dict, dict] | None] | None = None  # (obj, source=path)
    width_probes: tuple[tuple[str, int], ...] = ()
    feature_dim: int = 0  # of the published size (README table); the built module's .feature_dim rules
    weights: str = ""  # where released weights come from (README table)
    kinetics_acc1: str = ""  # published Kinetics-400 top-1 with its source, "" when none
    variants: dict[str, InputSpec] = field(default_factory=dict)  # option variant=name -> its input

    def input_of(self, options: dict | None = None) -> InputSpec:
        """The input of the encoder built with ``options`` (a ``variant`` may take other clips)."""
        return self.variants.get((options or {}).get("variant", ""), self.input)


def __getattr__(name: str):
    # FeatureTap is a torch module; this module stays importable without torch (configs read specs' constants).
    if name == "FeatureTap":
        from sdtl.models.taps import FeatureTap

        return FeatureTap
    raise AttributeError(f"module 'sdtl.models.spec' has no attribute {name!r}")
