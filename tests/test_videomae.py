"""VideoMAE encoders: equivalence with transformers, strict loading of release files and Hugging Face
folders (the q/v bias regression), feature taps, layer/weight decay groups, checkpointing, drop path."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdtl.errors import CheckpointError, ConfigError
from sdtl.models.checkpoints import load_encoder_weights
from sdtl.models.classifier import build_encoder
from sdtl.models.registry import spec_of
from sdtl.models.videomae import VideoMAEEncoder, adapt_checkpoint, sinusoid_table

TINY = {"image_size": 16, "patch_size": 8, "num_frames": 8, "tubelet_size": 2, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}  # the shape of build_encoder(..., variant="tiny")


def tiny(**options) -> VideoMAEEncoder:
    torch.manual_seed(0)
    return build_encoder("videomae_vit_s", variant="tiny", **options)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random and non-zero (norm weights around 1), biases included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def clips(shape=(2, 3, 8, 16, 16), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Hugging Face folders


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers", reason="transformers not installed (optional test extra)")


def hf_folder(hf, path, cls: str = "VideoMAEForVideoClassification", **config):
    """A random VideoMAE of ``cls`` saved with ``save_pretrained`` (safetensors): ``(folder, model)``."""
    cfg = hf.VideoMAEConfig(**{**TINY, "use_mean_pooling": True, "qkv_bias": True, **config})
    torch.manual_seed(0)
    model = getattr(hf, cls)(cfg).eval()
    randomise(model)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def rewrite(folder, dest, edit):
    """Copy a save_pretrained folder with its tensors changed by ``edit(dict) -> dict``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    save_file(edit(load_file(str(folder / "model.safetensors"))), str(dest / "model.safetensors"))
    return dest


def hf_pooled(model, x: torch.Tensor) -> torch.Tensor:
    """HF's pooled feature: ``fc_norm(last_hidden_state.mean(1))`` (HF takes [B, T, C, H, W])."""
    with torch.no_grad():
        out = (model.videomae if hasattr(model, "videomae") else model)(x.permute(0, 2, 1, 3, 4)).last_hidden_state
        return model.fc_norm(out.mean(1))


def test_matches_transformers_exactly_with_the_same_dims(hf, tmp_path):
    folder, model = hf_folder(hf, tmp_path / "hf", image_size=32, patch_size=16, num_frames=4, intermediate_size=64)
    keys = set(json.loads((folder / "config.json").read_text()))
    assert "use_mean_pooling" in keys
    # sdtl's internal constructor with HF's epsilons (blocks: layer_norm_eps, fc_norm: torch's 1e-5)
    enc = VideoMAEEncoder(dim=32, depth=2, heads=2, mlp=64, patch=16, eps=model.config.layer_norm_eps,
                          fc_norm_eps=1e-5).eval()
    report = load_encoder_weights(enc, folder, arch="videomae_vit_s")
    assert report.format == "hf-videomae" and report.ignored == {"classifier.* (source classifier)": 2}
    x = clips((2, 3, 4, 32, 32))
    diff = (enc(x).detach() - hf_pooled(model, x)).abs().max().item()
    print(f"max |sdtl - transformers| = {diff:.3g}")
    assert diff < 1e-5
    assert enc.blocks[1].attn.q_bias.abs().min() > 0 and enc.blocks[1].attn.v_bias.abs().min() > 0
    assert torch.equal(enc.blocks[0].attn.q_bias, model.videomae.encoder.layer[0].attention.attention.query.bias)


