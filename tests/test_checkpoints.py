"""Checkpoint loading: RSPNet release layout, plain/DDP/torchvision/sdtl formats, safety, errors, atomic save."""
from __future__ import annotations

import argparse
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision.models.video as tv_video

from sdtl.errors import UserError
from sdtl.models import (
    build_encoder,
    build_model,
    build_model_from_checkpoint,
    describe_checkpoint,
    detect_format,
    export_encoder,
    extract_backbone_state,
    load_encoder_weights,
    safe_load,
    save_checkpoint,
)
from sdtl.models import cli as models_cli
from sdtl.models.checkpoints import UnsafePickleWarning

SMALL_CLIP = (1, 3, 8, 16, 16)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every tensor, BN statistics included, so a missed tensor cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if tensor.dtype == torch.long:
                tensor.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
            elif key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:  # perturb around the init: new values everywhere, activations stay in a normal range
                noise = torch.randn(tensor.shape, generator=gen)
                tensor.mul_(1 + 0.1 * noise).add_(0.01 * torch.randn(tensor.shape, generator=gen))
    return module.eval()


def rspnet_release(query: torch.nn.Module, key: torch.nn.Module, arch: str) -> dict:
    """A dict in the layout of RSPNet's model_best_*_200epoch.pth.tar."""
    model = OrderedDict()
    for name, value in query.state_dict().items():
        model[f"encoder_q.encoder.{name}"] = value.clone()
    model["encoder_q.encoder.linear.weight"] = torch.randn(1, 512)  # the pre-training classifier
    model["encoder_q.encoder.linear.bias"] = torch.randn(1)
    for head in ("fc1", "fc2"):
        model[f"encoder_q.{head}.0.weight"] = torch.randn(512, 512)
        model[f"encoder_q.{head}.0.bias"] = torch.randn(512)
        model[f"encoder_q.{head}.2.weight"] = torch.randn(128, 512)
        model[f"encoder_q.{head}.2.bias"] = torch.randn(128)
    for name, value in key.state_dict().items():
        model[f"encoder_k.encoder.{name}"] = value.clone()
    model["queue"] = torch.randn(128, 256)
    model["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {
        "epoch": 200,
        "arch": arch,
        "best_loss": 3.25,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]},
        "scheduler": {"last_epoch": 200},
        "model": model,
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Width-1 RSPNet-layout files for both archs: {arch: (path, query_encoder, key_encoder)}."""
    folder = tmp_path_factory.mktemp("release")
    out = {}
    for seed, arch in enumerate(["c3d", "r2plus1d_vcop"]):
        query = randomize(build_encoder(arch), 10 + seed)
        key = randomize(build_encoder(arch), 20 + seed)
        path = folder / f"model_best_{arch}_200epoch.pth.tar"
        torch.save(rspnet_release(query, key, arch), path)
        out[arch] = (path, query, key)
    return out


def assert_same_tensors(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = module.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("arch", ["c3d", "r2plus1d_vcop"])
def test_rspnet_release_loads_every_backbone_tensor(release, arch):
    path, query, key = release[arch]
    encoder = build_encoder(arch)
    report = load_encoder_weights(encoder, path, arch)
    assert report.format == "rspnet"
    assert report.num_tensors == len(query.state_dict()) == {"c3d": 56, "r2plus1d_vcop": 144}[arch]
    assert report.filled_defaults == []
    assert_same_tensors(encoder, query)  # the query encoder, not encoder_k
    assert report.ignored["encoder_q.encoder.linear.*"] == 2
    assert report.ignored["encoder_k.encoder.*"] == len(key.state_dict())
    assert {"encoder_q.fc1.*", "encoder_q.fc2.*", "queue", "queue_ptr"} <= set(report.ignored)
    x = torch.randn(SMALL_CLIP)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x), query(x))


def test_pretraining_head_never_reaches_the_classification_head(release):
    path, query, _ = release["r2plus1d_vcop"]
    model = build_model("r2plus1d_vcop", num_classes=1)  # 1 class: same shape as RSPNet's linear [1, 512]
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_encoder_weights(model.encoder, path, "r2plus1d_vcop")
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head_before.items())
    assert_same_tensors(model.encoder, query)
    with pytest.raises(TypeError, match="model.encoder"):
        load_encoder_weights(model, path, "r2plus1d_vcop")


def test_legacy_serialization_and_ddp_state_dict_variants(release, tmp_path):
    _, query, _ = release["r2plus1d_vcop"]
    legacy = tmp_path / "legacy.pth.tar"
    torch.save(rspnet_release(query, query, "r2plus1d_vcop"), legacy, _use_new_zipfile_serialization=False)
    ddp = tmp_path / "ddp.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in query.state_dict().items()}}, ddp)
    finetuned = tmp_path / "finetuned_rspnet.pth"  # a backbone with its own 101-way classifier
    torch.save({"model": {**query.state_dict(), "linear.weight": torch.randn(101, 512), "linear.bias": torch.randn(101)}}, finetuned)
    for path, fmt in [(legacy, "rspnet"), (ddp, "state_dict"), (finetuned, "state_dict")]:
        encoder = build_encoder("r2plus1d_vcop")
        report = load_encoder_weights(encoder, path, "r2plus1d_vcop")
        assert report.format == fmt, path
        assert_same_tensors(encoder, query)
    assert load_encoder_weights(build_encoder("r2plus1d_vcop"), finetuned).ignored == {"linear.* (source classifier)": 2}


def test_torchvision_weight_file_loads_strictly(tmp_path):
    reference = randomize(tv_video.r2plus1d_18(weights=None), 3)
    path = tmp_path / "r2plus1d_18-91a641e6.pth"
    torch.save(reference.state_dict(), path)
    assert detect_format(safe_load(path)) == "torchvision"
    encoder = build_encoder("r2plus1d_18")
    report = load_encoder_weights(encoder, path)
    assert report.format == "torchvision" and report.arch == "r2plus1d_18"
    assert report.ignored == {"fc.* (source classifier)": 2}
    reference.fc = torch.nn.Identity()
    x = torch.randn(SMALL_CLIP)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x), reference(x))
    with pytest.raises(UserError, match=r"does not fit arch 'r3d_18'.*format: torchvision.*look like arch 'r2plus1d_18'"):
        load_encoder_weights(build_encoder("r3d_18"), path)


def test_wrong_arch_lists_missing_unexpected_format_and_guess(release):
    path, _, _ = release["c3d"]
    encoder = build_encoder("r2plus1d_vcop", width=0.125)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_encoder_weights(encoder, path, "r2plus1d_vcop")
    message = str(info.value)
    assert str(path) in message
    assert "does not fit arch 'r2plus1d_vcop' (width=0.125)" in message
    assert "detected checkpoint format: rspnet" in message
    assert "missing key(s): conv1.spatial_conv.weight" in message
    # all 56 C3D keys but bn1.* (a name both layouts share) are unexpected; bn1 differs in shape
    assert "51 unexpected key(s): conv1.weight, conv1.bias, conv2.weight, conv2.bias, bn2.weight, ... (46 more)" in message
    assert "4 shape-mismatched key(s): bn1.weight (file 64 vs model 8)" in message
    assert "look like arch 'c3d' (width=1.0)" in message
    assert "\n" not in message
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in before.items()), "failed load changed weights"


def test_width_mismatch_reports_shapes(tmp_path):
    quarter = build_encoder("c3d", width=0.25)
    path = tmp_path / "quarter.pt"
    export_encoder(quarter, path)
    with pytest.raises(UserError, match=r"48 shape-mismatched key\(s\): conv1\.weight \(file 16x3x3x3x3 vs model 64x3x3x3x3\)"):
        load_encoder_weights(build_encoder("c3d"), path, "c3d")
    with pytest.raises(UserError, match=r"look like arch 'c3d' \(width=0.25\): use it with `model\.arch=c3d model\.width=0\.25` \(config keys"):
        load_encoder_weights(build_encoder("c3d"), path, "c3d")


def test_missing_keys_are_an_error_but_missing_bn_counters_are_tolerated():
    source = randomize(build_encoder("c3d", width=0.125), 5)
    state = source.state_dict()
    broken = {k: v for k, v in state.items() if k != "conv5b.weight"}
    with pytest.raises(UserError, match=r"1 missing key\(s\): conv5b\.weight$"):
        load_encoder_weights(build_encoder("c3d", width=0.125), broken)
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    encoder = build_encoder("c3d", width=0.125)
    report = load_encoder_weights(encoder, {"state_dict": old_style})
    assert len(report.filled_defaults) == 8 and report.num_tensors == 48
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in old_style.items())
    assert "num_batches_tracked" in report.summary()


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_text_empty_and_missing_files_name_the_path(tmp_path, legacy):
    good = tmp_path / "good.pth.tar"
    torch.save({"state_dict": build_encoder("c3d", width=0.125).state_dict()}, good, _use_new_zipfile_serialization=not legacy)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    empty = tmp_path / "empty.pth"
    empty.touch()
    for path, pattern in [
        (truncated, "not a readable PyTorch checkpoint.*truncated"),
        (text, "not a readable PyTorch checkpoint"),
        (empty, "empty file"),
        (tmp_path / "absent.pth", "no such checkpoint file"),
        (tmp_path, "is a directory"),
    ]:
        with pytest.raises(UserError, match=pattern) as info:
            load_encoder_weights(build_encoder("c3d", width=0.125), path, "c3d")
        assert str(info.value).startswith(str(path)), info.value


def test_loadable_file_without_weights_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match=r"list\.pt: no weights found"):
        load_encoder_weights(build_encoder("c3d", width=0.125), path)
    rspnet_without_backbone = {"model": {"encoder_q.fc1.0.weight": torch.zeros(2)}}
    with pytest.raises(UserError, match="unexpected key"):
        load_encoder_weights(build_encoder("c3d", width=0.125), rspnet_without_backbone)


class CreatesFile:
    """Unpickling this runs code that creates ``marker`` - what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    control_marker = tmp_path / "control_was_executed"
    control = tmp_path / "control.pth"
    torch.save({"w": torch.zeros(1), "x": CreatesFile(control_marker)}, control)
    torch.load(control, weights_only=False)  # proves the payload is live: plain unpickling runs it
    assert control_marker.exists()

    marker = tmp_path / "was_executed"
    for legacy in (False, True):
        evil = tmp_path / f"evil_{legacy}.pth.tar"
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": CreatesFile(marker)}, evil, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UserError, match=r"refused to load: it references the Python object exec.*arbitrary code.*--allow-unsafe-pickle"):
            safe_load(evil)
        with pytest.raises(UserError, match="--allow-unsafe-pickle"):
            load_encoder_weights(build_encoder("c3d", width=0.125), evil, "c3d")
        with pytest.raises(UserError, match="--allow-unsafe-pickle"):
            describe_checkpoint(evil)
        assert not marker.exists()


