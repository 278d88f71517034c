"""torchvision's S3D, MViT (v1-B, v2-S) and Swin3D (T, S, B) video models as sdtl encoders.

Every encoder is built from torchvision's own classes and blocks with the configuration its builder
(``torchvision.models.video.s3d`` / ``mvit_v1_b`` / ``mvit_v2_s`` / ``swin3d_t`` / ``swin3d_s`` /
``swin3d_b``) uses, never with downloaded weights: Kinetics-400 weights come from a file the user points at,
through :func:`sdtl.models.checkpoints.load_encoder_weights`. The classifier is an ``nn.Identity`` (S3D's
``classifier``, MViT's and Swin3D's ``head``), so

* ``forward(x[B, 3, T, H, W]) -> [B, D]`` is the pooled feature torchvision's model computes with its
  classifier replaced by ``nn.Identity()``: S3D ``mean(avgpool(features(x)))`` (1024-d); MViT the class
  token after ``norm`` (768-d); Swin3D ``avgpool(norm(features(...)))`` (768 / 768 / 1024-d);
* the state-dict keys are torchvision's minus the classifier (``classifier.*`` / ``head.*``), so the state
  dict of a torchvision model (a ``KINETICS400_V1`` ``.pth``) loads strictly once those keys are dropped
  (each spec's ``source_classifier``).

Options (``build_encoder(arch, **options)``): ``variant`` ("" = the published size; "tiny" = a CPU test
size taking 8 frames x 16x16 px, random weights only) and, for MViT and Swin3D, ``drop_path`` (stochastic
depth, linear over the blocks as torchvision's ``stochastic_depth_prob``; default 0, the builders' own
defaults are 0.2 / 0.1).

**Feature taps (DELTA).** MViT and Swin3D run their own ``forward`` over torchvision's submodules and,
after the last block of each of the 4 stages, call a :class:`~sdtl.models.spec.FeatureTap`
(``taps.0`` .. ``taps.3``) on a channel-first *view* ``[B, C, T', H', W']`` of the patch tokens (no class
token) and continue from what the tap returns, so a forward hook that replaces the map changes the
stream. Without hooks the taps return their input and nothing is copied: outputs equal torchvision's.
S3D is a CNN: its DELTA layers are the stage outputs (the stem's last separable conv ``features.3`` and
the last SepInception block of each stage, ``features.6`` / ``.12`` / ``.15``), already 5-D maps.

**Activation checkpointing.** MViT and Swin3D have ``set_grad_checkpointing(enable=True)``: each
transformer block runs under ``torch.utils.checkpoint`` (non-reentrant) while ``self.training`` and
gradients are enabled; outputs and gradients are unchanged (the RNG state of stochastic depth is replayed).

**Input geometry** (each spec's ``input``): MViT's token grid is fixed at construction (exactly 16 x 224²
for the published size); S3D's final ``AvgPool3d((2, 7, 7))`` is not adaptive (>= 14 frames, >= 224 px);
Swin3D pads to its patch and window sizes and takes any clip.
"""
from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.video.mvit import MSBlockConfig, MViT
from torchvision.models.video.s3d import SepInceptionBlock3D, TemporalSeparableConv
from torchvision.models.video.swin_transformer import SwinTransformer3d
from torchvision.ops.misc import Conv3dNormActivation

from sdtl.errors import ConfigError
from sdtl.models.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KINETICS_MEAN,
    KINETICS_STD,
    EncoderSpec,
    FeatureTap,
    InputSpec,
    no_decay_none,
    no_decay_transformer,
)

VARIANTS = ("", "tiny")
TINY_FRAMES, TINY_SIZE = 8, 16  # the synthetic tiny recipe's clips


def _check_options(arch: str, variant: str, drop_path: float | None = None) -> None:
    if variant not in VARIANTS:
        raise ConfigError("model.variant", f"{variant!r} is not a variant of model.arch={arch}",
                          "valid values: '' (the published size) or 'tiny' (a CPU test size: "
                          f"{TINY_FRAMES} frames x {TINY_SIZE} px, random weights only)")
    if drop_path is not None and not 0.0 <= float(drop_path) < 1.0:
        raise ConfigError("model.drop_path", f"{drop_path!r} is not a probability in [0, 1)",
                          "use e.g. 0.1 (Swin3D's published value) or 0.2 (MViT's), or 0 for none")