def test_tiny_arch_loads_every_hf_model_class_through_the_real_path(hf, tmp_path):
    x = clips()
    folder, model = hf_folder(hf, tmp_path / "cls", layer_norm_eps=1e-6)
    enc = tiny().eval()
    report = load_encoder_weights(enc, folder)  # arch from enc.sdtl_arch
    assert report.arch == "videomae_vit_s" and report.format == "hf-videomae"
    # sdtl's fc_norm eps is 1e-6, HF's 1e-5: not bit-identical, but close
    assert torch.allclose(enc(x).detach(), hf_pooled(model, x), atol=1e-4)

    # VideoMAEModel: no fc_norm in the file -> LayerNorm's init, said in the report
    folder, model = hf_folder(hf, tmp_path / "model", cls="VideoMAEModel", layer_norm_eps=1e-6)
    enc = tiny().eval()
    report = load_encoder_weights(enc, folder)
    assert any(k.startswith("fc_norm (not in the file") for k in report.ignored)
    assert torch.equal(enc.fc_norm.weight, torch.ones(32)) and torch.equal(enc.fc_norm.bias, torch.zeros(32))
    with torch.no_grad():
        tokens = model(x.permute(0, 2, 1, 3, 4)).last_hidden_state
    assert torch.allclose(enc(x).detach(), torch.nn.functional.layer_norm(tokens.mean(1), (32,), eps=1e-6), atol=1e-5)

    # VideoMAEForPreTraining: decoder ignored; with the hub's use_mean_pooling false its layernorm is the
    # pre-training encoder's final norm, dropped as VideoMAE fine-tuning does
    folder, _ = hf_folder(hf, tmp_path / "pre", cls="VideoMAEForPreTraining", use_mean_pooling=False,
                          decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                          decoder_intermediate_size=32)
    report = load_encoder_weights(tiny(), folder)
    groups = " ".join(report.ignored)
    assert "decoder.*" in groups and "encoder_to_decoder.*" in groups and "mask_token" in groups
    assert "videomae.layernorm" in groups and "fc_norm (not in the file" in groups


def test_missing_or_zeroed_attention_biases_are_errors_never_zeros(hf, tmp_path):
    folder, model = hf_folder(hf, tmp_path / "hf")
    names = json.dumps(list(__import__("safetensors.torch").torch.load_file(str(folder / "model.safetensors"))))
    assert "attention.attention.q_bias" in names and "attention.attention.v_bias" in names  # what 5.x saves

    absent = rewrite(folder, tmp_path / "absent", lambda sd: {k: v for k, v in sd.items() if "_bias" not in k})
    enc = tiny()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"4 attention bias.*encoder\.layer\.0\.attention\.attention\.q_bias"):
        load_encoder_weights(enc, absent)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # untouched

    zeroed = rewrite(folder, tmp_path / "zeroed",
                     lambda sd: {k: (torch.zeros_like(v) if "_bias" in k else v) for k, v in sd.items()})
    with pytest.raises(CheckpointError, match="exactly zero"):
        load_encoder_weights(tiny(), zeroed)

    # transformers' in-memory layout (query.bias / value.bias, an all-zero key.bias) round-trips too
    def new_layout(sd):
        out = {k.replace("q_bias", "query.bias").replace("v_bias", "value.bias"): v for k, v in sd.items()}
        out.update({k.replace("q_bias", "key.bias"): torch.zeros_like(v) for k, v in sd.items() if "q_bias" in k})
        return out

    enc = tiny().eval()
    report = load_encoder_weights(enc, rewrite(folder, tmp_path / "new", new_layout))
    assert any("key.bias" in k for k in report.ignored)
    layer = model.videomae.encoder.layer[1].attention.attention
    assert torch.equal(enc.blocks[1].attn.q_bias, layer.query.bias) and enc.blocks[1].attn.v_bias.abs().min() > 0
    assert torch.allclose(enc(clips()).detach(), hf_pooled(model, clips()), atol=1e-4)

    def key_bias(sd):
        return {**new_layout(sd), "videomae.encoder.layer.0.attention.attention.key.bias": torch.ones(32)}

    with pytest.raises(CheckpointError, match="key.bias.*non-zero"):
        load_encoder_weights(tiny(), rewrite(folder, tmp_path / "kbias", key_bias))


def test_use_mean_pooling_false_is_refused_with_the_fix(hf, tmp_path):
    for cls in ("VideoMAEForVideoClassification", "VideoMAEModel"):
        folder, _ = hf_folder(hf, tmp_path / cls, cls=cls, use_mean_pooling=False)
        with pytest.raises(CheckpointError, match=r'use_mean_pooling.*set "use_mean_pooling": true'):
            load_encoder_weights(tiny(), folder)
    # the fix it names: the backbone loads, layernorm dropped, fc_norm fresh
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_mean_pooling": True}))
    report = load_encoder_weights(tiny(), folder)
    assert any("layernorm" in k for k in report.ignored) and any(k.startswith("fc_norm") for k in report.ignored)


