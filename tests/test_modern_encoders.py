"""torchvision's S3D / MViT / Swin3D as sdtl encoders: same features and keys as torchvision, weight files,
strict loading, DELTA feature taps, layer-decay depths, weight-decay exemptions, activation checkpointing,
stochastic depth and options.

Full-size models are built on the meta device (keys, shapes, structure) except two forwards that are cheap
enough on a CPU (S3D at 16x224², Swin3D-T at 8x64²); numerics of MViT are checked at the tiny size, whose
code path is the same.
"""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torchvision.models.video as tv_video
from torch import nn
from torchvision.models.video import S3D, MViT, SwinTransformer3d

from sdtl.errors import CheckpointError, ConfigError
from sdtl.models import torchvision_modern as modern
from sdtl.models.checkpoints import load_encoder_weights
from sdtl.models.classifier import arch_option_names, build_encoder
from sdtl.models.registry import spec_of

ARCHS = ("s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t", "swin3d_s", "swin3d_b")
TRANSFORMERS = ARCHS[1:]
MVITS = ("mvit_v1_b", "mvit_v2_s")
CLASSIFIER = {"s3d": "classifier."}  # the others: "head."
# builder defaults of torchvision (stochastic_depth_prob); sdtl's default drop_path is 0
BUILDER_DROP = {"mvit_v1_b": 0.2, "mvit_v2_s": 0.2, "swin3d_t": 0.1, "swin3d_s": 0.1, "swin3d_b": 0.1}
PARAMS = {"s3d": 7_910_048, "mvit_v1_b": 36_303_072, "mvit_v2_s": 34_230_144, "swin3d_t": 27_850_470,
          "swin3d_s": 49_509_078, "swin3d_b": 87_638_984}  # torchvision's num_params minus the classifier
TV_WEIGHTS = {"s3d": "S3D_Weights", "mvit_v1_b": "MViT_V1_B_Weights", "mvit_v2_s": "MViT_V2_S_Weights",
              "swin3d_t": "Swin3D_T_Weights", "swin3d_s": "Swin3D_S_Weights", "swin3d_b": "Swin3D_B_Weights"}


def tiny_clip(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 16, 16, generator=torch.Generator().manual_seed(seed))


def classifier_prefix(arch: str) -> str:
    return CLASSIFIER.get(arch, "head.")


def tv_tiny(arch: str, num_classes: int = 5) -> nn.Module:
    """A torchvision model (its own class, with its classifier) of the tiny configuration, random weights."""
    torch.manual_seed(1)
    if arch == "s3d":  # S3D hard-codes its channels: torchvision's S3D with the tiny features swapped in
        model = S3D(num_classes=num_classes)
        tiny = build_encoder("s3d", variant="tiny")
        model.features, model.avgpool = copy.deepcopy(tiny.features), nn.AdaptiveAvgPool3d(1)
        model.classifier[1] = nn.Conv3d(tiny.feature_dim, num_classes, kernel_size=1)
        return model
    if arch in MVITS:
        return MViT(block_setting=modern._mvit_blocks(arch, "tiny"), stochastic_depth_prob=0.0,
                    num_classes=num_classes, **modern._mvit_kwargs(arch, "tiny"))
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                             window_size=[2, 2, 2], stochastic_depth_prob=0.0, num_classes=num_classes)


def without_classifier(model: nn.Module, arch: str) -> nn.Module:
    setattr(model, classifier_prefix(arch)[:-1], nn.Identity())
    return model


def tv_state(model: nn.Module, arch: str) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(classifier_prefix(arch))}


def structure(model: nn.Module, skip=("head", "classifier", "taps")) -> dict:
    """Per submodule: its type, its extra_repr and its plain config attributes (residual_pool, window sizes,
    stochastic depth p, ...)."""
    out = {}
    for name, module in model.named_modules():
        if not name or name.split(".")[0] in skip:
            continue
        attrs = {k: v for k, v in vars(module).items()
                 if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, list))}
        out[name] = (type(module).__name__, module.extra_repr(), attrs)
    return out


