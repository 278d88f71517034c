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


def _check_width(name: str, width: float) -> None:
    # The engine passes its configured width to every arch; 1 is the only value these layouts have.
    if float(width) != 1.0:
        raise UserError(
            f"width={width!r} for arch {name!r}: torchvision video models have a fixed width; "
            "use width=1, or a scalable arch (c3d, r2plus1d_vcop)"
        )


def r2plus1d_18(width: float = 1.0) -> TorchvisionVideoEncoder:
    """torchvision R(2+1)D-18 (31.3M parameters), classifier removed."""
    _check_width("r2plus1d_18", width)
    return TorchvisionVideoEncoder("r2plus1d_18")


def r3d_18(width: float = 1.0) -> TorchvisionVideoEncoder:
    """torchvision R3D-18 (33.2M parameters), classifier removed."""
    _check_width("r3d_18", width)
    return TorchvisionVideoEncoder("r3d_18")


def mc3_18(width: float = 1.0) -> TorchvisionVideoEncoder:
    """torchvision MC3-18 (11.5M parameters), classifier removed."""
    _check_width("mc3_18", width)
    return TorchvisionVideoEncoder("mc3_18")