def test_unsafe_pickle_loads_only_with_the_explicit_flag_and_warns(tmp_path):
    path = tmp_path / "with_namespace.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(UserError, match=r"argparse\.Namespace.*--allow-unsafe-pickle"):
        safe_load(path)
    with pytest.warns(UnsafePickleWarning, match="FULL UNPICKLING"):
        obj = safe_load(path, allow_unsafe_pickle=True)
    assert obj["args"].lr == 0.1 and torch.equal(obj["state_dict"]["w"], torch.ones(2))
    # a safe file never triggers the warning, flag or not
    safe = tmp_path / "safe.pth"
    torch.save({"w": torch.ones(1)}, safe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safe_load(safe, allow_unsafe_pickle=True)


def test_detect_format():
    tensor = torch.zeros(1)
    assert detect_format({"model": {"encoder_q.encoder.conv1.weight": tensor}, "epoch": 1}) == "rspnet"
    assert detect_format({"sdtl_format": "finetune", "model": {}}) == "sdtl-finetune"
    assert detect_format({"sdtl_format": "pretrain", "encoder": {}}) == "sdtl-pretrain"
    assert detect_format({"stem.0.weight": tensor, "layer1.0.conv1.0.weight": tensor}) == "torchvision"
    assert detect_format({"module.stem.0.weight": tensor, "module.layer1.0.x": tensor}) == "torchvision"
    assert detect_format({"conv1.weight": tensor}) == "state_dict"
    assert detect_format({"state_dict": {"module.conv1.weight": tensor}, "epoch": 2}) == "state_dict"
    assert detect_format({"model": {"conv1.weight": tensor}}) == "state_dict"
    assert detect_format({"epoch": 1}) == "unknown"
    assert detect_format([tensor]) == "unknown"
    state = extract_backbone_state({"state_dict": {"module.conv1.weight": tensor, "module.linear.weight": tensor}}, "c3d")
    assert list(state) == ["conv1.weight"]


def test_sdtl_finetune_checkpoint_rebuilds_model_without_flags(tmp_path):
    model = randomize(build_model("c3d", num_classes=5, width=0.25, dropout=0.5), 7)
    payload = {
        "sdtl_format": "finetune", "version": 1, "arch": "c3d", "arch_options": {"dropout": 0.5, "width": 0.25},
        "num_classes": 5, "class_names": ["a", "b", "c", "d", "e"], "config": {"optim": {"lr": 0.1}},
        "epoch": 4, "model": model.state_dict(), "optimizer": {}, "rng": {"torch": torch.get_rng_state()},
    }  # fmt: skip
    path = save_checkpoint(payload, tmp_path / "best.pt")
    rebuilt, loaded = build_model_from_checkpoint(path)
    assert loaded["class_names"] == rebuilt.class_names == ["a", "b", "c", "d", "e"]
    assert not rebuilt.training and rebuilt.dropout.p == 0.5
    info = describe_checkpoint(path, arch="c3d")  # options from the record, dropout left to build_model
    assert info["loads_into"] == {"arch": "c3d", "options": {"width": 0.25}, "ok": True, "error": None, "num_tensors": 56}
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    # its encoder also initialises a new model (transfer to another dataset); the old head is ignored
    encoder = build_encoder("c3d", width=0.25)
    report = load_encoder_weights(encoder, path, "c3d")
    assert report.format == "sdtl-finetune" and report.ignored == {"head.*": 2}
    assert_same_tensors(encoder, model.encoder)
    with pytest.raises(UserError, match=r"arch 'c3d' \(width=0.25\), but the model is arch 'r2plus1d_vcop'"):
        load_encoder_weights(build_encoder("r2plus1d_vcop", width=0.25), path)
    pretrain = save_checkpoint(
        {"sdtl_format": "pretrain", "version": 1, "arch": "c3d", "arch_options": {"width": 0.25}, "task": "speed",
         "epoch": 9, "encoder": model.encoder.state_dict(), "head": {"weight": torch.zeros(4, 128)}},  # fmt: skip
        tmp_path / "pretrain.pt",
    )
    encoder = build_encoder("c3d", width=0.25)
    assert load_encoder_weights(encoder, pretrain).format == "sdtl-pretrain"
    assert_same_tensors(encoder, model.encoder)
    with pytest.raises(UserError, match=r"pretrain\.pt: is a sdtl-pretrain checkpoint, not an sdtl fine-tune"):
        build_model_from_checkpoint(pretrain)


def test_atomic_save_leaves_no_temp_files_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "run" / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    save_checkpoint({"epoch": 2, "w": torch.ones(3)}, path)
    assert os.listdir(path.parent) == ["last.pt"]
    assert safe_load(path)["epoch"] == 2

    def crash(obj, target):  # a save that dies half-way (an I/O error, kill); target: the temp file's handle
        target.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 3}, path)
    monkeypatch.undo()
    assert os.listdir(path.parent) == ["last.pt"]
    assert safe_load(path)["epoch"] == 2
    # payloads that weights-only loading would refuse are rejected before anything is written
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['root'\] is a pathlib"):
        save_checkpoint({"config": {"root": Path("/data")}}, path)
    with pytest.raises(TypeError, match="numpy"):
        import numpy as np

        save_checkpoint({"best_acc": np.float64(0.5)}, path)
    assert os.listdir(path.parent) == ["last.pt"]