# ----------------------------------------------------------------------------------------------
# 1. Same keys, structure and features as torchvision


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_has_torchvisions_keys_shapes_and_structure(arch):
    kwargs = ({"norm_layer": partial(nn.BatchNorm3d, eps=0.001, momentum=0.1)} if arch == "s3d" else {})
    options = {} if arch == "s3d" else {"drop_path": BUILDER_DROP[arch]}
    with torch.device("meta"):
        ours = build_encoder(arch, **options)
        theirs = getattr(tv_video, arch)(**kwargs)  # the builder's own config (weights=None)
    expected = {k: tuple(v.shape) for k, v in tv_state(theirs, arch).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert any(k.startswith(classifier_prefix(arch)) for k in theirs.state_dict())
    assert structure(ours) == structure(theirs)
    assert sum(p.numel() for p in ours.parameters()) == PARAMS[arch]
    spec = spec_of(arch)
    assert ours.feature_dim == spec.feature_dim
    assert spec.source_classifier == (classifier_prefix(arch),)


def test_s3d_full_size_features_equal_torchvision():
    torch.manual_seed(0)
    theirs = without_classifier(tv_video.s3d(), "s3d").eval()  # torchvision's BN momentum 0.001
    ours = build_encoder("s3d").eval()
    ours.load_state_dict(tv_state(theirs, "s3d"), strict=True)
    x = torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == (1, 1024)
    assert torch.equal(got, expected)


def test_swin3d_t_full_size_features_equal_torchvision():
    torch.manual_seed(0)
    theirs = without_classifier(tv_video.swin3d_t(), "swin3d_t").eval()
    ours = build_encoder("swin3d_t").eval()
    ours.load_state_dict(tv_state(theirs, "swin3d_t"), strict=True)
    x = torch.randn(1, 3, 8, 64, 64)  # any size: windows (8, 7, 7) shrink to (4, 7, 7), spatial shift kept
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_features_equal_torchvision(arch):
    theirs = without_classifier(tv_tiny(arch), arch).eval()
    ours = build_encoder(arch, variant="tiny").eval()
    ours.load_state_dict(tv_state(theirs, arch), strict=True)
    x = tiny_clip()
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == (2, ours.feature_dim)
    assert torch.equal(got, expected)
    # training mode too (BatchNorm on batch statistics, no stochastic depth at drop_path 0)
    theirs.train(), ours.train()
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_s3d_batchnorm_momentum_is_0_1_and_eps_torchvisions():
    for variant in ("", "tiny"):
        with torch.device("meta"):
            encoder = build_encoder("s3d", variant=variant)
        norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm3d)]
        assert norms and all(m.momentum == 0.1 and m.eps == 0.001 for m in norms)


# ----------------------------------------------------------------------------------------------
# 2-3. Weight files: a torchvision state dict loads through sdtl's loader; strict errors


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_weight_file_round_trips(arch, tmp_path):
    theirs = tv_tiny(arch)
    path = tmp_path / f"{arch}.pth"
    torch.save(theirs.state_dict(), path)  # what torchvision's .pth holds: the model with its classifier
    encoder = build_encoder(arch, variant="tiny")
    report = load_encoder_weights(encoder, path)
    assert report.arch == arch and sum(report.ignored.values()) == 2  # the classifier's weight and bias
    assert any(classifier_prefix(arch)[:-1] in name for name in report.ignored)
    theirs = without_classifier(theirs, arch).eval()
    x = tiny_clip()
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x), theirs(x))


@pytest.mark.parametrize("arch", ["s3d", "mvit_v2_s", "swin3d_t"])
def test_strict_load_names_missing_and_unexpected_keys(arch, tmp_path):
    state = tv_tiny(arch).state_dict()
    missing = "norm.weight" if arch != "s3d" else "features.15.branch0.0.weight"
    del state[missing]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    encoder = build_encoder(arch, variant="tiny")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_encoder_weights(encoder, path)
    assert missing in str(info.value) and "extra.weight" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())  # unchanged


# ----------------------------------------------------------------------------------------------
# 4. Feature taps (DELTA)


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_layers_are_5d_maps_and_a_hook_can_replace_them(arch):
    torch.manual_seed(0)
    encoder = build_encoder(arch, variant="tiny").eval()
    names = spec_of(arch).feature_layers(encoder)
    modules = dict(encoder.named_modules())
    assert len(names) == 4 and all(name in modules for name in names)
    x = tiny_clip()
    with torch.no_grad():
        plain = encoder(x)
        maps = {}
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: maps.__setitem__(n, o.clone()))
                   for n in names]
        observed = encoder(x)
        for handle in handles:
            handle.remove()
    assert torch.equal(observed, plain)  # an observing hook changes nothing
    assert all(maps[n].dim() == 5 and maps[n].shape[0] == 2 for n in names)
    assert [maps[n].shape[1] for n in names][-1] == encoder.feature_dim

    def zero_channel_0(module, inputs, output):
        output = output.clone()
        output[:, 0] = 0
        return output

    handle = modules[names[0]].register_forward_hook(zero_channel_0)
    with torch.no_grad():
        zeroed = encoder(x)
    handle.remove()
    assert not torch.allclose(zeroed, plain)
    with torch.no_grad():
        assert torch.equal(encoder(x), plain)  # hook removed: back to the original stream


