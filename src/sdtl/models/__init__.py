"""Video encoders, the fine-tuning classifier, and checkpoint loading.

- :mod:`sdtl.models.c3d`, :mod:`sdtl.models.r2plus1d_vcop`: RSPNet's released layouts (exact names).
- :mod:`sdtl.models.torchvision_video`: torchvision's r2plus1d_18 / r3d_18 / mc3_18 as encoders.
- :mod:`sdtl.models.torchvision_modern`: torchvision's S3D, MViT (v1-B, v2-S) and Swin3D (T/S/B).
- :mod:`sdtl.models.videomae`: VideoMAE ViT-S/B (joint space-time attention, mean pooling + fc_norm).
- :mod:`sdtl.models.spec` / :mod:`sdtl.models.registry`: each encoder's ``EncoderSpec`` and the registry.
- :mod:`sdtl.models.classifier`: ``VideoClassifier``, ``build_encoder``, ``build_model``, ``list_archs``.
- :mod:`sdtl.models.checkpoints`: safe loading, format detection, strict backbone loading, atomic save.
"""
from __future__ import annotations

import importlib

# Arch names a config or CLI may use (the encoder modules' SPECS define them; a test keeps the two
# equal). Here so that `sdtl --help` can list them without importing torch.
ARCH_NAMES = ("c3d", "r2plus1d_vcop", "r2plus1d_18", "r3d_18", "mc3_18", "s3d", "mvit_v1_b", "mvit_v2_s",
              "swin3d_t", "swin3d_s", "swin3d_b", "videomae_vit_s", "videomae_vit_b")

_WHERE = {
    "C3D": "c3d", "R2Plus1DVCOP": "r2plus1d_vcop", "TorchvisionVideoEncoder": "torchvision_video",
    "EncoderSpec": "spec", "InputSpec": "spec", "specs": "registry", "spec_of": "registry",
    "VideoClassifier": "classifier", "build_encoder": "classifier",
    "build_model": "classifier", "list_archs": "classifier",
    **{name: "checkpoints" for name in ("LoadReport", "build_model_from_checkpoint", "describe_checkpoint",
                                        "detect_format", "export_encoder", "extract_backbone_state",
                                        "load_encoder_weights", "safe_load", "save_checkpoint")},
}


def __getattr__(name: str):
    # Imported on first use, so that `sdtl --help` does not import torch.
    if name in _WHERE:
        return getattr(importlib.import_module(f"sdtl.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'sdtl.models' has no attribute {name!r}")


__all__ = [
    "ARCH_NAMES",
    "C3D",
    "EncoderSpec",
    "InputSpec",
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
    "spec_of",
    "specs",
]