def test_export_encoder_roundtrips_and_describe_reads_safetensors_metadata(tmp_path):
    model = randomize(build_model("r2plus1d_vcop", num_classes=3, width=0.125), 11)
    for name in ("encoder.safetensors", "encoder.pt"):
        path = export_encoder(model, tmp_path / name)
        encoder = build_encoder("r2plus1d_vcop", width=0.125)
        report = load_encoder_weights(encoder, path)
        assert report.num_tensors == 144 and report.ignored == {}
        assert_same_tensors(encoder, model.encoder)
    info = describe_checkpoint(tmp_path / "encoder.safetensors")
    assert info["metadata"]["arch"] == "r2plus1d_vcop" and info["metadata"]["arch_options"] == {"width": 0.125}
    renamed = tmp_path / "encoder.bin"  # recognised by content, not by suffix
    renamed.write_bytes((tmp_path / "encoder.safetensors").read_bytes())
    assert set(safe_load(renamed)) == set(model.encoder.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["encoder.bin", "encoder.pt", "encoder.safetensors"]


def test_describe_rspnet_release(release):
    path, _, _ = release["c3d"]
    info = describe_checkpoint(path, arch="c3d")
    assert info["format"] == "rspnet"
    assert info["arch_guess"] == {"arch": "c3d", "options": {"width": 1.0}}
    assert info["backbone"]["num_tensors"] == 56 and info["backbone"]["num_parameters"] == 27_661_440
    assert info["metadata"]["epoch"] == 200 and info["metadata"]["arch"] == "c3d"
    assert info["loads_into"]["ok"] and info["loads_into"]["num_tensors"] == 56
    json.dumps(info)  # --json must work


def test_inspect_cli(release, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sdtl")
    models_cli.register(parser.add_subparsers(dest="command"))
    path, _, _ = release["r2plus1d_vcop"]
    args = parser.parse_args(["inspect", str(path), "--arch", "r2plus1d_vcop", "--json"])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "rspnet" and info["loads_into"]["ok"]
    assert info["backbone"]["num_parameters"] == 14_365_303
    args = parser.parse_args(["inspect", str(path), "--arch", "c3d"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "arch guess:     r2plus1d_vcop (width=1.0)" in out and "loads into c3d: NO" in out and "epoch:" in out


def test_atomic_write_keeps_the_old_file_and_leaves_no_temp_when_the_writer_fails(tmp_path):
    from sdtl.atomic import atomic_write, atomic_write_text

    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def broken(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
