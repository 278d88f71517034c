"""R(2+1)D-10 in the layout of VCOP's ``R2Plus1DNet`` (layer sizes 1,1,1,1), as used by RSPNet.

This is *not* torchvision's ``r2plus1d_18``: each stage has one residual block, every 3-D conv is
factored into ``spatial_conv`` (1xkxk) -> ``bn`` -> ReLU -> ``temporal_conv`` (kx1x1) with no bias, and
the intermediate width follows the R(2+1)D paper's parameter-matching rule
``M = floor(kt*kh*kw*in*out / (kh*kw*in + kt*out))`` (also for the stem, unlike torchvision's fixed 45).
Names match the release (``conv3.block1.downsampleconv.temporal_conv.weight``, ...), so the backbone
of ``model_best_r21d_200epoch.pth.tar`` (``encoder_q.encoder.*`` minus ``linear.*``) loads strictly.

Shapes at width 1 and 16x112x112 input: stem 64x16x56x56, conv2 64x16x56x56, conv3 128x8x28x28,
conv4 256x4x14x14, conv5 512x2x7x7 -> global average pool -> 512-d feature.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sdtl.models._width import check_width, scaled


def _triple(value) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value, value)


class SpatioTemporalConv(nn.Module):
    """A (2+1)-D factored convolution: spatial 1xkhxkw conv, BN, ReLU, temporal ktx1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        st, sh, sw = _triple(stride)
        pt, ph, pw = _triple(padding)
        # Chosen so the factored pair has about as many parameters as the full kt x kh x kw conv.
        mid = int(math.floor(kt * kh * kw * in_channels * out_channels / (kh * kw * in_channels + kt * out_channels)))
        mid = max(1, mid)  # only reachable at tiny widths; width 1 never hits it
        self.spatial_conv = nn.Conv3d(in_channels, mid, (1, kh, kw), stride=(1, sh, sw), padding=(0, ph, pw), bias=False)
        self.bn = nn.BatchNorm3d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.temporal_conv = nn.Conv3d(mid, out_channels, (kt, 1, 1), stride=(st, 1, 1), padding=(pt, 0, 0), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_conv(self.relu(self.bn(self.spatial_conv(x))))


class SpatioTemporalResBlock(nn.Module):
    """Basic residual block of two factored 3x3x3 convs; ``downsample`` halves T, H, W and adds a projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, downsample: bool = False):
        super().__init__()
        self.downsample = downsample
        padding = kernel_size // 2
        if downsample:
            self.downsampleconv = SpatioTemporalConv(in_channels, out_channels, 1, stride=2)
            self.downsamplebn = nn.BatchNorm3d(out_channels)
            self.conv1 = SpatioTemporalConv(in_channels, out_channels, kernel_size, padding=padding, stride=2)
        else:
            self.conv1 = SpatioTemporalConv(in_channels, out_channels, kernel_size, padding=padding)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = SpatioTemporalConv(out_channels, out_channels, kernel_size, padding=padding)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.outrelu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.relu1(self.bn1(self.conv1(x)))
        res = self.bn2(self.conv2(res))
        if self.downsample:
            x = self.downsamplebn(self.downsampleconv(x))
        return self.outrelu(x + res)


class SpatioTemporalResLayer(nn.Module):
    """One stage: ``block1`` (possibly downsampling) then ``layer_size - 1`` blocks in ``blocks``.

    With layer size 1 ``blocks`` is an empty ModuleList; it is kept because it is part of the
    release's module tree (it contributes no state-dict keys).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, layer_size: int, downsample: bool = False):
        super().__init__()
        self.block1 = SpatioTemporalResBlock(in_channels, out_channels, kernel_size, downsample)
        self.blocks = nn.ModuleList(
            SpatioTemporalResBlock(out_channels, out_channels, kernel_size) for _ in range(layer_size - 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        for block in self.blocks:
            x = block(x)
        return x


class R2Plus1DVCOP(nn.Module):
    """R(2+1)D-10 encoder (VCOP/RSPNet layout): ``forward(x[B,3,T,H,W]) -> [B, feature_dim]``.

    ``width`` scales every channel count (see :mod:`sdtl.models._width`); ``width=1`` is the
    reference (14.4M parameters, 512-d feature).
    """

    def __init__(self, width: float = 1.0, layer_sizes: tuple[int, int, int, int] = (1, 1, 1, 1)):
        super().__init__()
        width = check_width(width, "r2plus1d_vcop")
        c1, c2, c3, c4 = (scaled(c, width) for c in (64, 128, 256, 512))
        self.width = width
        self.feature_dim = c4
        self.conv1 = SpatioTemporalConv(3, c1, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        self.bn1 = nn.BatchNorm3d(c1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = SpatioTemporalResLayer(c1, c1, 3, layer_sizes[0])
        self.conv3 = SpatioTemporalResLayer(c1, c2, 3, layer_sizes[1], downsample=True)
        self.conv4 = SpatioTemporalResLayer(c2, c3, 3, layer_sizes[2], downsample=True)
        self.conv5 = SpatioTemporalResLayer(c3, c4, 3, layer_sizes[3], downsample=True)
        self.pool = nn.AdaptiveAvgPool3d(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map before pooling: ``[B, feature_dim, T/8, H/16, W/16]`` (512x2x7x7 at 16x112x112)."""
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.conv5(self.conv4(self.conv3(self.conv2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``[B, feature_dim]``."""
        return self.pool(self.forward_features(x)).flatten(1)


def _depth_of(name: str) -> int:
    # conv1/bn1 = stem (0); conv2 .. conv5 = stages 1..4
    import re

    m = re.fullmatch(r"(?:conv|bn)(\d)", name.split(".")[0])
    if m is None:
        raise ValueError(f"r2plus1d_vcop parameter {name!r}: not part of a stage")
    return int(m.group(1)) - 1


def _feature_layers(encoder: nn.Module) -> list[str]:
    # DELTA: the second (2+1)D conv of each stage's last block, before its BatchNorm
    names = dict(encoder.named_modules())
    out = []
    for stage in ("conv2", "conv3", "conv4", "conv5"):
        blocks = names[f"{stage}.blocks"]
        out.append(f"{stage}.blocks.{len(blocks) - 1}.conv2" if len(blocks) else f"{stage}.block1.conv2")
    return out


def _spec():
    from sdtl.models.spec import EncoderSpec, InputSpec

    return EncoderSpec(
        name="r2plus1d_vcop", build=R2Plus1DVCOP, input=InputSpec(frames=16, size=112),
        description="R(2+1)D-10, VCOP/RSPNet layout (14.4M params, 512-d); option width",
        depth_of=_depth_of, feature_layers=_feature_layers, source_classifier=("linear.",),
        width_probes=(("bn1.weight", 64), ("conv4.block1.bn2.weight", 256), ("conv5.block1.bn2.weight", 512)),
        feature_dim=512, weights="RSPNet release (model_best_r21d_200epoch.pth.tar) or `sdtl pretrain`",
    )


SPECS = (_spec(),)
