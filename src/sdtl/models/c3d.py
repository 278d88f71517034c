"""C3D with BatchNorm, in the exact layout of RSPNet's released C3D encoder.

Parameter and buffer names (``conv1``/``bn1`` ... ``conv5b``/``bn5b``) are the released ones, so the
backbone of ``model_best_c3d_200epoch.pth.tar`` (``encoder_q.encoder.*`` minus ``linear.*``) loads
strictly into :class:`C3D`. The classifier is not part of the encoder: ``forward`` returns the pooled
feature and :class:`sdtl.models.classifier.VideoClassifier` owns the head.

Layout (width 1, input 16x112x112): 64 -> pool(1,2,2) -> 128 -> pool 2 -> 256,256 -> pool 2 ->
512,512 -> pool 2 -> 512,512 -> 512x2x7x7 map -> global average pool -> 512-d feature.
"""
from __future__ import annotations

import torch
from torch import nn

from sdtl.models._width import check_width, scaled


class C3D(nn.Module):
    """C3D-BN encoder: ``forward(x[B,3,T,H,W]) -> [B, feature_dim]``.

    ``width`` scales every channel count (see :mod:`sdtl.models._width`); ``width=1`` is the
    reference (27.7M parameters, 512-d feature).
    """

    def __init__(self, width: float = 1.0):
        super().__init__()
        width = check_width(width, "c3d")
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in (64, 128, 256, 512, 512))
        self.width = width
        self.feature_dim = c5

        def conv(cin: int, cout: int) -> nn.Conv3d:
            # The release keeps the conv bias even though BN follows; dropping it would break strict loading.
            return nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=True)

        self.conv1, self.bn1 = conv(3, c1), nn.BatchNorm3d(c1)
        self.pool1 = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))  # keep early temporal detail
        self.conv2, self.bn2 = conv(c1, c2), nn.BatchNorm3d(c2)
        self.pool2 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv3a, self.bn3a = conv(c2, c3), nn.BatchNorm3d(c3)
        self.conv3b, self.bn3b = conv(c3, c3), nn.BatchNorm3d(c3)
        self.pool3 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv4a, self.bn4a = conv(c3, c4), nn.BatchNorm3d(c4)
        self.conv4b, self.bn4b = conv(c4, c4), nn.BatchNorm3d(c4)
        self.pool4 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv5a, self.bn5a = conv(c4, c5), nn.BatchNorm3d(c5)
        self.conv5b, self.bn5b = conv(c5, c5), nn.BatchNorm3d(c5)
        self.pool5 = nn.AdaptiveAvgPool3d(1)
        self.relu = nn.ReLU(inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map before pooling: ``[B, feature_dim, T/8, H/16, W/16]`` (512x2x7x7 at 16x112x112)."""
        x = self.pool1(self.relu(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3a(self.conv3a(x)))
        x = self.pool3(self.relu(self.bn3b(self.conv3b(x))))
        x = self.relu(self.bn4a(self.conv4a(x)))
        x = self.pool4(self.relu(self.bn4b(self.conv4b(x))))
        x = self.relu(self.bn5a(self.conv5a(x)))
        return self.relu(self.bn5b(self.conv5b(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``[B, feature_dim]``."""
        return self.pool5(self.forward_features(x)).flatten(1)


def _depth_of(name: str) -> int:
    # conv1/bn1 = stem (0); conv2 .. conv5b = stages 1..4 (stage = number - 1). One id per stage, not
    # per layer: with one id per layer a deep CNN's first layers all but freeze under layer decay.
    import re

    m = re.fullmatch(r"(?:conv|bn)(\d)[a-z]?", name.split(".")[0])
    if m is None:
        raise ValueError(f"c3d parameter {name!r}: not part of a stage")
    return int(m.group(1)) - 1


def _spec():
    from sdtl.models.spec import EncoderSpec, InputSpec

    return EncoderSpec(
        name="c3d", build=C3D, input=InputSpec(frames=16, size=112),
        description="C3D with BatchNorm, RSPNet layout (27.7M params, 512-d); option width",
        depth_of=_depth_of,
        # DELTA: the last convolution of every stage, before its BatchNorm
        feature_layers=lambda encoder: ["conv2", "conv3b", "conv4b", "conv5b"],
        source_classifier=("linear.",),
        width_probes=(("conv1.weight", 64), ("conv3a.weight", 256), ("conv5b.weight", 512)),
        feature_dim=512, weights="RSPNet release (model_best_c3d_200epoch.pth.tar) or `sdtl pretrain`",
    )


SPECS = (_spec(),)
