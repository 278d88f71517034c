"""The pretext tasks, declared once: ``task.name`` → :class:`PretextSpec`.

Derived from :data:`PRETEXT`, never listed again: the valid ``task.name`` values (:func:`names`), the
config's ``task`` section (:func:`section_class`: ``name`` plus every task's keys, flat, as recipes,
``--set`` and the config.yaml of existing runs spell them), which task reads which key
(:func:`task_keys`), and a section's validated options (:func:`options_of`).

Adding a pretext task = its module in :mod:`sdtl.pretext` (sampling and loss), its options dataclass
(:mod:`sdtl.pretext.options`), one line here, and its task builder in :mod:`sdtl.engine.pretrain`
(``TASK_BUILDERS``: what the training loop runs). Torch-free.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from sdtl.errors import ConfigError
from sdtl.option_keys import OptionKey, flat_keys
from sdtl.pretext.options import PretextOptions, RSPNetOptions, SpeedOptions


@dataclass(frozen=True)
class PretextSpec:
    options: type[PretextOptions]
    help: str  # one line, for --help texts and docs


PRETEXT: dict[str, PretextSpec] = {
    "speed": PretextSpec(SpeedOptions, "classify the frame stride (playback speed) a clip was sampled with (Pace)"),
    "rspnet": PretextSpec(RSPNetOptions, "RSPNet: relative speed perception + appearance instance discrimination, "
                                         "with a momentum key network and a queue"),
}
DEFAULT = "speed"


def names() -> tuple[str, ...]:
    return tuple(PRETEXT)


def _keys() -> dict[str, OptionKey]:
    """The ``task`` section's option keys, in registry order; one key is one declaration."""
    return flat_keys("task", ((name, spec.options) for name, spec in PRETEXT.items()), ("name",), "pretext task")


def task_keys() -> dict[str, tuple[str, ...]]:
    """Which ``task.name`` values read each ``task`` key."""
    return {k: key.users for k, key in _keys().items()}


def section_class(module: str) -> type:
    """The config's ``task`` section as a dataclass: ``name`` (default :data:`DEFAULT`) and every
    registered task's keys at their defaults (a key of another task set away from its default is
    refused by the config's validation: it would do nothing)."""
    fields = [("name", str, dataclasses.field(default=DEFAULT))]
    fields += [(k, key.type, dataclasses.field(default_factory=key.default)) for k, key in _keys().items()]
    cls = dataclasses.make_dataclass("PretrainTaskConfig", fields)
    cls.__module__, cls.__qualname__ = module, "PretrainTaskConfig"
    cls.__doc__ = "The pretext task: " + "; ".join(f"`{n}`: {s.help}" for n, s in PRETEXT.items()) + "."
    return cls


def options_of(section) -> PretextOptions:
    """The named task's validated options from a ``task`` section (ConfigError naming ``task.<key>``)."""
    if section.name not in PRETEXT:
        raise ConfigError("task.name", f"{section.name!r} is not one of {', '.join(PRETEXT)}")
    spec = PRETEXT[section.name]
    return spec.options(**{f.name: copy.deepcopy(getattr(section, f.name)) for f in dataclasses.fields(spec.options)})