def test_hf_config_of_another_size_or_model_names_the_fix():
    obj = {"hf_config": {"model_type": "videomae", "hidden_size": 768, "num_hidden_layers": 12}, "state_dict": {}}
    with pytest.raises(CheckpointError, match="model.arch=videomae_vit_b"):
        adapt_checkpoint(obj, arch="videomae_vit_s")
    obj["hf_config"].update(hidden_size=1024, num_hidden_layers=24)
    with pytest.raises(CheckpointError, match="videomae_vit_s .384-d"):
        adapt_checkpoint(obj, arch="videomae_vit_b")
    with pytest.raises(CheckpointError, match="'vit'.*not VideoMAE"):
        adapt_checkpoint({"hf_config": {"model_type": "vit"}, "state_dict": {}}, arch="videomae_vit_b")


def test_sinusoid_table_is_videomae_s(hf):
    from transformers.models.videomae.modeling_videomae import (
        get_sinusoid_encoding_table,
    )

    assert torch.equal(sinusoid_table(98, 32), get_sinusoid_encoding_table(98, 32)[0])
    assert torch.equal(sinusoid_table(1568, 768)[:10], get_sinusoid_encoding_table(10, 768)[0])


# ----------------------------------------------------------------------------------------------
# The original release's files


def test_release_files_load_strictly(tmp_path):
    x = clips()
    source = tiny().eval()
    randomise(source)
    sd = source.state_dict()
    table = sinusoid_table(16, 32)[None]

    # fine-tune layout under "module" (DeepSpeed), with the source classifier and a fixed pos_embed
    torch.save({"module": {**sd, "head.weight": torch.randn(400, 32), "head.bias": torch.randn(400),
                           "pos_embed": table}}, tmp_path / "ft.pth")
    enc = tiny().eval()
    report = load_encoder_weights(enc, tmp_path / "ft.pth")
    assert report.format == "videomae-finetune"
    assert report.ignored == {"head.* (source classifier)": 2, "pos_embed (the fixed sinusoid table; sdtl recomputes it)": 1}
    assert torch.equal(enc(x), source(x))

    # pre-training layout under "model": encoder.* (with norm, no fc_norm), decoder.*, encoder_to_decoder, mask_token
    enc_keys = {f"encoder.{k}": v for k, v in sd.items() if not k.startswith("fc_norm.")}
    pre = {**enc_keys, "encoder.norm.weight": torch.randn(32), "encoder.norm.bias": torch.randn(32),
           "decoder.blocks.0.norm1.weight": torch.ones(16), "decoder.head.weight": torch.randn(768, 16),
           "encoder_to_decoder.weight": torch.randn(16, 32), "mask_token": torch.randn(1, 1, 16)}
    torch.save({"model": pre, "epoch": 1599}, tmp_path / "pre.pth")
    enc = tiny().eval()
    report = load_encoder_weights(enc, tmp_path / "pre.pth")
    assert report.format == "videomae-pretrain"
    assert report.ignored["decoder.* (pre-training decoder)"] == 2 and report.ignored["mask_token (pre-training decoder)"] == 1
    assert any(k.startswith("encoder.norm.*") for k in report.ignored)
    with torch.no_grad():
        source.fc_norm.weight.fill_(1.0)
        source.fc_norm.bias.zero_()
    assert torch.equal(enc(x), source(x))

    # an extra or a missing key is named
    torch.save({"module": {**sd, "blocks.0.attn.qkv.bias": torch.zeros(96)}}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): blocks\.0\.attn\.qkv\.bias"):
        load_encoder_weights(tiny(), tmp_path / "extra.pth")
    torch.save({"module": {k: v for k, v in sd.items() if k != "blocks.1.attn.v_bias"}}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): blocks\.1\.attn\.v_bias"):
        load_encoder_weights(tiny(), tmp_path / "missing.pth")
    # a learned position embedding, or a token-0 (use_mean_pooling=False) fine-tune, cannot load
    torch.save({"module": {**sd, "pos_embed": torch.randn(1, 16, 32)}}, tmp_path / "learned.pth")
    with pytest.raises(CheckpointError, match="not VideoMAE's fixed sinusoid"):
        load_encoder_weights(tiny(), tmp_path / "learned.pth")
    no_fc = {k: v for k, v in sd.items() if not k.startswith("fc_norm.")}
    torch.save({"module": {**no_fc, "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)}}, tmp_path / "tok0.pth")
    with pytest.raises(CheckpointError, match="use_mean_pooling=False"):
        load_encoder_weights(tiny(), tmp_path / "tok0.pth")


def test_sdtl_exports_and_classifier_state_dicts_round_trip(tmp_path):
    from sdtl.models.checkpoints import export_encoder
    from sdtl.models.classifier import VideoClassifier

    source = tiny().eval()
    randomise(source)
    export_encoder(source, tmp_path / "enc.safetensors")
    enc = tiny().eval()
    load_encoder_weights(enc, tmp_path / "enc.safetensors")
    assert torch.equal(enc(clips()), source(clips()))
    torch.save(VideoClassifier(source, 5).state_dict(), tmp_path / "clf.pth")
    enc = tiny().eval()
    report = load_encoder_weights(enc, tmp_path / "clf.pth")
    assert report.ignored == {"head.* (the classifier head)": 2}
    assert torch.equal(enc(clips()), source(clips()))


# ----------------------------------------------------------------------------------------------
# The encoder itself


def test_feature_taps_show_5d_maps_and_replacing_them_changes_the_stream():
    from sdtl.regularizers.delta import default_layers

    enc = tiny().eval()
    randomise(enc)
    x = clips()
    base = enc(x)
    names = spec_of("videomae_vit_s").feature_layers(enc)
    assert names == default_layers(enc) == ["taps.0", "taps.1"] and enc.tap_blocks == (0, 1)
    modules = dict(enc.named_modules())
    seen = []
    handles = [modules[n].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone())) for n in names]
    assert torch.equal(enc(x), base)  # a hook that returns nothing changes nothing
    assert [tuple(m.shape) for m in seen] == [(2, 32, 4, 2, 2)] * 2
    for h in handles:
        h.remove()
    # the map is the block's tokens laid out on the (T', H', W') grid of the tubelet embedding
    with torch.no_grad():
        tokens = enc.patch_embed(x).flatten(2).transpose(1, 2) + sinusoid_table(16, 32)
        tokens = enc.blocks[0](tokens)
    assert torch.allclose(seen[0], tokens.transpose(1, 2).reshape(2, 32, 4, 2, 2), atol=1e-6)
    assert torch.allclose(enc.fc_norm(seen[1].mean((2, 3, 4))), base, atol=1e-6)

    def zero(module, inputs, output):
        output = output.clone()
        output[:, 3] = 0
        return output

    handle = modules["taps.0"].register_forward_hook(zero)
    assert not torch.allclose(enc(x), base)
    handle.remove()
    assert torch.equal(enc(x), base)
    with torch.device("meta"):
        assert build_encoder("videomae_vit_b").tap_blocks == (2, 5, 8, 11)


def test_depth_ids_and_weight_decay_groups():
    spec = spec_of("videomae_vit_b")
    with torch.device("meta"):
        big = build_encoder("videomae_vit_b")
    for enc in (tiny(), big):
        ids = {name: spec.depth_of(name) for name, _ in enc.named_parameters()}  # every parameter has one
        assert ids["patch_embed.proj.weight"] == 0 and ids["blocks.0.attn.q_bias"] == 1
        assert ids["fc_norm.weight"] is None  # with the head, at the full lr
    assert {spec.depth_of(n) for n, _ in big.named_parameters()} == set(range(13)) | {None}
    # the optimizer then reproduces VideoMAE's scales d^(13 - id): embeddings 0.7^13, block 0 0.7^12,
    # block 11 0.7, fc_norm and the head 1
    from sdtl.engine.config import OptimConfig
    from sdtl.engine.optim import build_optimizer

    enc = build_encoder("videomae_vit_b")
    head = torch.nn.Linear(enc.feature_dim, 3)
    opt = build_optimizer(OptimConfig(name="adamw", lr=1.0, layer_decay=0.7), enc, head)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(enc.named_parameters())
    for name, scale in (("patch_embed.proj.weight", 0.7 ** 13), ("blocks.0.attn.qkv.weight", 0.7 ** 12),
                        ("blocks.11.mlp.fc2.weight", 0.7), ("fc_norm.weight", 1.0)):
        assert lr[id(params[name])] == pytest.approx(scale), name
    assert all(lr[id(p)] == 1.0 for p in head.parameters())
    exempt = {n for n, p in big.named_parameters() if spec.no_weight_decay(n, p)}
    for name in ("blocks.3.attn.q_bias", "blocks.3.attn.v_bias", "blocks.3.norm1.weight", "blocks.3.norm2.bias",
                 "blocks.3.attn.proj.bias", "blocks.3.mlp.fc1.bias", "fc_norm.weight", "fc_norm.bias",
                 "patch_embed.proj.bias"):
        assert name in exempt
    for name in ("blocks.3.attn.qkv.weight", "blocks.3.attn.proj.weight", "blocks.3.mlp.fc1.weight",
                 "blocks.3.mlp.fc2.weight", "patch_embed.proj.weight"):
        assert name not in exempt
    assert spec.source_classifier == ("head.",)


def test_grad_checkpointing_and_drop_path(monkeypatch):
    from sdtl.models import videomae

    calls = []
    real = videomae.checkpoint
    monkeypatch.setattr(videomae, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = clips()

    def loss_and_grads(enc):
        torch.manual_seed(3)
        loss = enc(x).square().sum()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in enc.named_parameters()}

    for rate in (0.0, 0.3):
        plain, ckpt = tiny(drop_path=rate).train(), tiny(drop_path=rate).train()
        ckpt.set_grad_checkpointing()
        loss_a, grads_a = loss_and_grads(plain)
        loss_b, grads_b = loss_and_grads(ckpt)
        assert torch.equal(loss_a, loss_b)
        assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5) for n in grads_a)
    assert len(calls) == 4  # 2 blocks x 2 rates
    with torch.no_grad():  # no gradients -> no checkpointing
        ckpt(x)
    assert len(calls) == 4

    # drop path: linear over depth, inactive in eval, stochastic in training
    enc = tiny(drop_path=0.4)
    assert [getattr(b.drop_path, "p", 0.0) for b in enc.blocks] == [0.0, 0.4]
    ref = tiny()
    ref.load_state_dict(enc.state_dict())
    assert torch.equal(enc.eval()(x), ref.eval()(x))
    enc.train()
    outs = [enc(clips((8, 3, 8, 16, 16))) for _ in range(2)]
    assert not torch.equal(outs[0], outs[1])


