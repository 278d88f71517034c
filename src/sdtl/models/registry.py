"""The arch registry: every encoder module's ``SPECS``, by name (the one place that lists the modules).

Adding an encoder: write a module whose encoder has ``forward(x[B,3,T,H,W]) -> [B, D]`` and
``.feature_dim`` (see :mod:`sdtl.models.spec` for the rest) and ends with ``SPECS = (EncoderSpec(...),)``,
then add the module's name to ``_MODULES`` and its arch names to :data:`sdtl.models.ARCH_NAMES`.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

from sdtl.errors import ConfigError
from sdtl.models.spec import EncoderSpec

_MODULES = ("c3d", "r2plus1d_vcop", "torchvision_video", "torchvision_modern", "videomae")


@lru_cache(maxsize=1)
def specs() -> dict[str, EncoderSpec]:
    """Every registered arch's spec, in registration order."""
    out: dict[str, EncoderSpec] = {}
    for module in _MODULES:
        for spec in importlib.import_module(f"sdtl.models.{module}").SPECS:
            if spec.name in out:
                raise RuntimeError(f"arch {spec.name!r} registered twice")
            out[spec.name] = spec
    return out


def spec_of(arch: str, key: str = "model.arch") -> EncoderSpec:
    """The spec of ``arch``; an unknown name is a :class:`ConfigError` on ``key`` listing the valid ones."""
    found = specs().get(arch)
    if found is None:
        raise ConfigError(key, f"{arch!r} is not a known encoder", f"valid archs: {', '.join(specs())}")
    return found


def spec_of_encoder(encoder) -> EncoderSpec:
    """The spec of an encoder built by :func:`sdtl.models.classifier.build_encoder` (it records its arch)."""
    arch = getattr(encoder, "sdtl_arch", None)
    if arch is None:
        raise ValueError(f"{type(encoder).__name__}: not built by sdtl.models.build_encoder (no sdtl_arch)")
    return spec_of(arch)
