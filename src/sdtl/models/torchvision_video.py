"""torchvision's video ResNets (``r2plus1d_18``, ``r3d_18``, ``mc3_18``) as sdtl encoders.

The networks are torchvision's own ``VideoResNet`` built from its own blocks, never with downloaded
weights (``weights=None`` semantics): Kinetics-400 weights are loaded from a file the user points at,
through :func:`sdtl.models.checkpoints.load_encoder_weights`. The classifier ``fc`` is replaced by an
``Identity`` so ``forward`` returns the pooled 512-d feature and the state-dict keys are exactly
torchvision's minus ``fc.*`` (a torchvision weight file then loads strictly once ``fc.*`` is dropped).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video.resnet import (
    BasicBlock,
    BasicStem,
    Conv2Plus1D,
    Conv3DNoTemporal,
    Conv3DSimple,
    R2Plus1dStem,
    VideoResNet,
)

from sdtl.errors import UserError

# The same (block, conv makers, layers, stem) torchvision's r2plus1d_18 / r3d_18 / mc3_18 use.
_SPECS = {
    "r2plus1d_18": (BasicBlock, [Conv2Plus1D] * 4, [2, 2, 2, 2], R2Plus1dStem),
    "r3d_18": (BasicBlock, [Conv3DSimple] * 4, [2, 2, 2, 2], BasicStem),
    "mc3_18": (BasicBlock, [Conv3DSimple] + [Conv3DNoTemporal] * 3, [2, 2, 2, 2], BasicStem),
}


class TorchvisionVideoEncoder(VideoResNet):
    """A torchvision ``VideoResNet`` without its classifier: ``forward(x) -> [B, 512]``."""

    def __init__(self, name: str):
        if name not in _SPECS:
            raise UserError(f"torchvision video arch {name!r}: unknown; valid: {', '.join(_SPECS)}")
        block, conv_makers, layers, stem = _SPECS[name]
        super().__init__(block, conv_makers, layers, stem)
        self.name = name
        self.feature_dim = 512 * block.expansion
        # Identity has no parameters, so no ``fc.*`` keys remain in the state dict.
        self.fc = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before pooling: ``[B, 512, T', H/16, W/16]``; T' = T/8 except mc3_18 (T)."""
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``[B, 512]``."""
        return self.avgpool(self.forward_features(x)).flatten(1)


def r2plus1d_18() -> TorchvisionVideoEncoder:
    """torchvision R(2+1)D-18 (31.3M parameters), classifier removed."""
    return TorchvisionVideoEncoder("r2plus1d_18")


def r3d_18() -> TorchvisionVideoEncoder:
    """torchvision R3D-18 (33.2M parameters), classifier removed."""
    return TorchvisionVideoEncoder("r3d_18")


def mc3_18() -> TorchvisionVideoEncoder:
    """torchvision MC3-18 (11.5M parameters), classifier removed."""
    return TorchvisionVideoEncoder("mc3_18")


def _depth_of(name: str) -> int:
    # stem = 0, layer1..layer4 = stages 1..4
    top = name.split(".")[0]
    if top == "stem":
        return 0
    if top.startswith("layer") and top[5:].isdigit():
        return int(top[5:])
    raise ValueError(f"torchvision VideoResNet parameter {name!r}: not part of a stage")


def _feature_layers(encoder: nn.Module) -> list[str]:
    # DELTA: each stage's last block's second conv, before its BatchNorm (conv2 = Sequential(conv, BN))
    names = dict(encoder.named_modules())
    return [f"layer{i}.{len(names[f'layer{i}']) - 1}.conv2.0" for i in range(1, 5)]


def _spec(name: str, build, params: str, acc: str):
    from sdtl.models.spec import KINETICS_MEAN, KINETICS_STD, EncoderSpec, InputSpec

    return EncoderSpec(
        name=name, build=build, description=f"torchvision {params} params, 512-d; Kinetics-400 weights' mean/std",
        # torchvision's VideoClassification preset for these weights: 112 px crops of 16 frames (its own
        # Kinetics statistics, not ImageNet's)
        input=InputSpec(frames=16, size=112, mean=KINETICS_MEAN, std=KINETICS_STD),
        depth_of=_depth_of, feature_layers=_feature_layers, source_classifier=("fc.",), feature_dim=512,
        weights=f"torchvision's {name} KINETICS400_V1 .pth (a file you download once; never fetched)",
        kinetics_acc1=f"{acc} (torchvision weights meta: video-level, 5 clips x 16 frames)",
    )


SPECS = (
    _spec("r2plus1d_18", r2plus1d_18, "R(2+1)D-18 (31.3M", "67.463"),
    _spec("r3d_18", r3d_18, "R3D-18 (33.2M", "63.200"),
    _spec("mc3_18", mc3_18, "MC3-18 (11.5M", "63.960"),
)
