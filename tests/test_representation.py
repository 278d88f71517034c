"""`sdtl retrieval` / `sdtl probe`: recall@k, the linear probe, the feature cache, the CLI."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from sdtl.cli import main
from sdtl.engine.representation import choose, linear_probe, probe_markdown, recall_at_k
from sdtl.errors import UserError


# ------------------------------------------------------------------------------------- recall@k
def test_recall_known_answers_any_of_top_k():
    # gallery (unit vectors at 0, 30, 60, 90 degrees) with labels 0, 1, 2, 3
    angles = torch.tensor([0.0, 30.0, 60.0, 90.0]) * math.pi / 180
    gallery = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 1, 2, 3])
    # query at 5 deg, label 2: ranking 0, 30, 60, 90 -> its class is 3rd
    # query at 85 deg, label 3: nearest is 90 -> hit at 1
    # query at 40 deg, label 9: class absent from the gallery -> never a hit
    q_angles = torch.tensor([5.0, 85.0, 40.0]) * math.pi / 180
    queries = torch.stack([q_angles.cos(), q_angles.sin()], 1)
    r = recall_at_k(queries, torch.tensor([2, 3, 9]), gallery, labels, ks=(1, 2, 3, 50))
    assert r[1] == pytest.approx(100 / 3) and r[2] == pytest.approx(100 / 3)
    assert r[3] == pytest.approx(200 / 3)
    assert r[50] == pytest.approx(200 / 3)  # k beyond the gallery ranks the whole gallery; label 9 never hits
    # cosine: the length of a vector does not matter, a zero vector gives no NaN
    r2 = recall_at_k(queries * 7, torch.tensor([2, 3, 9]), gallery * torch.tensor([[1.0], [3], [0.2], [5]]), labels,
                     ks=(1, 2, 3, 50))
    assert r2 == r
    zero = recall_at_k(torch.zeros(1, 2), torch.tensor([3]), gallery, labels, ks=(1, 4))
    assert zero == {1: 0.0, 4: 100.0}  # all similarities 0: ties in gallery order, label 3 is 4th


def test_recall_ties_rank_in_gallery_order():
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # two identical gallery vectors
    query = torch.tensor([[1.0, 0.0]])
    assert recall_at_k(query, torch.tensor([1]), same, torch.tensor([0, 1, 2]), ks=(1, 2)) == {1: 0.0, 2: 100.0}
    assert recall_at_k(query, torch.tensor([1]), same, torch.tensor([1, 0, 2]), ks=(1, 2)) == {1: 100.0, 2: 100.0}
    # many queries: ties broken the same way in every chunk
    big = torch.zeros(2500, 2)
    big[:, 0] = 1
    r = recall_at_k(big, torch.ones(2500, dtype=torch.long), same, torch.tensor([0, 1, 2]), ks=(1, 2), chunk=1000)
    assert r == {1: 0.0, 2: 100.0}
    with pytest.raises(UserError, match="positive"):
        recall_at_k(query, torch.tensor([1]), same, torch.tensor([0, 1, 2]), ks=(0,))


# ----------------------------------------------------------------------------------- the probe
def _signal_in_a_difference(n, g):
    """Class in s; x1 = s + nuisance, x2 = nuisance. Only a weakly regularised fit finds x1 - x2: strong
    L2 pulls W towards the class-mean difference, which sees x1 alone (noisy)."""
    y = torch.arange(n) % 2
    nuisance = torch.randn(n, generator=g, dtype=torch.float64) * 3
    return torch.stack([(y.double() * 2 - 1) * 0.5 + nuisance, nuisance], 1), y


def _no_signal(n, g, d=40):
    """Features independent of the labels, 70 % of class 1: the best rule is the prior (strong L2)."""
    return torch.randn(n, d, generator=g, dtype=torch.float64), (torch.arange(n) % 10 < 7).long()


def test_probe_picks_weak_regularisation_when_validation_says_so():
    g = torch.Generator().manual_seed(0)
    x, y = _signal_in_a_difference(200, g)
    xt, yt = _signal_in_a_difference(200, g)
    r = linear_probe(x, y, xt, yt, 2, torch.arange(200) % 5 == 0)
    assert r["selected"]["weight_decay"] == 1e-4
    assert [row["weight_decay"] for row in r["grid"]] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    strong = r["grid"][-1]
    assert strong["val_acc1"] < 60 and r["selected"]["val_acc1"] > 95  # the grid did discriminate
    assert r["test"]["acc1"] > 95


def test_probe_picks_strong_regularisation_when_validation_says_so():
    g = torch.Generator().manual_seed(0)
    x, y = _no_signal(80, g)
    xt, yt = _no_signal(200, g)
    r = linear_probe(x, y, xt, yt, 2, torch.arange(80) % 4 == 0)
    assert r["selected"]["weight_decay"] >= 1.0
    assert r["grid"][0]["val_acc1"] < r["selected"]["val_acc1"]
    assert 65 <= r["test"]["acc1"] <= 71  # ~ the prior's 70 %
    again = linear_probe(x, y, xt, yt, 2, torch.arange(80) % 4 == 0)
    assert again == r  # deterministic


def test_probe_with_one_weight_decay_needs_no_validation_and_selection_ties():
    g = torch.Generator().manual_seed(1)
    x, y = _signal_in_a_difference(60, g)
    r = linear_probe(x, y, x, y, 2, None, weight_decays=[0.01])
    assert r["grid"] == [] and r["selected"]["weight_decay"] == 0.01
    with pytest.raises(UserError, match="validation part"):
        linear_probe(x, y, x, y, 2, torch.zeros(60, dtype=torch.bool))
    grid = [{"weight_decay": w, "val_acc1": a, "val_loss": lo} for w, a, lo in
            ((0.1, 80.0, 0.5), (1.0, 80.0, 0.4), (10.0, 80.0, 0.4), (0.01, 70.0, 0.1))]
    assert grid[choose(grid)]["weight_decay"] == 10.0  # acc, then lower loss, then the larger decay


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture
def decode_counter(monkeypatch):
    """Counts clip-dataset items (each one decodes a video); workers=0 keeps them in this process."""
    from sdtl.data.datasets import ClipDataset

    calls = {"n": 0}
    original = ClipDataset.__getitem__

    def counting(self, index):
        calls["n"] += 1
        return original(self, index)

    monkeypatch.setattr(ClipDataset, "__getitem__", counting)
    return calls


def _args(cmd, ckpt, synth, out, *extra):
    return ["-q", cmd, "--checkpoint", str(ckpt), "--dataset", "synthetic", "--root", str(synth), "--out", str(out),
            "--workers", "0", "--backend", "pyav", "--set", "eval.num_clips=3", *extra]


def _perturbed_copy(src, dst):
    """The same checkpoint with its weights changed (content differs, path may be the same)."""
    payload = torch.load(src, weights_only=True)
    payload["encoder"] = {k: v + 0.05 if v.is_floating_point() else v for k, v in payload["encoder"].items()}
    torch.save(payload, dst)


def test_retrieval_and_probe_end_to_end_with_feature_cache(tiny_synth, tiny_encoder, tmp_path, capsys,
                                                           decode_counter):
    ckpt = tmp_path / "encoder.pt"
    shutil.copy(tiny_encoder, ckpt)
    out = tmp_path / "eval"
    assert main(_args("retrieval", ckpt, tiny_synth, out)) == 0
    first = decode_counter["n"]
    assert first == 72  # 36 training + 36 test videos, decoded once each
    printed = capsys.readouterr().out
    assert "R@1" in printed and "retrieval.json" in printed
    report = json.loads((out / "retrieval.json").read_text())
    assert list(report["recall"]) == ["R@1", "R@5", "R@10", "R@20", "R@50"]
    assert report["num_queries"] == 36 and report["num_gallery"] == 36 and report["k_beyond_gallery"] == [50]
    assert report["checkpoint"]["arch"] == "r2plus1d_vcop" and report["checkpoint"]["format"] == "sdtl-pretrain"
    assert report["checkpoint"]["arch_from"] == "recorded in the checkpoint"
    assert report["protocol"]["clips_per_video"] == 3 and report["protocol"]["crops"] == 1
    assert report["protocol"]["input_from"]["clip_len"] == "the checkpoint's recorded config"
    assert not any(v["cached"] for v in report["protocol"]["cache"].values())
    assert report["recall"]["R@50"] == 100.0  # every class is in the gallery
    md = (out / "retrieval.md").read_text()
    assert "| R@1 | R@5 | R@10 | R@20 | R@50 |" in md and "centre square" in md

    # the probe on the same folder decodes nothing: the features are in OUT/features
    assert main(_args("probe", ckpt, tiny_synth, out, "--val-fraction", "0.3")) == 0
    assert decode_counter["n"] == first
    probe = json.loads((out / "probe.json").read_text())
    assert all(v["cached"] for v in probe["protocol"]["cache"].values())
    assert 0 <= probe["test"]["acc1"] <= 100 and probe["num_test"] == 36
    assert probe["num_val"] > 0 and probe["num_fit"] + probe["num_val"] == 36
    assert len(probe["grid"]) == 6 and probe["selected"]["weight_decay"] in [r["weight_decay"] for r in probe["grid"]]
    assert "← selected" in (out / "probe.md").read_text()
    assert "acc@5" in (out / "probe.md").read_text() and "acc@5" in capsys.readouterr().out  # 6 classes: it can be < 100
    five = {**probe, "dataset": {**probe["dataset"], "num_classes": 5}}  # 5 classes: acc@5 is always 100, not shown
    assert "acc@5" not in probe_markdown(five) and probe_markdown(five).count("mean-class") == 1
    # a second retrieval: nothing decoded, the same numbers
    assert main(_args("retrieval", ckpt, tiny_synth, out)) == 0
    assert decode_counter["n"] == first
    assert json.loads((out / "retrieval.json").read_text())["recall"] == report["recall"]
    cache_files = sorted(p.name for p in (out / "features").iterdir())
    assert len(cache_files) == 2

    # the checkpoint file changes in place: its features are computed again, not taken from the cache
    _perturbed_copy(tiny_encoder, ckpt)
    assert main(_args("retrieval", ckpt, tiny_synth, out)) == 0
    assert decode_counter["n"] == 2 * first
    changed = json.loads((out / "retrieval.json").read_text())
    assert changed["checkpoint"]["sha256"] != report["checkpoint"]["sha256"]
    assert len(list((out / "features").iterdir())) == 4
    # another clip protocol is another cache entry too; --cache-dir shares features between folders
    shared = tmp_path / "cache"
    assert main(_args("retrieval", ckpt, tiny_synth, tmp_path / "other", "--cache-dir", str(shared))) == 0
    assert decode_counter["n"] == 3 * first and len(list(shared.iterdir())) == 2
    assert main(_args("probe", ckpt, tiny_synth, tmp_path / "third", "--cache-dir", str(shared),
                      "--weight-decays", "0.1")) == 0
    assert decode_counter["n"] == 3 * first
    single = json.loads((tmp_path / "third" / "probe.json").read_text())
    assert single["grid"] == [] and single["selected"]["weight_decay"] == 0.1


def _fails(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


def test_bad_inputs_are_one_line_errors_naming_them(tiny_synth, tiny_encoder, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, _args("retrieval", tmp_path / "missing.pt", tiny_synth, out), "--checkpoint", "missing.pt",
           "no such checkpoint")
    _fails(capsys, ["probe", "--checkpoint", str(tiny_encoder), "--dataset", "kinetics9", "--root", str(tiny_synth),
                    "--out", str(out)], "--dataset kinetics9", "not one of")
    _fails(capsys, _args("retrieval", tiny_encoder, tmp_path / "nowhere", out), "--root", "nowhere", "does not exist")
    _fails(capsys, _args("retrieval", tiny_encoder, tiny_synth, out, "--set", "model.arch=c3d"), "model.arch",
           "not used")
    _fails(capsys, _args("retrieval", tiny_encoder, tiny_synth, out, "--topk", "1,x"), "--topk 1,x")
    _fails(capsys, _args("probe", tiny_encoder, tiny_synth, out, "--weight-decays", "0,1"), "--weight-decays 0,1")
    _fails(capsys, _args("retrieval", tiny_encoder, tiny_synth, out, "--arch", "c3d"), "--checkpoint", "c3d")
    assert not out.exists()  # bad input leaves no folder behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _fails(capsys, _args("retrieval", tiny_encoder, tiny_synth, foreign), f"--out {foreign}", "notes.txt")
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    _fails(capsys, _args("probe", not_a_checkpoint, tiny_synth, out), "--checkpoint", "junk.pt")


def test_exported_state_dict_guessed_arch_and_undecodable_videos(tiny_synth, tiny_encoder, tmp_path, capsys):
    """A bare state dict (arch guessed from its keys, clip size given as flags); an undecodable training
    video is refused by name, or left out of the gallery with eval.skip_corrupt=true."""
    from sdtl.models.checkpoints import export_encoder
    from sdtl.models.classifier import build_encoder

    encoder = build_encoder("r2plus1d_vcop", width=0.0625)
    ckpt = export_encoder(encoder, tmp_path / "plain.pt")
    synth = tmp_path / "synth"
    shutil.copytree(tiny_synth, synth)
    broken = sorted((synth / "videos").rglob("*_g01_c01.*"))[0]
    broken.write_bytes(b"\0" * 64)
    args = ["-q", "retrieval", "--checkpoint", str(ckpt), "--dataset", "synthetic", "--root", str(synth),
            "--workers", "0", "--backend", "pyav", "--clip-len", "8", "--size", "16", "--set", "eval.num_clips=2"]
    _fails(capsys, [*args, "--out", str(tmp_path / "a")], broken.name, "eval.skip_corrupt=true")
    assert main([*args, "--out", str(tmp_path / "b"), "--set", "eval.skip_corrupt=true"]) == 0
    report = json.loads((tmp_path / "b" / "retrieval.json").read_text())
    assert report["checkpoint"]["arch"] == "r2plus1d_vcop" and report["checkpoint"]["arch_options"] == {"width": 0.0625}
    assert report["checkpoint"]["arch_from"].startswith("guessed")
    assert report["protocol"]["input_from"]["clip_len"] == "given"
    assert report["protocol"]["input_from"]["mean"].startswith("the encoder's spec")
    assert report["num_gallery"] + report["num_queries"] == 71 and report["skipped_corrupt"] == {"train": 1, "test": 0}