# ----------------------------------------------------------------------------------------------
# S3D

# torchvision's S3D (s3d.py, ``S3D.__init__``): SepInceptionBlock3D(in, b0_out, b1_mid, b1_out, b2_mid,
# b2_out, b3_out) for Mixed_3b, 3c | 4b .. 4f | 5b, 5c.
_S3D_INCEPTION = (
    (192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64),
    (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64), (512, 128, 128, 256, 24, 64, 64),
    (512, 112, 144, 288, 32, 64, 64), (528, 256, 160, 320, 32, 128, 128),
    (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128),
)
_S3D_TINY_DIVISOR = 8  # every channel count of the tiny S3D is torchvision's / 8 (all are multiples of 8)


class S3DEncoder(nn.Module):
    """torchvision's S3D without its classifier: ``forward(x) -> [B, 1024]`` (tiny: 128).

    ``features`` is torchvision's ``nn.Sequential`` of ``TemporalSeparableConv`` / ``MaxPool3d`` /
    ``Conv3dNormActivation`` / ``SepInceptionBlock3D`` with the same 16 children and channels, so the
    state-dict keys are torchvision's minus ``classifier.*``.

    **Deviation from torchvision:** BatchNorm ``momentum=0.1`` (PyTorch's default) instead of torchvision's
    0.001, with torchvision's ``eps=0.001``. With 0.001 the running statistics would barely move while
    fine-tuning on a new domain (after 1,000 steps about 37 % of the Kinetics statistics remain), a
    train/eval mismatch. The momentum only changes how running statistics are updated in training, so
    eval-mode outputs on the same weights equal torchvision's.

    ``variant="tiny"``: every channel / 8, the last max pool with ``ceil_mode=True`` and an adaptive
    average pool, so that 8 frames x 16 px clips go through (the published ``AvgPool3d((2, 7, 7))`` needs
    >= 14 frames and >= 224 px).
    """

    def __init__(self, variant: str = ""):
        super().__init__()
        _check_options("s3d", variant)
        tiny = variant == "tiny"
        div = _S3D_TINY_DIVISOR if tiny else 1

        def c(channels: int) -> int:
            return channels // div

        norm = partial(nn.BatchNorm3d, eps=0.001, momentum=0.1)
        blocks = [SepInceptionBlock3D(*(c(v) for v in row), norm) for row in _S3D_INCEPTION]
        self.variant = variant
        self.features = nn.Sequential(
            TemporalSeparableConv(3, c(64), 7, 2, 3, norm),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            Conv3dNormActivation(c(64), c(64), kernel_size=1, stride=1, norm_layer=norm),
            TemporalSeparableConv(c(64), c(192), 3, 1, 1, norm),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *blocks[0:2],
            nn.MaxPool3d(kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1)),
            *blocks[2:7],
            nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=(0, 0, 0), ceil_mode=tiny),
            *blocks[7:9],
        )
        self.avgpool = nn.AdaptiveAvgPool3d(1) if tiny else nn.AvgPool3d(kernel_size=(2, 7, 7), stride=1)
        self.feature_dim = c(1024)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before pooling: ``[B, 1024, T/8, H/32, W/32]`` (2x7x7 at 16x224x224)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``[B, feature_dim]``: torchvision's ``torch.mean(avgpool(features(x)), (2, 3, 4))``."""
        return torch.mean(self.avgpool(self.features(x)), dim=(2, 3, 4))


def s3d(variant: str = "") -> S3DEncoder:
    """torchvision S3D (7.9M parameters without the classifier), 1024-d."""
    return S3DEncoder(variant)


# S3D stages for layer-wise lr decay (MODERN_ENCODERS.md §3): stem features.0-4, Mixed_3b-3c (5-6),
# Mixed_4b-4f (7-12; the max pool 7 has no parameters), Mixed_5b-5c (13-15).
_S3D_DEPTH = (0,) * 5 + (1,) * 2 + (2,) * 6 + (3,) * 3


