"""Encoders and the classifier: exact reference layouts, parameter counts, shapes, width, factory errors."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.models.video as tv_video

from sdtl.errors import UserError
from sdtl.models import C3D, R2Plus1DVCOP, VideoClassifier, build_encoder, build_model, list_archs

# Parameter counts measured at width 1 without any classifier (REFERENCE.md: ~27.7M and ~14.4M).
C3D_PARAMS = 27_661_440
R2PLUS1D_VCOP_PARAMS = 14_365_303
TORCHVISION_PARAMS = {"r2plus1d_18": 31_300_125, "r3d_18": 33_166_272, "mc3_18": 11_490_240}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def c3d() -> C3D:
    return C3D().eval()


@pytest.fixture(scope="module")
def vcop() -> R2Plus1DVCOP:
    return R2Plus1DVCOP().eval()


def test_c3d_has_exactly_the_release_names_and_shapes(c3d):
    widths = {"conv1": (3, 64), "conv2": (64, 128), "conv3a": (128, 256), "conv3b": (256, 256),
              "conv4a": (256, 512), "conv4b": (512, 512), "conv5a": (512, 512), "conv5b": (512, 512)}  # fmt: skip
    expected = {}
    for conv, (cin, cout) in widths.items():
        bn = "bn" + conv[len("conv"):]
        expected[f"{conv}.weight"] = (cout, cin, 3, 3, 3)
        expected[f"{conv}.bias"] = (cout,)  # the release keeps conv biases
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{bn}.{buffer}"] = (cout,)
        expected[f"{bn}.num_batches_tracked"] = ()
    got = {k: tuple(v.shape) for k, v in c3d.state_dict().items()}
    assert got == expected
    assert n_params(c3d) == C3D_PARAMS
    assert c3d.feature_dim == 512


def test_r2plus1d_vcop_names_and_intermediate_widths(vcop):
    sd = vcop.state_dict()
    # M = floor(kt*kh*kw*in*out / (kh*kw*in + kt*out)), also for the stem (not torchvision's 45).
    assert sd["conv1.spatial_conv.weight"].shape == (83, 3, 1, 7, 7)
    assert sd["conv1.temporal_conv.weight"].shape == (64, 83, 3, 1, 1)
    assert sd["conv2.block1.conv1.spatial_conv.weight"].shape == (144, 64, 1, 3, 3)
    assert sd["conv3.block1.conv1.spatial_conv.weight"].shape == (230, 64, 1, 3, 3)
    assert sd["conv3.block1.conv1.spatial_conv.weight"].shape[0] == math.floor(27 * 64 * 128 / (9 * 64 + 3 * 128))
    assert sd["conv3.block1.downsampleconv.spatial_conv.weight"].shape == (42, 64, 1, 1, 1)
    assert sd["conv3.block1.downsampleconv.temporal_conv.weight"].shape == (128, 42, 1, 1, 1)
    for key in ("conv1.bn.running_mean", "bn1.weight", "conv3.block1.downsamplebn.running_var", "conv5.block1.bn2.weight"):
        assert key in sd
    assert not any(k.endswith(".bias") and "bn" not in k for k in sd), "factored convs have no bias"
    assert not any(k.startswith("conv2.block1.downsample") for k in sd), "conv2 has no shortcut projection"
    assert not any(".blocks." in k or k.startswith("linear") for k in sd)
    assert isinstance(vcop.conv5.blocks, torch.nn.ModuleList) and len(vcop.conv5.blocks) == 0
    assert len(sd) == 144
    assert n_params(vcop) == R2PLUS1D_VCOP_PARAMS


@pytest.mark.parametrize("name", ["c3d", "vcop"])
def test_full_size_clip_gives_512x2x7x7_map(name, c3d, vcop):
    model = {"c3d": c3d, "vcop": vcop}[name]
    torch.manual_seed(0)
    with torch.no_grad():
        fmap = model.forward_features(torch.randn(1, 3, 16, 112, 112))
    assert fmap.shape == (1, 512, 2, 7, 7)
    # forward is global average pooling of that map
    pooled = model.pool5(fmap) if name == "c3d" else model.pool(fmap)
    assert pooled.flatten(1).shape == (1, 512)


@pytest.mark.parametrize("arch", ["c3d", "r2plus1d_vcop"])
def test_width_multiplier_shrinks_model_and_runs_small_clips(arch):
    full = {"c3d": C3D_PARAMS, "r2plus1d_vcop": R2PLUS1D_VCOP_PARAMS}[arch]
    quarter = build_encoder(arch, width=0.25).eval()
    assert quarter.feature_dim == 128
    assert n_params(quarter) < full / 10
    with torch.no_grad():
        out = quarter(torch.randn(2, 3, 16, 32, 32))
        fmap = quarter.forward_features(torch.randn(1, 3, 16, 32, 32))
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    assert fmap.shape == (1, 128, 2, 2, 2)
    # half-up rounding of every channel count: 0.3 * (64, 128, 256, 512) = 19.2, 38.4, 76.8, 153.6
    odd = build_encoder(arch, width=0.3)
    assert odd.feature_dim == 154
    first = odd.conv1.weight if arch == "c3d" else odd.bn1.weight
    assert first.shape[0] == 19


@pytest.mark.parametrize("width", [0, -1, float("nan"), "wide"])
def test_invalid_width_is_a_user_error(width):
    with pytest.raises(UserError, match="width"):
        build_encoder("c3d", width=width)


@pytest.mark.parametrize("arch", ["r2plus1d_18", "r3d_18", "mc3_18"])
def test_torchvision_encoders_match_torchvision_keys_minus_fc(arch):
    encoder = build_encoder(arch)
    reference = getattr(tv_video, arch)(weights=None)
    ref_shapes = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in encoder.state_dict().items()} == ref_shapes
    assert n_params(encoder) == TORCHVISION_PARAMS[arch]
    assert encoder.feature_dim == 512
    encoder.load_state_dict(reference.state_dict(), strict=False)
    reference.fc = torch.nn.Identity()
    x = torch.randn(1, 3, 8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(x), reference.eval()(x))
        # mc3_18 keeps time after its first (3-D) stage; the others halve it three times
        frames = 8 if arch == "mc3_18" else 1
        assert encoder.forward_features(x).shape == (1, 512, frames, 1, 1)
    with pytest.raises(UserError, match="model.width: not an option of model.arch"):
        build_encoder(arch, width=0.5)


def test_classifier_exposes_encoder_features_and_head():
    torch.manual_seed(0)
    model = build_model("r2plus1d_vcop", num_classes=7, width=0.125, dropout=0.5)
    assert isinstance(model, VideoClassifier)
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == 64 and model.head.out_features == 7
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "head"}
    no_dropout = build_model("r2plus1d_vcop", num_classes=7, width=0.125)
    assert list(no_dropout.state_dict()) == list(model.state_dict()), "dropout must not change the keys"
    x = torch.randn(3, 3, 8, 32, 32)
    model.eval()
    with torch.no_grad():
        logits, features = model.forward_features(x)
        assert features.shape == (3, 64) and logits.shape == (3, 7)
        assert torch.allclose(features, model.encoder(x))
        assert torch.allclose(logits, model.head(features))
        assert torch.allclose(model(x), logits)
    model.train()
    torch.manual_seed(1)
    logits_train, _ = model.forward_features(x)
    # dropout acts between features and head in training: logits differ from the no-dropout head
    with torch.no_grad():
        assert not torch.allclose(logits_train, model.head(model.encoder(x)))


def test_factory_errors_name_the_bad_input_and_the_valid_choices():
    archs = list_archs()
    assert set(archs) == {"c3d", "r2plus1d_vcop", "r2plus1d_18", "r3d_18", "mc3_18", "s3d", "mvit_v1_b", "mvit_v2_s",
                          "swin3d_t", "swin3d_s", "swin3d_b", "videomae_vit_s", "videomae_vit_b"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in archs.values())
    with pytest.raises(UserError, match=r"'resnet50'.*c3d.*r2plus1d_vcop"):
        build_encoder("resnet50")
    with pytest.raises(UserError, match=r"model\.depth: not an option of model\.arch=c3d; c3d takes: model\.width"):
        build_model("c3d", 10, depth=3)
    with pytest.raises(UserError, match="num_classes"):
        build_model("c3d", 0, width=0.125)


def test_build_encoder_records_how_to_rebuild_it():
    encoder = build_encoder("c3d", width=0.25)
    assert encoder.sdtl_arch == "c3d" and encoder.sdtl_arch_options == {"width": 0.25}
