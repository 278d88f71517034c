"""The regularizer family, declared once: ``regularizer.name`` → :class:`RegSpec`.

Everything else about the family is derived from :data:`REGULARIZERS`, never listed again:

* the config's valid names (:func:`names`) and, from the options dataclasses, the flat keys of the
  ``regularizer`` section with their types, defaults and allowed values (:func:`option_keys`) and
  which method reads which key (:func:`method_keys`);
* the penalties' metric names, plotted and printed (:func:`metric_parts`);
* the line naming a run's method (:func:`describe`) and the regularizer a run trains with
  (:func:`build_regularizer`).

Adding a regularizer = its own module (an ``nn.Module`` subclass of
:class:`~sdtl.regularizers.base.Regularizer`), its torch-free options dataclass (a
:class:`~sdtl.regularizers.options.base.RegularizerOptions`) and one line here.

This module and the options are torch-free: the config reads them, and ``sdtl --help`` must not
pay torch's import time. A spec names its class as ``"module:Class"``, imported when a run builds it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from sdtl.option_keys import OptionKey, flat_keys
from sdtl.regularizers.options.base import RegularizerOptions
from sdtl.regularizers.options.bss import BSSOptions
from sdtl.regularizers.options.delta import DELTAOptions
from sdtl.regularizers.options.ema import EMAOptions
from sdtl.regularizers.options.fixed_teacher import FixedTeacherOptions
from sdtl.regularizers.options.l2sp import L2SPOptions
from sdtl.regularizers.options.self_distillation import SDOptions

#: ``regularizer.name`` of plain fine-tuning (no regularizer is built; so is every name with weight 0)
NONE = "none"
PLAIN = "plain fine-tuning (no regularizer)"


@dataclass(frozen=True)
class RegSpec:
    """One regularizer: its class, its options, the name of its penalty and a line of help."""

    cls: type | str  # the Regularizer subclass, or "module:Class" (imported when first built: torch)
    options: type[RegularizerOptions]
    part: str  # the penalty's metric name: train_<part> in metrics.jsonl, plotted and printed
    help: str  # one line, for --help texts and study tables
    weight_grid: tuple[str, ...] = ()  # values of regularizer.weight a comparison tries (docs/compare.md)

    def load(self) -> type:
        if isinstance(self.cls, str):
            module, _, attr = self.cls.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.cls


REGULARIZERS: dict[str, RegSpec] = {
    "sd": RegSpec("sdtl.regularizers.self_distillation:SelfDistillation", SDOptions, "sd",
                  "self-distillation from the previous epoch's encoder (the paper)", ("0.3", "1", "3")),
    "fixed_teacher": RegSpec("sdtl.regularizers.fixed_teacher:FixedTeacherDistillation", FixedTeacherOptions,
                             "fixed_teacher", "distillation from the fixed pre-trained encoder", ("0.3", "1", "3")),
    "ema_sd": RegSpec("sdtl.regularizers.ema:EMASelfDistillation", EMAOptions, "ema_sd",
                      "self-distillation from an EMA teacher", ("0.3", "1", "3")),
    "l2sp": RegSpec("sdtl.regularizers.l2sp:L2SP", L2SPOptions, "l2sp",
                    "L2-SP: weights stay near their pre-trained values", ("0.1", "1", "10")),
    "delta": RegSpec("sdtl.regularizers.delta:DELTA", DELTAOptions, "delta",
                     "DELTA: attention-weighted feature maps stay near the pre-trained encoder's",
                     ("0.001", "0.003", "0.01")),
    "bss": RegSpec("sdtl.regularizers.bss:BSS", BSSOptions, "bss",
                   "BSS: shrink the smallest singular values of the batch's features", ("0.1", "1", "10")),
}


# ------------------------------------------------------------------------------------- derived
def names() -> tuple[str, ...]:
    """Valid values of ``regularizer.name``: ``none`` and every registered regularizer."""
    return (NONE, *REGULARIZERS)


def spec_of(name: str) -> RegSpec:
    try:
        return REGULARIZERS[name]
    except KeyError:
        raise ValueError(f"regularizer.name: {name!r} is not one of {', '.join(names())}") from None


_memo: tuple[tuple, dict[str, OptionKey]] | None = None


def option_keys() -> dict[str, OptionKey]:
    """Every options key of every registered regularizer (registry order, first declaration first).

    A key read by several methods (``teacher_bn``, ``head_weight``) must be declared alike by all
    of them (type, default, choices): it is one config key.
    """
    global _memo
    snapshot = tuple(REGULARIZERS.items())
    if _memo is None or _memo[0] != snapshot:
        keys = flat_keys("regularizer", ((name, spec.options) for name, spec in snapshot), ("name", "weight"),
                         "regularizer")
        _memo = (snapshot, keys)
    return _memo[1]


def method_keys() -> dict[str, tuple[str, ...]]:
    """Which regularizers read which options key (``name`` and ``weight``: all of them)."""
    return {k: key.users for k, key in option_keys().items()}


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the ``regularizer`` section's string keys: ``name`` and the options' choices."""
    return {"name": names(), **{k: key.choices for k, key in option_keys().items() if key.choices}}


def metric_parts() -> tuple[str, ...]:
    """metrics.jsonl keys of the registered regularizers' penalties (``train_<part>``)."""
    return tuple(f"train_{spec.part}" for spec in REGULARIZERS.values())


def describe(reg_cfg) -> str:
    """One line naming the regularizer of ``reg_cfg`` (a config's ``regularizer`` section)."""
    if reg_cfg.name == NONE or reg_cfg.weight == 0:
        return PLAIN
    return reg_cfg.options.describe(reg_cfg.weight)


def build_regularizer(reg_cfg, encoder, head):
    """The regularizer of ``reg_cfg`` (a :class:`~sdtl.engine.config.RegularizerConfig`) on this
    encoder and head, or None for plain fine-tuning (``name: none`` or ``weight: 0``).

    Built when fine-tuning starts, so every frozen reference is the encoder as loaded (pre-trained).
    Raises ValueError for an unknown name or an option out of range.
    """
    if reg_cfg.name == NONE or reg_cfg.weight == 0:
        return None
    spec = spec_of(reg_cfg.name)
    reg = spec.load().from_options(encoder, head, reg_cfg.weight, reg_cfg.options)
    if reg.part != spec.part:
        raise TypeError(f"regularizer {reg_cfg.name}: {type(reg).__name__}.part is {reg.part!r} but the registry "
                        f"declares {spec.part!r}; its penalty would be logged under a name nothing plots")
    return reg
