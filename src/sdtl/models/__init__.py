"""Video encoders, the fine-tuning classifier, and checkpoint loading.

- :mod:`sdtl.models.c3d`, :mod:`sdtl.models.r2plus1d_vcop`: RSPNet's released layouts (exact names).
- :mod:`sdtl.models.torchvision_video`: torchvision's r2plus1d_18 / r3d_18 / mc3_18 as encoders.
- :mod:`sdtl.models.classifier`: ``VideoClassifier``, ``build_encoder``, ``build_model``, ``list_archs``.
- :mod:`sdtl.models.checkpoints`: safe loading, format detection, strict backbone loading, atomic save.
"""
from __future__ import annotations

from sdtl.models.c3d import C3D
from sdtl.models.checkpoints import (
    LoadReport,
    build_model_from_checkpoint,
    describe_checkpoint,
    detect_format,
    export_encoder,
    extract_backbone_state,
    load_encoder_weights,
    safe_load,
    save_checkpoint,
)
from sdtl.models.classifier import ARCHS, VideoClassifier, build_encoder, build_model, list_archs
from sdtl.models.r2plus1d_vcop import R2Plus1DVCOP
from sdtl.models.torchvision_video import TorchvisionVideoEncoder

__all__ = [
    "ARCHS",
    "C3D",
    "LoadReport",
    "R2Plus1DVCOP",
    "TorchvisionVideoEncoder",
    "VideoClassifier",
    "build_encoder",
    "build_model",
    "build_model_from_checkpoint",
    "describe_checkpoint",
    "detect_format",
    "export_encoder",
    "extract_backbone_state",
    "list_archs",
    "load_encoder_weights",
    "safe_load",
    "save_checkpoint",
]
