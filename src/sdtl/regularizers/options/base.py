"""What every regularizer's options dataclass offers: self-validation and a one-line description.

An options dataclass lists the keys of the config's ``regularizer`` section one method reads (the
field names *are* the flat config keys: ``regularizer.<field>``), with their types and defaults. It
checks itself when built (``__post_init__``: a :class:`ValueError` that names the key as
``regularizer.<key>`` and its valid range) and names the method in one line (:meth:`describe`).
Torch-free: the config imports it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def choice(default: str, choices: tuple[str, ...]):
    """A string option restricted to ``choices`` (checked when a config is read, and when built)."""
    return field(default=default, metadata={"choices": tuple(choices)})


def need(cond: bool, key: str, rule: str, value) -> None:
    """Raise ``ValueError("regularizer.<key>: <rule> (got <value>)")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"regularizer.{key}: {rule} (got {value!r})")


@dataclass
class RegularizerOptions:
    """Base class. Subclasses declare their keys as fields and override :meth:`check` and
    :meth:`describe` (and :meth:`check_run` for rules involving other sections)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise ValueError(f"regularizer.{f.name}: {value!r} is not one of {', '.join(allowed)}")
        self.check()

    def check(self) -> None:
        """Range checks of this method's keys (raise with :func:`need`)."""

    def check_run(self, cfg) -> None:
        """Rules against the rest of a run's config (e.g. ``data.batch_size``); none by default."""

    def describe(self, weight: float) -> str:
        """The method in one line, for the run's log (``weight`` is λ, α or η, > 0)."""
        raise NotImplementedError