def test_inputs_sizes_options_and_counts():
    enc = tiny().eval()
    assert enc.feature_dim == 32 and enc(clips((1, 3, 4, 24, 32))).shape == (1, 32)  # any multiple of 2 / 8
    with pytest.raises(ValueError, match="multiples of 8"):
        enc(clips((1, 3, 8, 12, 16)))
    for bad in ("small", "base"):
        with pytest.raises(ConfigError) as info:
            build_encoder("videomae_vit_b", variant=bad)
        assert info.value.key == "model.variant" and "'tiny' (CPU tests)" in str(info.value)
    with torch.device("meta"):
        for arch, params, dim in (("videomae_vit_b", 86_227_200, 768), ("videomae_vit_s", 21_879_936, 384)):
            enc = build_encoder(arch)
            assert sum(p.numel() for p in enc.parameters()) == params and enc.feature_dim == dim
            assert not any("pos" in k for k in enc.state_dict())
    spec = spec_of("videomae_vit_s")
    assert (spec.input.frames, spec.input.size, spec.feature_dim) == (16, 224, 384)
    assert spec.input_of({"variant": "tiny"}).size == 16 and spec.input_of({"variant": "tiny"}).frames == 8
    assert spec.input.problems(16, 112) == [] and spec.input.problems(15, 100)
