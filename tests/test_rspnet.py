"""RSPNet pre-training (``task.name: rspnet``): the loss against an independent computation, the speed
split, the queue, the momentum update, the augmentation, one step, exact resume, DDP (key gathering
and shuffle-BN), and the encoder it writes loading into ``sdtl finetune``."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtl.data.sampling import TwoClipColourSampler
from sdtl.data.transforms import (
    GREY_WEIGHTS,
    apply_colour_jitter,
    colour_jitter_params,
    colour_train_transform,
    random_resized_crop_params,
    rgb_to_grey,
    shift_hue,
)
from sdtl.errors import ConfigError
from sdtl.pretext.rspnet import (
    RSPNet,
    RSPNetModel,
    momentum_update,
    rspnet_loss,
    speed_frame_indices,
    split_speeds,
    trimmed_queue_size,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def unit(*shape, generator):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


def tiny_model(embed_dim: int = 16) -> RSPNetModel:
    from sdtl.models.classifier import build_encoder

    return RSPNetModel(build_encoder("r2plus1d_vcop", width=0.0625), embed_dim)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------- the loss
def reference_loss(q_a, q_m, k_a, k_m, kn_a, kn_m, queue, tau, margin, w_a, w_m):
    """RSPNet's objective written out per sample in float64 (InfoNCE as -pos + log(e^pos + sum e^neg))."""
    n = q_a.shape[0]
    avid = 0.0
    for i in range(n):
        negatives = [torch.dot(q_a[i], queue[j]) / tau for j in range(queue.shape[0])]
        for key in (k_a[i], kn_a[i]):
            pos = torch.dot(q_a[i], key) / tau
            avid = avid - pos + torch.log(torch.exp(pos) + sum(torch.exp(v) for v in negatives))
    rsp = sum(torch.clamp(margin - (torch.dot(q_m[i], k_m[i]) - torch.dot(q_m[i], kn_m[i])) / tau, min=0)
              for i in range(n)) / n
    return w_a * avid / n + w_m * rsp, avid / n, rsp