def _s3d_depth_of(name: str) -> int:
    m = re.match(r"features\.(\d+)\.", name)
    if m is None or int(m.group(1)) >= len(_S3D_DEPTH):
        raise ValueError(f"s3d parameter {name!r}: not part of a stage")
    return _S3D_DEPTH[int(m.group(1))]


def _s3d_feature_layers(encoder: nn.Module) -> list[str]:
    # DELTA: each stage's output, a 5-D map after BN + ReLU: the stem's last (separable) conv and the last
    # SepInception block of each stage (its four branches concatenated).
    return ["features.3", "features.6", "features.12", "features.15"]


# ----------------------------------------------------------------------------------------------
# MViT


def _mvit_blocks(arch: str, variant: str) -> list[MSBlockConfig]:
    """The block configs of torchvision's ``mvit_v1_b`` / ``mvit_v2_s`` builders (16 blocks, depths
    [1, 2, 11, 2], q pooling at blocks 1, 3, 14); ``tiny``: the same blocks with every width / 12 (96 ->
    8, so every head is 8 wide)."""
    heads = [1, 2, 2] + [4] * 11 + [8, 8]
    if arch == "mvit_v1_b":
        ins = [96, 192, 192] + [384] * 11 + [768, 768]
        outs = [192, 192] + [384] * 11 + [768] * 3
    else:
        ins = [96, 96, 192, 192] + [384] * 11 + [768]
        outs = [96, 192, 192] + [384] * 11 + [768, 768]
    pooled = (1, 3, 14)
    stride_kv = [[1, 8, 8]] + [[1, 4, 4]] * 2 + [[1, 2, 2]] * 11 + [[1, 1, 1]] * 2
    div = 12 if variant == "tiny" else 1
    out = []
    for i in range(16):
        if arch == "mvit_v1_b":
            kernel_q, stride_q = ([3, 3, 3], [1, 2, 2]) if i in pooled else ([], [])
        else:
            kernel_q, stride_q = [3, 3, 3], [1, 2, 2] if i in pooled else [1, 1, 1]
        out.append(MSBlockConfig(num_heads=heads[i], input_channels=ins[i] // div, output_channels=outs[i] // div,
                                 kernel_q=list(kernel_q), kernel_kv=[3, 3, 3], stride_q=list(stride_q),
                                 stride_kv=list(stride_kv[i])))
    return out


def _mvit_kwargs(arch: str, variant: str) -> dict:
    """The rest of the builder's configuration (``_mvit`` defaults plus the builder's arguments)."""
    common: dict = {"residual_with_cls_embed": False}
    if arch == "mvit_v1_b":
        common.update(residual_pool=False, rel_pos_embed=False, proj_after_attn=False)
    else:
        common.update(residual_pool=True, rel_pos_embed=True, proj_after_attn=True)
    if variant == "tiny":  # a patch stride of 2 keeps 8x8 tokens at 16 px, so that 3 q poolings fit
        common.update(spatial_size=(TINY_SIZE, TINY_SIZE), temporal_size=TINY_FRAMES, patch_embed_stride=(2, 2, 2))
    else:
        common.update(spatial_size=(224, 224), temporal_size=16)
    return common


def _stage_of_blocks(blocks: list[MSBlockConfig]) -> list[int]:
    """Stage (1..) of each block: a new stage starts at every block that pools its queries."""
    stages, stage = [], 1
    for i, cnf in enumerate(blocks):
        if i and cnf.stride_q and any(s > 1 for s in cnf.stride_q):
            stage += 1
        stages.append(stage)
    return stages