@pytest.mark.parametrize("arch", ["mvit_v1_b", "mvit_v2_s", "swin3d_t"])
def test_taps_show_the_stage_outputs_channel_first(arch):
    # The tap maps are the documented reshapes of the stage outputs: MViT tokens [B, 1+THW, C] -> drop the
    # class token -> [B, C, T, H, W]; Swin3D channels-last [B, T, H, W, C] -> [B, C, T, H, W].
    torch.manual_seed(0)
    encoder = build_encoder(arch, variant="tiny").eval()
    modules = dict(encoder.named_modules())
    stage_ends = ["blocks.0", "blocks.2", "blocks.13", "blocks.15"] if arch in MVITS else \
        ["features.0", "features.2", "features.4", "features.6"]
    taps, ends = {}, {}
    for k, name in enumerate(stage_ends):
        modules[f"taps.{k}"].register_forward_hook(lambda m, i, o, k=k: taps.__setitem__(k, o.clone()))
        # Swin3D: the encoder runs a stage's blocks one by one, so the stage output is its last block's
        end = modules[name] if arch in MVITS else modules[name][-1]
        end.register_forward_hook(lambda m, i, o, k=k: ends.__setitem__(k, o))
    with torch.no_grad():
        encoder(tiny_clip())
    for k in range(4):
        if arch in MVITS:
            tokens, (t, h, w) = ends[k]
            expected = tokens[:, 1:].reshape(2, t, h, w, -1).permute(0, 4, 1, 2, 3)
        else:
            expected = ends[k].permute(0, 4, 1, 2, 3)
        assert torch.equal(taps[k], expected)
    shapes = [tuple(taps[k].shape[1:]) for k in range(4)]
    if arch in MVITS:  # 8x16² -> 4x8x8 tokens (patch stride 2), q pooling at blocks 1, 3, 14
        assert [s[1:] for s in shapes] == [(4, 8, 8), (4, 4, 4), (4, 2, 2), (4, 1, 1)]
    else:  # 8x16² -> 4x4x4 tokens (patch 2x4x4), patch merging halves H and W
        assert shapes == [(8, 4, 4, 4), (16, 4, 2, 2), (32, 4, 1, 1), (64, 4, 1, 1)]


@pytest.mark.parametrize("arch", ["mvit_v2_s", "swin3d_t"])
def test_tap_changes_in_place_reach_the_tokens_and_gradients_flow(arch):
    torch.manual_seed(0)
    encoder = build_encoder(arch, variant="tiny").eval()
    x = tiny_clip()
    with torch.no_grad():
        plain = encoder(x)
    def halve_in_place(module, inputs, output):
        output.mul_(0.5)  # returns None: the encoder goes on with the tap's input, a view of the tokens

    handle = encoder.taps[1].register_forward_hook(halve_in_place)
    with torch.no_grad():
        halved = encoder(x)
    handle.remove()
    assert not torch.allclose(halved, plain)
    # a replaced map keeps the graph: gradients reach the stem through the re-attached tokens
    handle = encoder.taps[0].register_forward_hook(lambda m, i, o: o * 2.0)
    encoder.train()
    encoder(x).square().sum().backward()
    handle.remove()
    stem = encoder.conv_proj.weight if arch in MVITS else encoder.patch_embed.proj.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# 5. Layer-decay depths and weight-decay exemptions