def test_loss_value_and_gradient_match_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    n, d, k, tau = 6, 16, 20, 0.07
    vectors = [unit(n, d, generator=g) for _ in range(6)]
    queue = unit(k, d, generator=g)
    diff = ((vectors[1] * vectors[3]).sum(1) - (vectors[1] * vectors[5]).sum(1)) / tau
    middle = diff.sort().values[n // 2 - 1: n // 2 + 1]
    margin = float(middle.mean())  # the hinge is active for half the samples (none sits at its kink)
    active = (margin - diff > 0).sum().item()
    assert 0 < active < n
    ours = [v.clone().requires_grad_(i < 2) for i, v in enumerate(vectors)]
    out = rspnet_loss(*ours, queue, tau, margin, avid_weight=0.7, rsp_weight=1.3)
    out["loss"].backward()
    ref = [v.double().clone().requires_grad_(i < 2) for i, v in enumerate(vectors)]
    total, avid, rsp = reference_loss(*ref, queue.double(), tau, margin, 0.7, 1.3)
    total.backward()
    assert torch.allclose(out["loss"].double(), total, rtol=1e-5)
    assert torch.allclose(out["avid"].double(), avid, rtol=1e-5)
    assert torch.allclose(out["rsp"].double(), rsp, rtol=1e-5)
    for mine, theirs in zip(ours[:2], ref[:2]):
        assert torch.allclose(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)
    assert int(out["rsp_correct"]) == int((diff > 0).sum())


# ------------------------------------------------------------------------------------ the speeds
@pytest.mark.parametrize("batch", [4, 5])
def test_speed_split_picks_the_frames_of_each_speed(batch):
    t = 8
    frames = torch.arange(2 * t, dtype=torch.float32).view(1, 1, 2 * t, 1, 1)
    clip_q = frames.expand(batch, 3, 2 * t, 2, 2).clone()
    clip_k = clip_q + 100  # the key clip's frames are told apart from the query's
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(batch))
    q, k_pos, k_neg, slow = split_speeds(clip_q, clip_k, perm)
    one_x, two_x = speed_frame_indices(t)
    assert one_x == list(range(8)) and two_x == [0, 2, 4, 6, 8, 10, 12, 14]
    assert sorted(perm[: batch // 2].tolist()) == slow.nonzero().flatten().tolist()
    assert int(slow.sum()) == batch // 2
    for i in range(batch):
        same, other = (one_x, two_x) if slow[i] else (two_x, one_x)
        assert q[i, 0, :, 0, 0].tolist() == same
        assert k_pos[i, 0, :, 0, 0].tolist() == [100 + f for f in same]
        assert k_neg[i, 0, :, 0, 0].tolist() == [100 + f for f in other]


def test_sampler_loads_two_independent_windows_and_loops_short_videos():
    sampler = TwoClipColourSampler(clip_len=32, size=16)
    drawn = sampler.draw(200, torch.Generator().manual_seed(3))
    assert len(drawn.clips) == 2
    for clip in drawn.clips:
        assert clip == list(range(clip[0], clip[0] + 32))
    assert drawn.clips[0] != drawn.clips[1]  # independent starts (this seed)
    short = sampler.draw(10, torch.Generator().manual_seed(3))
    assert short.clips == ([i % 10 for i in range(32)],) * 2
    frames = torch.randint(0, 256, (32, 24, 30, 3), dtype=torch.uint8)
    views = sampler.views([frames, frames], torch.Generator().manual_seed(0))
    assert views["video"].shape == (2, 3, 32, 16, 16)


# ------------------------------------------------------------------------------------- the queue
def test_queue_size_is_trimmed_to_the_global_batch():
    assert trimmed_queue_size(16384, 32 * 4) == 16384
    assert trimmed_queue_size(100, 32) == 96
    with pytest.raises(ValueError, match="less than one global batch"):
        trimmed_queue_size(10, 32)


def test_queue_pointer_wraps_around():
    torch.manual_seed(0)
    rsp = RSPNet(tiny_model(4), queue_size=8, global_batch=3)
    assert rsp.queue.shape == (6, 4)
    assert torch.allclose(rsp.queue.norm(dim=1), torch.ones(6))
    batches = [torch.full((3, 4), float(i)) for i in range(1, 4)]
    ptrs = []
    for keys in batches:
        rsp.enqueue(keys)
        ptrs.append(rsp.ptr)
    assert ptrs == [3, 0, 3]
    assert rsp.queue[:3].eq(3).all() and rsp.queue[3:].eq(2).all()
    # a resume with another global batch keeps the newest keys, oldest first from slot 0
    smaller = RSPNet(tiny_model(4), queue_size=4, global_batch=2)
    smaller.load_state_dict(rsp.state_dict())
    assert smaller.queue[:1].eq(2).all() and smaller.queue[1:].eq(3).all() and smaller.ptr == 0


def test_momentum_update_is_exact_and_leaves_buffers_alone():
    torch.manual_seed(0)
    query = tiny_model(4)
    key = copy.deepcopy(query)
    with torch.no_grad():
        for p in key.parameters():
            p.add_(torch.randn_like(p))
        for b in key.buffers():
            if b.is_floating_point():
                b.add_(1.5)
    before = copy.deepcopy(key)
    momentum_update(key, query, 0.999)
    for (name, pk), pk0, pq in zip(key.named_parameters(), before.parameters(), query.parameters()):
        assert torch.equal(pk, pk0 * 0.999 + pq * (1 - 0.999)), name
    for bk, bk0 in zip(key.buffers(), before.buffers()):
        assert torch.equal(bk, bk0)


# -------------------------------------------------------------------------------------- one step
def test_step_is_momentum_then_keys_then_query_then_enqueue():
    torch.manual_seed(0)
    model = tiny_model()
    rsp = RSPNet(model, queue_size=8, global_batch=4, key_momentum=0.9, temperature=0.1, margin=1.0)
    with torch.no_grad():
        for p in rsp.key_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    key, queue = copy.deepcopy(rsp.key_model), rsp.queue.clone()
    g = torch.Generator().manual_seed(1)
    clip_q, clip_k = torch.randn(4, 3, 8, 16, 16, generator=g), torch.randn(4, 3, 8, 16, 16, generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    out = rsp.step(model, clip_q, clip_k, perm)

    momentum_update(key, model, 0.9)  # before the forwards
    for a, b in zip(key.parameters(), rsp.key_model.parameters()):
        assert torch.equal(a, b)
    q_in, k_pos, k_neg, _ = split_speeds(clip_q, clip_k, perm)
    with torch.no_grad():
        kn_a, kn_m = key(k_neg)
        k_a, k_m = key(k_pos)
    expected = rspnet_loss(*model(q_in), k_a, k_m, kn_a, kn_m, queue, 0.1, 1.0)
    for part in ("loss", "avid", "rsp"):
        assert torch.allclose(out[part], expected[part], atol=1e-6), part
    assert torch.equal(rsp.queue[:4], kn_a) and torch.equal(rsp.queue[4:], queue[4:]) and rsp.ptr == 4


def test_training_steps_on_a_tiny_model_are_finite_and_move_both_networks():
    torch.manual_seed(0)
    model = tiny_model()
    rsp = RSPNet(model, queue_size=16, global_batch=4, key_momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start_q = [p.detach().clone() for p in model.parameters()]
    start_k = [p.detach().clone() for p in rsp.key_model.parameters()]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        out = rsp.step(model, torch.randn(4, 3, 8, 16, 16, generator=g), torch.randn(4, 3, 8, 16, 16, generator=g))
        assert all(math.isfinite(float(out[k].detach())) for k in ("loss", "avid", "rsp"))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert all(p.grad is not None for p in model.parameters())  # backbone and both heads learn
    assert not any(p.requires_grad for p in rsp.key_model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start_q, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(start_k, rsp.key_model.parameters()))
    assert rsp.ptr == 12


# ------------------------------------------------------------------------------ the augmentation
def _frames(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_augmentation_is_a_function_of_its_generator():
    frames = _frames()
    torch.manual_seed(1)
    a = colour_train_transform(frames, 16, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(2)  # the global RNG plays no part
    b = colour_train_transform(frames, 16, generator=torch.Generator().manual_seed(5))
    c = colour_train_transform(frames, 16, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 4, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_greyscale_comes_before_the_jitter():
    from torchvision.transforms.v2 import functional as TF

    frames = _frames()
    out = colour_train_transform(frames, 16, generator=torch.Generator().manual_seed(0), grey_p=1.0,
                                 jitter=(0, 0, 0, 0.4), flip_p=0.0, norm=IDENTITY)  # greyscale + hue only
    g = torch.Generator().manual_seed(0)
    top, left, h, w = random_resized_crop_params(20, 24, g, (0.4, 1.0))
    g.manual_seed(0)
    random_resized_crop_params(20, 24, g, (0.4, 1.0))
    torch.rand(1, generator=g)
    hue = colour_jitter_params(g, 0, 0, 0, 0.4)["hue"]
    assert abs(hue) > 0.05
    crop = TF.resized_crop(frames.permute(0, 3, 1, 2), top, left, h, w, [16, 16], antialias=True).float() / 255
    grey = rgb_to_grey(crop).permute(1, 0, 2, 3)  # [1, T, S, S]
    # grey, then a hue shift: still that grey (a grey pixel has no hue); the other order would not be
    assert torch.allclose(out, grey.expand(3, -1, -1, -1), atol=1e-5)
    hue_first = rgb_to_grey(TF.adjust_hue(crop, hue)).permute(1, 0, 2, 3)
    assert (hue_first - grey).abs().max() > 0.01


def test_hue_shift_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(4, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    x[0] = x[0, :1]  # a grey frame
    x[1, :, 0, 0] = torch.tensor([0.5, 0.5, 0.2])  # ties for the largest channel
    for shift in (-0.4, -0.1, 0.0, 0.25, 0.4):
        assert torch.allclose(shift_hue(x, shift), TF.adjust_hue(x, shift), atol=1e-5), shift


def test_colour_jitter_is_always_applied_in_the_drawn_order_with_the_clip_mean():
    frames = _frames()
    crop_only = [colour_train_transform(frames, 16, generator=torch.Generator().manual_seed(s), grey_p=0.0,
                                        jitter=(0, 0, 0, 0), norm=IDENTITY) for s in range(12)]
    jittered = [colour_train_transform(frames, 16, generator=torch.Generator().manual_seed(s), grey_p=0.0,
                                       norm=IDENTITY) for s in range(12)]
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(crop_only, jittered))  # no probability gate

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[0] *= 0.2  # frames of different brightness: a per-frame mean would differ from the clip's
    params = {"order": [1, 0, 2, 3], "brightness": 1.3, "contrast": 0.0, "saturation": 1.0, "hue": 0.0}
    out = apply_colour_jitter(x, params)
    clip_mean = float(rgb_to_grey(x).mean())
    assert torch.allclose(out, torch.full_like(x, min(1.0, 1.3 * clip_mean)), atol=1e-6)
    params["order"] = [0, 1, 2, 3]  # brightness first: the clip's mean after it
    expected = rgb_to_grey((1.3 * x).clamp(0, 1)).mean()
    assert torch.allclose(apply_colour_jitter(x, params), expected.expand_as(x), atol=1e-6)
    assert GREY_WEIGHTS == (0.2989, 0.587, 0.114)


# --------------------------------------------------------------------------------------- config
def test_task_keys_belong_to_their_task(tiny_synth):
    from sdtl.engine.config import load_config, validate_ranges

    def check(*sets):
        validate_ranges(load_config("synthetic_tiny_rspnet_pretrain", [f"data.root={tiny_synth}", *sets],
                                    kind="pretrain"))

    check()
    with pytest.raises(ConfigError, match="task.strides: used only by task.name=speed"):
        check("task.strides=[1,2]")
    with pytest.raises(ConfigError, match="task.queue_size: used only by task.name=rspnet"):
        check("task.name=speed")
    with pytest.raises(ConfigError, match="task.temperature"):
        check("task.temperature=0")


RECIPES = ("k400_c3d_rspnet_pretrain", "k400_r21d_rspnet_pretrain", "ucf101_r21d_rspnet_pretrain",
           "synthetic_rspnet_pretrain", "synthetic_tiny_rspnet_pretrain")


def test_the_rspnet_recipes_are_listed_and_valid():
    from sdtl.engine.config import list_recipes, load_config, validate_ranges

    listed = {r["name"]: r for r in list_recipes()}
    lrs = {}
    for name in RECIPES:
        assert listed[name]["kind"] == "pretrain" and listed[name]["description"]
        cfg = load_config(name, ["data.root=/x"], kind="pretrain")
        validate_ranges(cfg)
        assert cfg.task.name == "rspnet" and cfg.data.crop_area == [0.4, 1.0]
        lrs[name] = cfg.optim.lr
    assert lrs["k400_c3d_rspnet_pretrain"] == 0.2 and lrs["k400_r21d_rspnet_pretrain"] == 0.1  # 4 x 32 videos
    assert lrs["ucf101_r21d_rspnet_pretrain"] == 0.1


# ----------------------------------------------------------------------------- runs and resume
class _Crash(BaseException):
    """Stands for a kill: nothing in the engine catches it."""


def _tiny_cfg(data, *sets):
    from sdtl.engine.config import load_config

    return load_config("synthetic_tiny_rspnet_pretrain", [f"data.root={data}", f"data.list_file={data}/half.txt",
                                                          "optim.epochs=2", "run.deterministic=true",
                                                          "run.threads=1", "run.tensorboard=false", *sets],
                       kind="pretrain")


def _assert_same_run(a: Path, b: Path) -> None:
    x, y = load(a / "checkpoints" / "last.pt"), load(b / "checkpoints" / "last.pt")
    for part in ("encoder", "head"):
        assert x[part].keys() == y[part].keys()
        assert all(torch.equal(x[part][k], y[part][k]) for k in x[part]), part
    sx, sy = x["task_state"]["rspnet"], y["task_state"]["rspnet"]
    assert all(torch.equal(sx["key_model"][k], sy["key_model"][k]) for k in sx["key_model"])
    assert torch.equal(sx["queue"], sy["queue"]) and sx["ptr"] == sy["ptr"]
    timing = {"clips_per_s", "data_wait", "epoch_time_s"}
    rows = [[{k: v for k, v in json.loads(r).items() if k not in timing}
             for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert rows[0] == rows[1]


@pytest.fixture(scope="module")
def half_pool(tiny_synth, tmp_path_factory):
    """The tiny pool's first 24 unlabelled videos (3 steps of 8 per epoch), for quick runs."""
    root = tmp_path_factory.mktemp("half")
    for name in ("unlabelled", "lists"):
        (root / name).symlink_to(tiny_synth / name)
    lines = (tiny_synth / "lists" / "unlabelled.txt").read_text().splitlines()[:24]
    (root / "half.txt").write_text("\n".join(lines) + "\n")
    return root


def test_resume_between_and_inside_epochs_is_bit_exact(half_pool, tmp_path, monkeypatch):
    from sdtl.engine.loop import Loop
    from sdtl.engine.pretrain import run_pretrain

    ref = tmp_path / "ref"
    run_pretrain(_tiny_cfg(half_pool), ref)
    ckpt = load(ref / "checkpoints" / "last.pt")
    state = ckpt["task_state"]["rspnet"]
    assert state["queue"].shape == (32, 128) and state["ptr"] == 6 * 8 % 32  # 6 steps of 8 keys: wrapped
    assert ckpt["task"] == "rspnet" and ckpt["task_options"]["queue_size"] == 32
    assert not (ref / "retention_probe.pt").exists()

    real_epoch, real_save = Loop.train_epoch, Loop.save_last

    def die_before_epoch_2(self, epoch):  # killed between epochs (epoch 1's checkpoint written)
        if epoch == 2:
            raise _Crash
        return real_epoch(self, epoch)

    between = tmp_path / "between"
    monkeypatch.setattr(Loop, "train_epoch", die_before_epoch_2)
    with pytest.raises(_Crash):
        run_pretrain(_tiny_cfg(half_pool), between)
    monkeypatch.setattr(Loop, "train_epoch", real_epoch)
    assert load(between / "checkpoints" / "last.pt")["epoch"] == 1
    run_pretrain(_tiny_cfg(half_pool), between, resume="auto")
    _assert_same_run(between, ref)

    def die_after_a_mid_epoch_save(self):
        real_save(self)
        if self.state.mid_epoch:
            raise _Crash

    inside = tmp_path / "inside"
    monkeypatch.setattr(Loop, "save_last", die_after_a_mid_epoch_save)
    with pytest.raises(_Crash):
        run_pretrain(_tiny_cfg(half_pool, "run.checkpoint_every_steps=2"), inside)
    monkeypatch.setattr(Loop, "save_last", real_save)
    written = load(inside / "checkpoints" / "last.pt")
    assert (written["epoch"], written["step_in_epoch"]) == (0, 2)
    run_pretrain(_tiny_cfg(half_pool, "run.checkpoint_every_steps=2"), inside, resume="auto")
    _assert_same_run(inside, ref)


@pytest.mark.slow
def test_pretrained_encoder_loads_into_finetune(tiny_synth, tmp_path):
    out, ft = tmp_path / "pre", tmp_path / "ft"
    sdtl = [sys.executable, "-m", "sdtl", "-q"]
    subprocess.run([*sdtl, "pretrain", "--config", "synthetic_tiny_rspnet_pretrain", "--set", f"data.root={tiny_synth}",
                    "--set", "run.threads=1", "--out", str(out)], env=ENV, check=True)
    encoder = out / "checkpoints" / "encoder.pt"
    proc = subprocess.run([sys.executable, "-m", "sdtl", "finetune", "--config", "synthetic_tiny", "--set",
                           f"data.root={tiny_synth}", "--set", f"model.pretrained={encoder}", "--set", "run.threads=1",
                           "--set", "optim.epochs=1", "--out", str(ft)], env=ENV, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (ft / "train.log").read_text()
    assert f"init: {encoder} (loaded 144 encoder tensors" in log and "format sdtl-pretrain" in log
    assert "ignored head (pre-training task head) (4)" in log  # both heads' weight and bias
    assert (ft / "results.json").exists()


# --------------------------------------------------------------------------------------- DDP
DDP_WORKER = r'''
"""Two gloo ranks through the real engine; checks each step's enqueue and, after training,
shuffle-BN and that both ranks hold the same networks and queue."""
import copy, json, sys
import torch
import torch.distributed as dist
from sdtl.engine.config import load_config
from sdtl.engine.loop import Loop
from sdtl.engine.pretrain import run_pretrain
from sdtl.pretext.rspnet import RSPNet

data, out, report = sys.argv[1:4]
checks = {"steps": 0, "mixed_ranks": 0}


def gathered(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


real_step = RSPNet.step


def checked_step(self, net, clip_q, clip_k, perm=None):
    ptr = self.ptr
    out = real_step(self, net, clip_q, clip_k, perm)
    keys = gathered(out["k_neg_a"])  # rank 0's keys, then rank 1's
    assert not torch.equal(keys[0], keys[1])
    assert torch.equal(self.queue[ptr:ptr + 4], torch.cat(keys)), "the queue lacks a rank's keys"
    checks["steps"] += 1
    return out


real_fit = Loop.fit


def checked_fit(self):
    real_fit(self)
    rsp, rank = self.task.rspnet, dist.get_rank()
    # shuffle-BN: recompute the key features from the gathered batch and rank 0's permutation
    x = torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(10 + rank))
    key = copy.deepcopy(rsp.key_model)
    rng = torch.get_rng_state()
    a, m = rsp.key_forward(x)
    torch.set_rng_state(rng)
    perm = torch.randperm(4)
    dist.broadcast(perm, src=0)
    x_all = torch.cat(gathered(x))
    expected = torch.empty(4, a.shape[1])
    with torch.no_grad():
        for r in range(2):
            idx = perm[2 * r: 2 * r + 2]
            expected[idx] = key(x_all[idx])[0]
    assert torch.allclose(a, expected[2 * rank: 2 * rank + 2], atol=1e-6), "shuffle-BN"
    checks["mixed_ranks"] = int(sorted(perm[:2].tolist()) not in ([0, 1], [2, 3]))
    with torch.no_grad():
        local = key(x)[0]
    checks["differs_from_local_bn"] = bool(not torch.allclose(local, a, atol=1e-5))
    # the same networks and queue on both ranks
    for name, module in (("query", rsp.model), ("key", rsp.key_model)):
        flat = torch.cat([p.detach().flatten() for p in module.parameters()])
        one, two = gathered(flat)
        assert torch.equal(one, two), name
    one, two = gathered(rsp.queue)
    assert torch.equal(one, two) and rsp.ptr == 12 * 4 % 20
    if rank == 0:
        with open(report, "w") as fh:
            json.dump(checks, fh)


RSPNet.step = checked_step
Loop.fit = checked_fit
cfg = load_config("synthetic_tiny_rspnet_pretrain", [f"data.root={data}", "data.batch_size=2", "run.threads=1",
                                                      "task.queue_size=21", "run.tensorboard=false"], kind="pretrain")
run_pretrain(cfg, out)
'''


@pytest.mark.slow
def test_ddp_two_gloo_processes_gather_keys_and_shuffle_bn(tiny_synth, tmp_path):
    from data_helpers import free_port

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    out, report = tmp_path / "run", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(tiny_synth), str(out), str(report)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checks = json.loads(report.read_text())
    assert checks["steps"] == 12  # 48 videos / 2 ranks / batch 2
    assert not checks["mixed_ranks"] or checks["differs_from_local_bn"]
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["task_state"]["rspnet"]["queue"].shape == (20, 128)  # 21 trimmed to a multiple of 2 x 2
    assert [sorted(r["task"]) for r in ckpt["ranks"]] == [["avid_correct", "key_buffers", "rsp_correct", "seen"]] * 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["world_size"] == 2 and records[-1]["steps"] == 12