class MViTEncoder(MViT):
    """torchvision's ``MViT`` without its head: ``forward(x) -> [B, 768]``, the class token after ``norm``.

    Built with the configuration of torchvision's ``mvit_v1_b`` / ``mvit_v2_s`` builder; the token grid is
    fixed at construction (16 x 224² published; 8 x 16² tiny). ``forward`` iterates torchvision's
    submodules and presents the patch tokens after the last block of each stage to ``taps.0`` .. ``taps.3``.
    """

    def __init__(self, arch: str, variant: str = "", drop_path: float = 0.0):
        _check_options(arch, variant, drop_path)
        blocks = _mvit_blocks(arch, variant)
        super().__init__(block_setting=blocks, stochastic_depth_prob=float(drop_path), **_mvit_kwargs(arch, variant))
        self.head = nn.Identity()  # no parameters: the state dict is torchvision's minus head.*
        self.arch, self.variant = arch, variant
        self.feature_dim = blocks[-1].output_channels
        stages = _stage_of_blocks(blocks)
        ends = [i for i in range(len(stages)) if i + 1 == len(stages) or stages[i + 1] != stages[i]]
        self._tap_after = {block: k for k, block in enumerate(ends)}
        self.taps = nn.ModuleList(FeatureTap() for _ in ends)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per ``MultiscaleBlock`` (training forwards with gradients only)."""
        self.grad_checkpointing = bool(enable)

    def _tap(self, index: int, x: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
        class_token, tokens = x[:, :1], x[:, 1:]
        fmap = tokens.transpose(1, 2).unflatten(2, thw)  # [B, C, T, H, W], a view of the tokens
        out = self.taps[index](fmap)
        if out is fmap:  # unchanged (or changed in place, which the view already carries into x)
            return x
        return torch.cat((class_token, out.flatten(2).transpose(1, 2)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``[B, feature_dim]``: torchvision's ``MViT.forward`` up to ``norm(x)[:, 0]``."""
        x = self.conv_proj(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.pos_encoding(x)
        thw = (self.pos_encoding.temporal_size,) + tuple(self.pos_encoding.spatial_size)
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if use_checkpoint:
                x, thw = checkpoint(block, x, thw, use_reentrant=False)
            else:
                x, thw = block(x, thw)
            if i in self._tap_after:
                x = self._tap(self._tap_after[i], x, thw)
        x = self.norm(x)
        return x[:, 0]


def mvit_v1_b(variant: str = "", drop_path: float = 0.0) -> MViTEncoder:
    """torchvision MViT-v1-B (36.3M parameters without the head), 768-d, exactly 16 x 224² clips."""
    return MViTEncoder("mvit_v1_b", variant, drop_path)


def mvit_v2_s(variant: str = "", drop_path: float = 0.0) -> MViTEncoder:
    """torchvision MViT-v2-S (34.2M parameters without the head), 768-d, exactly 16 x 224² clips."""
    return MViTEncoder("mvit_v2_s", variant, drop_path)


# Both MViTs (and their tiny variants) have blocks 0 | 1-2 | 3-13 | 14-15 (MODERN_ENCODERS.md §3).
_MVIT_BLOCK_STAGE = tuple(_stage_of_blocks(_mvit_blocks("mvit_v2_s", "")))
assert _MVIT_BLOCK_STAGE == tuple(_stage_of_blocks(_mvit_blocks("mvit_v1_b", "")))


def _mvit_depth_of(name: str) -> int:
    top = name.split(".", 1)[0]
    if top in ("conv_proj", "pos_encoding"):
        return 0
    if top == "norm":
        return _MVIT_BLOCK_STAGE[-1]
    m = re.match(r"blocks\.(\d+)\.", name)
    if m is None or int(m.group(1)) >= len(_MVIT_BLOCK_STAGE):
        raise ValueError(f"mvit parameter {name!r}: not part of a stage")
    return _MVIT_BLOCK_STAGE[int(m.group(1))]


def _mvit_no_weight_decay(name: str, param) -> bool:
    # no_decay_transformer covers 1-D parameters (norms, biases, class_token, v1's class_pos) and v2's
    # rel_pos_{h,w,t}; v1's absolute embeddings pos_encoding.spatial_pos / temporal_pos are 2-D.
    return no_decay_transformer(name, param) or name.startswith("pos_encoding.")


def _taps(encoder: nn.Module) -> list[str]:
    return [f"taps.{i}" for i in range(len(encoder.taps))]


# ----------------------------------------------------------------------------------------------
# Swin3D

# torchvision's builders: patch (2, 4, 4), window (8, 7, 7) and (embed_dim, depths, num_heads).
_SWIN = {
    "swin3d_t": (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "swin3d_s": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "swin3d_b": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
}
# tiny (all three): 8-wide heads, two blocks per stage (the second shifted), 2x2x2 windows on the 4x4x4 grid
_SWIN_TINY = (8, [2, 2, 2, 2], [1, 2, 4, 8])


class Swin3DEncoder(SwinTransformer3d):
    """torchvision's ``SwinTransformer3d`` without its head: ``forward(x) -> [B, 8 * embed_dim]``,
    ``avgpool(norm(features(...)))``. Any clip size (padded to the patch and the windows).

    ``forward`` iterates torchvision's submodules (each stage block by block) and presents each stage's
    output (channels-last tokens ``[B, T, H, W, C]``) to ``taps.0`` .. ``taps.3`` as ``[B, C, T, H, W]``.
    """

    def __init__(self, arch: str, variant: str = "", drop_path: float = 0.0):
        _check_options(arch, variant, drop_path)
        embed_dim, depths, heads = _SWIN_TINY if variant == "tiny" else _SWIN[arch]
        window = [2, 2, 2] if variant == "tiny" else [8, 7, 7]
        super().__init__(patch_size=[2, 4, 4], embed_dim=embed_dim, depths=list(depths), num_heads=list(heads),
                         window_size=window, stochastic_depth_prob=float(drop_path))
        self.head = nn.Identity()  # no parameters: the state dict is torchvision's minus head.*
        self.arch, self.variant = arch, variant
        self.feature_dim = self.num_features
        self.taps = nn.ModuleList(FeatureTap() for _ in depths)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per ``SwinTransformerBlock`` (training forwards with gradients only)."""
        self.grad_checkpointing = bool(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``[B, feature_dim]``: torchvision's ``SwinTransformer3d.forward`` before ``head``."""
        x = self.patch_embed(x)  # B T H W C
        x = self.pos_drop(x)
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.features):
            if i % 2:  # PatchMerging between stages
                x = layer(x)
                continue
            for block in layer:
                x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
            fmap = x.permute(0, 4, 1, 2, 3)  # [B, C, T, H, W], a view of the tokens
            out = self.taps[i // 2](fmap)
            if out is not fmap:
                x = out.permute(0, 2, 3, 4, 1)
        x = self.norm(x)
        x = x.permute(0, 4, 1, 2, 3)
        x = self.avgpool(x)
        return torch.flatten(x, 1)


def swin3d_t(variant: str = "", drop_path: float = 0.0) -> Swin3DEncoder:
    """torchvision Swin3D-T (27.9M parameters without the head), 768-d."""
    return Swin3DEncoder("swin3d_t", variant, drop_path)


def swin3d_s(variant: str = "", drop_path: float = 0.0) -> Swin3DEncoder:
    """torchvision Swin3D-S (49.5M parameters without the head), 768-d."""
    return Swin3DEncoder("swin3d_s", variant, drop_path)


def swin3d_b(variant: str = "", drop_path: float = 0.0) -> Swin3DEncoder:
    """torchvision Swin3D-B (87.6M parameters without the head), 1024-d."""
    return Swin3DEncoder("swin3d_b", variant, drop_path)


def _swin_depth_of(name: str) -> int:
    # patch_embed 0 | stage 0: 1 | merge + stage 1: 2 | merge + stage 2: 3 | merge + stage 3 + norm: 4
    top = name.split(".", 1)[0]
    if top == "patch_embed":
        return 0
    if top == "norm":
        return 4
    m = re.match(r"features\.(\d+)\.", name)
    if m is None or int(m.group(1)) > 6:
        raise ValueError(f"swin3d parameter {name!r}: not part of a stage")
    return (int(m.group(1)) + 1) // 2 + 1


# ----------------------------------------------------------------------------------------------
# Specs

_MVIT_MEAN, _MVIT_STD = (0.45,) * 3, (0.225,) * 3


def _s3d_spec() -> EncoderSpec:
    return EncoderSpec(
        name="s3d", build=s3d,
        description="torchvision S3D (7.9M params, 1024-d); 16x224 px clips (>= 14 frames, >= 224 px), Kinetics "
                    "mean/std; BN momentum 0.1; option variant",
        input=InputSpec(frames=16, size=224, mean=KINETICS_MEAN, std=KINETICS_STD, min_frames=14, min_size=224),
        variants={"tiny": InputSpec(frames=TINY_FRAMES, size=TINY_SIZE, mean=KINETICS_MEAN, std=KINETICS_STD)},
        depth_of=_s3d_depth_of, feature_layers=_s3d_feature_layers, no_weight_decay=no_decay_none,
        source_classifier=("classifier.",), feature_dim=1024,
        weights="torchvision's S3D_Weights.KINETICS400_V1 .pth (a file you download once; never fetched)",
        kinetics_acc1="68.368 (torchvision meta; clip-level, 1 clip x 128 frames)",
    )


def _mvit_spec(name: str, build, title: str, params: str, acc: str, weights: str) -> EncoderSpec:
    return EncoderSpec(
        name=name, build=build,
        description=f"torchvision {title} ({params} params, 768-d); exactly 16x224 px clips, mean/std 0.45/0.225; "
                    "options variant, drop_path",
        input=InputSpec(frames=16, size=224, mean=_MVIT_MEAN, std=_MVIT_STD, fixed_frames=16, fixed_size=224),
        variants={"tiny": InputSpec(frames=TINY_FRAMES, size=TINY_SIZE, mean=_MVIT_MEAN, std=_MVIT_STD,
                                    fixed_frames=TINY_FRAMES, fixed_size=TINY_SIZE)},
        depth_of=_mvit_depth_of, feature_layers=_taps, no_weight_decay=_mvit_no_weight_decay,
        source_classifier=("head.",), feature_dim=768,
        weights=f"torchvision's {weights}.KINETICS400_V1 .pth (a file you download once; never fetched)",
        kinetics_acc1=f"{acc} (torchvision meta; video-level, 5 clips x 16 frames)",
    )


def _swin_spec(name: str, build, title: str, params: str, dim: int, acc: str, weights: str,
               extra: str = "") -> EncoderSpec:
    return EncoderSpec(
        name=name, build=build,
        description=f"torchvision {title} ({params} params, {dim}-d); any clip size (16x224 px default), ImageNet "
                    "mean/std; options variant, drop_path",
        # torchvision evaluated with 32-frame clips; 16 frames halve the cost (MODERN_ENCODERS.md §1.1)
        input=InputSpec(frames=16, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        variants={"tiny": InputSpec(frames=TINY_FRAMES, size=TINY_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)},
        depth_of=_swin_depth_of, feature_layers=_taps, no_weight_decay=no_decay_transformer,
        source_classifier=("head.",), feature_dim=dim,
        weights=f"torchvision's {weights} .pth (a file you download once; never fetched)",
        kinetics_acc1=f"{acc} (torchvision meta; video-level, 12 clips x 32 frames)" + extra,
    )


SPECS = (
    _s3d_spec(),
    _mvit_spec("mvit_v1_b", mvit_v1_b, "MViT-v1-B", "36.3M", "78.477", "MViT_V1_B_Weights"),
    _mvit_spec("mvit_v2_s", mvit_v2_s, "MViT-v2-S", "34.2M", "80.757", "MViT_V2_S_Weights"),
    _swin_spec("swin3d_t", swin3d_t, "Swin3D-T", "27.9M", 768, "77.715", "Swin3D_T_Weights.KINETICS400_V1"),
    _swin_spec("swin3d_s", swin3d_s, "Swin3D-S", "49.5M", 768, "79.521", "Swin3D_S_Weights.KINETICS400_V1"),
    _swin_spec("swin3d_b", swin3d_b, "Swin3D-B", "87.6M", 1024, "79.427",
               "Swin3D_B_Weights.KINETICS400_V1 (or .KINETICS400_IMAGENET22K_V1)",
               extra="; KINETICS400_IMAGENET22K_V1: 81.643"),
)