@pytest.mark.parametrize("arch", ARCHS)
def test_depth_of_covers_every_parameter_monotonically(arch):
    spec = spec_of(arch)
    with torch.device("meta"):
        full = build_encoder(arch)
    for encoder in (full, build_encoder(arch, variant="tiny")):
        depths = [spec.depth_of(name) for name, _ in encoder.named_parameters()]
        assert depths == sorted(depths)
        assert depths[0] == 0 and depths[-1] == (3 if arch == "s3d" else 4)
        assert set(depths) == set(range(depths[-1] + 1))
    expected = {
        "s3d": {"features.0.0.0.weight": 0, "features.3.1.1.weight": 0, "features.5.branch0.0.weight": 1,
                "features.6.branch3.1.1.bias": 1, "features.8.branch0.0.weight": 2,
                "features.12.branch2.1.1.0.weight": 2, "features.14.branch0.0.weight": 3,
                "features.15.branch3.1.1.weight": 3},
        "mvit": {"conv_proj.weight": 0, "pos_encoding.class_token": 0, "blocks.0.attn.qkv.weight": 1,
                 "blocks.1.norm1.weight": 2, "blocks.2.mlp.0.bias": 2, "blocks.3.attn.qkv.weight": 3,
                 "blocks.13.mlp.3.weight": 3, "blocks.14.attn.qkv.weight": 4, "blocks.15.norm2.bias": 4,
                 "norm.weight": 4},
        "swin": {"patch_embed.proj.weight": 0, "patch_embed.norm.weight": 0, "features.0.0.attn.qkv.weight": 1,
                 "features.1.reduction.weight": 2, "features.2.1.mlp.0.weight": 2, "features.3.norm.weight": 3,
                 "features.4.0.norm1.weight": 3, "features.5.reduction.weight": 4,
                 "features.6.1.attn.relative_position_bias_table": 4, "norm.bias": 4},
    }[arch[:4] if arch != "s3d" else "s3d"]
    names = set(dict(full.named_parameters()))
    for name, depth in expected.items():
        assert name in names, name
        assert spec.depth_of(name) == depth, name
    for bad in ("head.weight", "classifier.1.weight", "blocks.16.norm1.weight", "features.16.0.weight",
                "taps.0.weight", "avgpool.weight"):
        with pytest.raises(ValueError):
            spec.depth_of(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_weight_decay_exempts_norms_biases_and_position_tables(arch):
    spec = spec_of(arch)
    with torch.device("meta"):
        encoder = build_encoder(arch)
    params = dict(encoder.named_parameters())
    exempt = {name for name, p in params.items() if spec.no_weight_decay(name, p)}
    if arch == "s3d":
        assert not exempt  # a CNN: every parameter decays (the sdtl default)
        return
    must = {n for n, p in params.items() if p.ndim <= 1}  # norms, biases, class token
    must |= {n for n in params if n.startswith("pos_encoding.") or "rel_pos" in n
             or n.endswith("relative_position_bias_table")}
    if arch == "mvit_v1_b":
        assert {"pos_encoding.spatial_pos", "pos_encoding.temporal_pos", "pos_encoding.class_pos"} <= must
    if arch == "mvit_v2_s":
        assert "blocks.0.attn.rel_pos_h" in must and "blocks.15.attn.rel_pos_t" in must
    if arch.startswith("swin"):
        assert "features.0.0.attn.relative_position_bias_table" in must
    assert exempt == must
    for name in ("conv_proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.attn.pool_q.pool.weight",
                 "blocks.0.mlp.0.weight", "patch_embed.proj.weight", "features.0.0.attn.qkv.weight",
                 "features.1.reduction.weight", "features.6.1.mlp.3.weight"):
        if name in params:
            assert name not in exempt, name


# ----------------------------------------------------------------------------------------------
# 6-7. Activation checkpointing; stochastic depth


def loss_and_grads(encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    encoder.zero_grad(set_to_none=True)
    loss = (encoder(x) * torch.linspace(-1, 1, encoder.feature_dim)).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["mvit_v1_b", "mvit_v2_s", "swin3d_t"])
@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(arch, drop_path):
    torch.manual_seed(0)
    plain = build_encoder(arch, variant="tiny", drop_path=drop_path).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    calls = []
    first_block = checkpointed.blocks[0] if arch in MVITS else checkpointed.features[0][0]
    first_block.register_forward_pre_hook(lambda m, i: calls.append(1))
    x = tiny_clip(4)
    torch.manual_seed(1)  # the same stochastic-depth draws (checkpoint replays the RNG when recomputing)
    loss0, grads0 = loss_and_grads(plain, x)
    torch.manual_seed(1)
    loss1, grads1 = loss_and_grads(checkpointed, x)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing is active
    assert torch.allclose(loss0, loss1, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) == len(list(plain.parameters()))
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-5, atol=1e-6), name
    # eval mode and no-grad forwards never checkpoint (a frozen teacher pays nothing)
    calls.clear()
    with torch.no_grad():
        checkpointed(x)
    checkpointed.eval()(x).sum().backward()
    assert len(calls) == 2
    checkpointed.set_grad_checkpointing(False)
    assert checkpointed.grad_checkpointing is False


