"""The modern encoder families through the real engine: every regularizer on every family, exact resume of a
transformer run, what each encoder's spec decides (input checks before decoding, normalisation, layer-decay
depths, no weight decay on norms and position tables), and the recipes that use them."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sdtl.engine import finetune as ft
from sdtl.engine.config import config_from_dict, load_config, to_dict, validate_ranges
from sdtl.errors import ConfigError

FAMILIES = ("s3d", "mvit_v2_s", "swin3d_t", "videomae_vit_s")
REGULARIZERS = {
    "sd": ["regularizer.name=sd", "regularizer.snapshot_every=2"],
    "fixed_teacher": ["regularizer.name=fixed_teacher"],
    "ema_sd": ["regularizer.name=ema_sd", "regularizer.ema_decay=0.9"],
    "l2sp": ["regularizer.name=l2sp", "regularizer.weight=0.01"],
    "bss": ["regularizer.name=bss", "regularizer.weight=0.01"],
    "delta": ["regularizer.name=delta", "regularizer.weight=0.01", "regularizer.attention_samples=8"],
}


def tiny_cfg(data, arch: str, *extra):
    # `sdtl finetune --config synthetic_tiny --set model.arch=A --set model.variant=tiny --set model.width=1`:
    # the tiny variants take the tiny recipe's 8-frame 16-px clips; width is the recipe's CNN channel multiplier,
    # which these archs do not have
    return load_config("synthetic_tiny", [f"data.root={data}", f"model.arch={arch}", "model.variant=tiny", "model.width=1",
                                          "optim.name=adamw", "optim.lr=0.001", "run.threads=1", "eval.num_clips=1",
                                          "eval.probe_videos=4", *extra])


def records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# SD, L2-SP and DELTA (pooled feature, weights, per-layer maps) on every family; the other feature-level
# methods (a fixed or averaged teacher, BSS on the pooled feature) on one CNN and two transformer layouts
PAIRS = [(arch, reg) for arch in FAMILIES for reg in ("sd", "l2sp", "delta")] + \
        [(arch, reg) for arch in ("s3d", "swin3d_t", "videomae_vit_s") for reg in ("fixed_teacher", "ema_sd", "bss")]


@pytest.mark.parametrize("arch,reg", PAIRS)
def test_every_regularizer_fine_tunes_every_family(arch, reg, tiny_synth, tmp_path):
    out = tmp_path / "run"
    ft.run_finetune(tiny_cfg(tiny_synth, arch, "optim.epochs=1", *REGULARIZERS[reg]), out)
    row = records(out)[-1]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["train_ce"])
    part = {"sd": "train_sd", "fixed_teacher": "train_sd", "ema_sd": "train_sd", "l2sp": "train_l2sp",
            "bss": "train_bss", "delta": "train_delta"}[reg]
    parts = [k for k in row if k.startswith("train_") and k not in ("train_loss", "train_ce")]
    assert parts, row
    # the penalty really ran on this encoder: it is logged, finite, and (after a step away from the
    # reference) not zero -- SD's teacher is the model itself at the epoch start, so after the first
    # step its distance is > 0 too
    value = row.get(part, row[parts[0]])
    assert math.isfinite(value) and value > 0, (part, row)
    result = json.loads((out / "results.json").read_text())
    assert 0 <= result["video_acc1"] <= 100


@pytest.mark.parametrize("arch", FAMILIES)
def test_lp_ft_layer_decay_drop_path_checkpointing_label_smoothing_and_three_crops(arch, tiny_synth, tmp_path):
    extra = ["optim.epochs=2", "optim.lp_epochs=1", "optim.layer_decay=0.7", "optim.warmup_epochs=1",
             "optim.grad_clip=1.0", "optim.label_smoothing=0.1", "eval.crops=3", "eval.num_clips=2"]
    if arch != "s3d":  # S3D has no transformer blocks: no stochastic depth, nothing to checkpoint
        extra += ["model.drop_path=0.1", "model.grad_checkpointing=true"]
    out = tmp_path / "run"
    ft.run_finetune(tiny_cfg(tiny_synth, arch, *extra), out)
    rows = [r for r in records(out) if "train_loss" in r]  # (the epoch-0 row holds the probe's baseline)
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) for r in rows)
    result = json.loads((out / "results.json").read_text())
    assert (result["protocol"]["views"], result["protocol"]["crops"]) == (2, 3)  # tested on 2 clips x 3 crops


def test_s3d_refuses_checkpointing_and_drop_path_by_key(tiny_synth, tmp_path):
    with pytest.raises(ConfigError, match="model.grad_checkpointing"):
        ft.run_finetune(tiny_cfg(tiny_synth, "s3d", "model.grad_checkpointing=true"), tmp_path / "a")
    with pytest.raises(ConfigError, match="model.drop_path"):
        ft.run_finetune(tiny_cfg(tiny_synth, "s3d", "model.drop_path=0.1"), tmp_path / "b")
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_a_transformer_run_resumes_bit_exact(tiny_synth, tmp_path):
    extra = ["optim.schedule=constant", "run.deterministic=true", "model.drop_path=0.1", "model.dropout=0.5",
             "regularizer.name=sd", "regularizer.snapshot_every=2"]
    ft.run_finetune(tiny_cfg(tiny_synth, "videomae_vit_s", "optim.epochs=3", *extra), tmp_path / "ref")
    ft.run_finetune(tiny_cfg(tiny_synth, "videomae_vit_s", "optim.epochs=2", *extra), tmp_path / "cut")
    ft.run_finetune(tiny_cfg(tiny_synth, "videomae_vit_s", "optim.epochs=3", *extra), tmp_path / "cut", resume="auto")
    load = lambda d: torch.load(tmp_path / d / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    ref, cut = load("ref"), load("cut")
    for key in ref["model"]:
        assert torch.equal(ref["model"][key], cut["model"][key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("clips_per_s", "data_wait", "epoch_time_s")}
                          for r in rows]
    assert strip(records(tmp_path / "ref")) == strip(records(tmp_path / "cut"))


# ------------------------------------------------------------------ what the specs decide, before any decoding


@pytest.mark.parametrize("arch,sets,key,words", [
    ("mvit_v2_s", ["data.clip_len=16", "data.size=112"], "data.size", "exactly 224"),
    ("mvit_v2_s", ["data.clip_len=8", "data.size=224"], "data.clip_len", "exactly 16"),
    ("s3d", ["data.clip_len=8", "data.size=224"], "data.clip_len", ">= 14"),
    ("s3d", ["data.clip_len=16", "data.size=112"], "data.size", ">= 224"),
    ("videomae_vit_b", ["data.clip_len=15", "data.size=224"], "data.clip_len", "multiple of 2"),
    ("videomae_vit_b", ["data.clip_len=16", "data.size=200"], "data.size", "multiple of 16"),
])
def test_a_size_the_encoder_cannot_take_is_refused_by_key(arch, sets, key, words):
    cfg = load_config("synthetic_tiny", ["data.root=/nonexistent", f"model.arch={arch}", *sets])
    with pytest.raises(ConfigError) as info:
        validate_ranges(cfg)  # config only: the data root does not even exist
    assert info.value.key == key and words in str(info.value), str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("arch,frames,size,mean", [
    ("r2plus1d_vcop", 16, 112, (0.485, 0.456, 0.406)),
    ("r2plus1d_18", 16, 112, (0.43216, 0.394666, 0.37645)),  # torchvision's preset for its Kinetics weights
    ("s3d", 16, 224, (0.43216, 0.394666, 0.37645)),
    ("mvit_v2_s", 16, 224, (0.45, 0.45, 0.45)),
    ("swin3d_t", 16, 224, (0.485, 0.456, 0.406)),
    ("videomae_vit_b", 16, 224, (0.485, 0.456, 0.406)),
])
def test_unset_clip_keys_and_statistics_come_from_the_encoder(arch, frames, size, mean):
    cfg = load_config("ucf101_r21d_sd", ["data.root=/x", f"model.arch={arch}", "data.clip_len=null", "data.size=null"])
    validate_ranges(cfg)
    assert (cfg.data.clip_len, cfg.data.size) == (frames, size)
    assert cfg.data.mean == pytest.approx(mean)
    cfg = load_config("ucf101_r21d_sd", ["data.root=/x", f"model.arch={arch}", "data.clip_len=null", "data.size=null",
                                         "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]"])
    validate_ranges(cfg)
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.data.std == [0.25, 0.25, 0.25]  # an explicit choice wins


def test_a_config_stored_before_per_encoder_statistics_keeps_imagenet():
    # a torchvision r2plus1d_18 run made before this change was trained on ImageNet statistics: resuming or
    # evaluating it must not switch to the Kinetics ones
    stored = to_dict(load_config("ucf101_r21d_sd", ["data.root=/x", "model.arch=r2plus1d_18", "data.clip_len=16",
                                                    "data.size=112"]))
    del stored["data"]["mean"], stored["data"]["std"]
    cfg = config_from_dict(stored)
    validate_ranges(cfg)
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]


def test_clips_are_normalised_with_the_encoders_statistics(tiny_synth):
    from sdtl.engine.build import build_datasets

    def first_clip(arch):
        cfg = load_config("synthetic_tiny", [f"data.root={tiny_synth}", f"model.arch={arch}", "data.size=16",
                                             "data.clip_len=8"] + (["model.variant=tiny", "model.width=1"]
                                                                   if arch == "s3d" else []))
        validate_ranges(cfg)
        _, _, test, _ = build_datasets(cfg, need_train=False)
        return test[0]["video"][0], cfg

    imagenet, _ = first_clip("r2plus1d_vcop")
    kinetics, cfg = first_clip("s3d")
    mean_i, std_i = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    mean_k, std_k = torch.tensor(cfg.data.mean), torch.tensor(cfg.data.std)
    pixels = imagenet * std_i.view(3, 1, 1, 1) + mean_i.view(3, 1, 1, 1)  # back to [0, 1]
    expected = (pixels - mean_k.view(3, 1, 1, 1)) / std_k.view(3, 1, 1, 1)
    assert torch.allclose(kinetics, expected, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES + ("c3d", "r2plus1d_18"))
def test_optimizer_groups_follow_the_spec(arch):
    from sdtl.engine.config import OptimConfig
    from sdtl.engine.optim import build_optimizer
    from sdtl.models import build_encoder
    from sdtl.models.registry import spec_of

    options = {"variant": "tiny"} if arch in FAMILIES else ({"width": 0.125} if arch == "c3d" else {})
    encoder = build_encoder(arch, **options)
    head = torch.nn.Linear(encoder.feature_dim, 3)
    opt = build_optimizer(OptimConfig(name="adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5), encoder, head)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == sum(1 for _ in encoder.parameters()) + 2  # every parameter once
    spec = spec_of(arch)
    depths = {name: spec.depth_of(name) for name, _ in encoder.named_parameters()}
    ids = {d for d in depths.values() if d is not None}
    deepest = max(ids)
    assert ids == set(range(deepest + 1)) and deepest >= 2  # stem 0, then no gap
    for name, p in encoder.named_parameters():
        group = group_of[id(p)]
        scale = 1.0 if depths[name] is None else 0.5 ** (deepest + 1 - depths[name])  # None: with the head
        assert group["lr"] == pytest.approx(scale), name
        transformer = arch in FAMILIES and arch != "s3d"
        exempt = transformer and (p.ndim <= 1 or "pos" in name or "token" in name or "relative_position" in name)
        assert group["weight_decay"] == (0.0 if exempt else 0.05), name
    assert all(group_of[id(p)]["lr"] == 1.0 and group_of[id(p)]["weight_decay"] == 0.05 for p in head.parameters())


def test_the_new_recipes_are_listed_and_valid():
    from sdtl.engine.config import list_recipes

    names = {r["name"]: r for r in list_recipes()}
    for name in ("ucf101_videomae_b_sd", "hmdb51_videomae_b_sd", "ucf101_mvit_v2_s_sd", "ucf101_swin3d_t_sd",
                 "ucf101_s3d_sd"):
        assert name in names and names[name]["description"]
        cfg = load_config(name, ["data.root=/x"])
        validate_ranges(cfg)  # the recipe's clips fit its encoder
        assert cfg.eval.num_clips == 5 and cfg.eval.crops == 3 and cfg.regularizer.name == "sd"
