"""The flat keys of a config section whose methods each declare their options as a dataclass.

The ``regularizer`` section (one options dataclass per regularizer) and the ``task`` section (one per
pretext task) are both read and written flat (``regularizer.k``, ``task.strides``): every key of every
registered method, each declared once. :func:`flat_keys` derives them, in registry order, and refuses a
key that two methods declare differently (type, default or choices) or that the section itself owns.
Torch-free (the config reads it at ``sdtl --help`` time).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class OptionKey:
    """One flat key of a section, as the options dataclasses declare it."""

    name: str
    type: typing.Any  # the resolved annotation: int, float, str, list[str], ...
    field: dataclasses.Field
    users: tuple[str, ...]  # the methods that read it, in registry order

    @property
    def choices(self) -> tuple[str, ...] | None:
        return self.field.metadata.get("choices")

    def default(self):
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return copy.deepcopy(self.field.default)


def flat_keys(section: str, methods: Iterable[tuple[str, type]], reserved: tuple[str, ...],
              what: str) -> dict[str, OptionKey]:
    """Every option key of ``methods`` (``(name, options dataclass)`` in registry order), first
    declaration first. ``reserved``: the section's own keys (``name``, ...), which no method may declare;
    ``what``: the methods' kind, for the message."""
    declared: dict[str, tuple[typing.Any, dataclasses.Field]] = {}
    users: dict[str, list[str]] = {}
    for name, options in methods:
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            if not f.init:
                continue
            if f.name in reserved:
                raise TypeError(f"{options.__name__}.{f.name}: {section}.{f.name} is common to every {what} and "
                                f"cannot be an option")
            if f.name in declared:
                tp, first = declared[f.name]
                same = (tp == hints[f.name] and first.metadata.get("choices") == f.metadata.get("choices")
                        and OptionKey(f.name, tp, first, ()).default() == OptionKey(f.name, tp, f, ()).default())
                if not same:
                    raise TypeError(f"{section}.{f.name} is declared differently by {users[f.name][0]} and "
                                    f"{name} (type, default or choices): one config key needs one declaration")
            else:
                declared[f.name] = (hints[f.name], f)
            users.setdefault(f.name, []).append(name)
    return {k: OptionKey(k, tp, f, tuple(users[k])) for k, (tp, f) in declared.items()}
