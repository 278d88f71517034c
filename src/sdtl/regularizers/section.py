"""The config's ``regularizer`` section: ``name``, ``weight`` and every registered method's flat keys.

Torch-free (the config module imports it at ``sdtl --help`` time).
"""
from __future__ import annotations

import copy
import dataclasses

from sdtl.regularizers import registry


class RegularizerConfig:
    """What keeps the encoder near what it knew: ``name`` (the paper's self-distillation ``sd`` by
    default, ``none``, or another member of the family in
    :data:`sdtl.regularizers.registry.REGULARIZERS`), ``weight`` (the penalty's multiplier: λ, α or
    η; 0 = plain fine-tuning) and the named method's :attr:`options` (its typed, validated dataclass).

    Read and written with *flat* keys (``regularizer.k``, ``regularizer.teacher_bn``, ...), as
    recipes, ``--set`` and the config.yaml of existing runs spell them. It holds every registered
    method's keys, at their defaults unless set, so one section can be swept over
    ``regularizer.name``; :func:`validate_ranges` refuses a key of another method set to a
    non-default value (it would do nothing). ``RegularizerConfig(name="bss", weight=0.1, k=2)``.
    """

    def __init__(self, name: str = "sd", weight: float = 0.0, **keys) -> None:
        known = registry.option_keys()
        unknown = sorted(set(keys) - set(known))
        if unknown:
            raise TypeError(f"RegularizerConfig: unknown key {unknown[0]!r}; valid keys are: name, weight, "
                            f"{', '.join(known)}")
        self.name = name
        self.weight = weight
        self._values = {k: keys[k] if k in keys else key.default() for k, key in known.items()}

    def __getattr__(self, key: str):  # only for what normal lookup does not find: the option keys
        values = self.__dict__.get("_values")
        if values is not None and not key.startswith("__"):
            if key in values:
                return values[key]
            known = registry.option_keys().get(key)
            if known is not None:  # registered after this config was made
                return known.default()
        raise AttributeError(f"{type(self).__name__} has no key {key!r}")

    def __setattr__(self, key: str, value) -> None:
        if key in ("name", "weight", "_values"):
            object.__setattr__(self, key, value)
        elif key in registry.option_keys():
            self._values[key] = value
        else:
            raise AttributeError(f"{type(self).__name__} has no key {key!r}")

    def to_dict(self) -> dict:
        """The flat section as written to config.yaml: name, weight, then every registered key."""
        return {"name": self.name, "weight": self.weight,
                **{k: copy.deepcopy(getattr(self, k)) for k in registry.option_keys()}}

    def options_for(self, name: str):
        """The options dataclass of regularizer ``name`` from this section's keys (validated:
        ValueError naming ``regularizer.<key>``)."""
        spec = registry.spec_of(name)
        return spec.options(**{f.name: copy.deepcopy(getattr(self, f.name))
                               for f in dataclasses.fields(spec.options) if f.init})

    @property
    def options(self):
        """The named regularizer's options (None for ``none``)."""
        return None if self.name == registry.NONE else self.options_for(self.name)

    def __eq__(self, other) -> bool:
        return isinstance(other, RegularizerConfig) and self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self) -> str:
        return f"RegularizerConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"