def test_s3d_has_no_checkpointing_and_no_drop_path():
    assert not hasattr(build_encoder("s3d", variant="tiny"), "set_grad_checkpointing")
    assert arch_option_names("s3d") == ["variant"]
    for arch in TRANSFORMERS:
        assert arch_option_names(arch) == ["variant", "drop_path"]
    with pytest.raises(ConfigError) as info:
        build_encoder("s3d", drop_path=0.1)
    assert info.value.key == "model.drop_path"


@pytest.mark.parametrize("arch", ["mvit_v1_b", "mvit_v2_s", "swin3d_t"])
def test_drop_path_is_stochastic_in_training_and_off_in_eval(arch):
    torch.manual_seed(0)
    dropped = build_encoder(arch, variant="tiny", drop_path=0.5)
    plain = build_encoder(arch, variant="tiny")
    plain.load_state_dict(dropped.state_dict(), strict=True)
    probs = [m.p for m in dropped.modules() if type(m).__name__ == "StochasticDepth"]
    assert probs[0] == 0.0 and probs[-1] == 0.5 and probs == sorted(probs)  # linear over the blocks
    assert all(m.p == 0.0 for m in plain.modules() if type(m).__name__ == "StochasticDepth")
    x = tiny_clip(4)
    with torch.no_grad():
        a, b = dropped.train()(x), dropped(x)
        assert not torch.allclose(a, b)
        assert torch.equal(dropped.eval()(x), plain.eval()(x))


# ----------------------------------------------------------------------------------------------
# 8. Options and specs


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_variant_is_a_config_error(arch):
    with pytest.raises(ConfigError) as info:
        build_encoder(arch, variant="huge")
    assert info.value.key == "model.variant"
    assert "tiny" in str(info.value) and "huge" in str(info.value)
    if arch != "s3d":
        for bad in (-0.1, 1.0):
            with pytest.raises(ConfigError) as info:
                build_encoder(arch, variant="tiny", drop_path=bad)
            assert info.value.key == "model.drop_path"


def test_specs_order_inputs_and_published_numbers():
    assert tuple(spec.name for spec in modern.SPECS) == ARCHS
    for spec in modern.SPECS:
        weights = getattr(tv_video, TV_WEIGHTS[spec.name]).KINETICS400_V1  # meta only: nothing is downloaded
        acc1 = weights.meta["_metrics"]["Kinetics-400"]["acc@1"]
        assert spec.kinetics_acc1.startswith(f"{acc1:.3f} (torchvision meta")
        assert TV_WEIGHTS[spec.name] in spec.weights
        assert f"{PARAMS[spec.name] / 1e6:.1f}M" in spec.description
        assert spec.input.frames == 16 and spec.input.size == 224
        # the published input of the weights: torchvision's transform statistics
        transform = weights.transforms()
        assert spec.input.mean == pytest.approx(transform.mean) and spec.input.std == pytest.approx(transform.std)
        tiny = spec.input_of({"variant": "tiny"})
        assert (tiny.frames, tiny.size, tiny.mean, tiny.std) == (8, 16, spec.input.mean, spec.input.std)
        assert not tiny.problems(8, 16)
        assert spec.input_of({}) is spec.input
    s3d_in, mvit_in, swin_in = (spec_of(a).input for a in ("s3d", "mvit_v2_s", "swin3d_t"))
    assert not s3d_in.problems(14, 224) and s3d_in.problems(16, 112) and s3d_in.problems(12, 224)
    assert not mvit_in.problems(16, 224) and mvit_in.problems(32, 224) and mvit_in.problems(16, 256)
    assert spec_of("mvit_v1_b").input_of({"variant": "tiny"}).problems(16, 16)  # the tiny grid is fixed too
    assert not swin_in.problems(16, 112) and not swin_in.problems(32, 224)


def test_tiny_variants_train_in_a_step():
    # the synthetic tiny recipe's batches: 4 clips of 8x16², one step each well under a second on a CPU
    for arch in ARCHS:
        torch.manual_seed(0)
        encoder = build_encoder(arch, variant="tiny").train()
        loss, grads = loss_and_grads(encoder, tiny_clip(4))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
