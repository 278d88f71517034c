"""What RSPNet pre-training costs: one rspnet step against one plain fine-tuning step on the same
encoder, and the two-clips-per-video loader against the one-clip loader.

1. **Steps** (same encoder, batch and device; ABAB interleaved, median of ``--steps`` each after two
   warm-up steps):
   * *fine-tune*: the encoder + linear head on ``[B, 3, T, S, S]``, cross-entropy, backward, optimizer step;
   * *rspnet*: :meth:`sdtl.pretext.rspnet.RSPNet.step` as the engine runs it on ``[B, 2, 3, 2T, S, S]``
     windows: momentum update of the key network, the speed split, two key forwards (no grad), one query
     forward, the A-VID + RSP loss against the queue, enqueue; then backward and the optimizer step.
   The query's clip has the same T frames as the fine-tuning clip, so the ratio is what the two extra
   key forwards, the momentum update and the loss cost. A key forward costs about a third of a
   forward + backward, so ~1.7x is what the arithmetic predicts.
2. **Loaders** (``--videos`` synthetic pool videos written by ``sdtl synth``, or ``--root`` a folder of
   videos): clips/s of ``RSPNetClipDataset`` (two 2T-frame windows per video, colour augmentation) and
   of the one-clip ``PretextClipDataset`` of the speed task (one T-frame clip), each through a
   DataLoader with ``--workers`` workers, one epoch after a warm-up batch. A "clip" of the rspnet loader
   is one video's pair: what one query of a step needs.

    python benchmarks/rspnet_cost.py                                  # CPU: the demo's R(2+1)D, 16x32², b=8
    python benchmarks/rspnet_cost.py --width 1 --size 112 --batch 16   # the paper's encoder (a GPU)
    python benchmarks/rspnet_cost.py --skip-loader --arch c3d --width 0.25
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_common import sync

from sdtl.models import build_encoder, build_model
from sdtl.pretext.rspnet import RSPNet, RSPNetModel


def bench_steps(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    b, t, s = args.batch, args.clip_len, args.size
    ft = build_model(args.arch, num_classes=101, width=args.width).to(device)
    ft_opt = torch.optim.SGD(ft.parameters(), lr=1e-3, momentum=0.9)
    query = RSPNetModel(build_encoder(args.arch, width=args.width)).to(device)
    rsp = RSPNet(query, queue_size=args.queue, global_batch=b, key_momentum=0.999)
    rsp_opt = torch.optim.SGD(query.parameters(), lr=1e-3, momentum=0.9)
    clips = torch.randn(b, 3, t, s, s, device=device)
    labels = torch.randint(0, 101, (b,), device=device)
    windows = torch.randn(b, 2, 3, 2 * t, s, s, device=device)

    def finetune_step():
        loss = F.cross_entropy(ft(clips), labels)
        ft_opt.zero_grad(set_to_none=True)
        loss.backward()
        ft_opt.step()

    def rspnet_step():
        out = rsp.step(query, windows[:, 0], windows[:, 1])
        rsp_opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        rsp_opt.step()

    times = {"finetune": [], "rspnet": []}
    for i in range(args.steps + 2):
        for name, fn in (("finetune", finetune_step), ("rspnet", rspnet_step)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"finetune_ms": 1000 * med["finetune"], "rspnet_ms": 1000 * med["rspnet"],
            "ratio": med["rspnet"] / med["finetune"]}


def bench_loaders(args) -> dict:
    from sdtl.data.videos import find_videos
    from sdtl.pretext.dataset import PretextClipDataset, RSPNetClipDataset
    from sdtl.pretext.speed import SpeedPrediction

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from sdtl.data.synthetic import generate_synthetic

            root = generate_synthetic(Path(tmp) / "synth", preset="tiny", seed=0)
        paths = find_videos(str(root), None)[: args.videos]
        loaders = {
            "one clip (speed task)": PretextClipDataset(paths, SpeedPrediction([1, 2, 4, 8], args.clip_len), args.size,
                                                        "auto", 0),
            "two clips (rspnet)": RSPNetClipDataset(paths, args.clip_len, args.size, "auto", 0),
        }
        out = {}
        for name, ds in loaders.items():
            loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=False, num_workers=args.workers,
                                                 persistent_workers=args.workers > 0)
            it = iter(loader)
            next(it)  # warm-up: workers started, first decodes
            t0, n = time.perf_counter(), 0
            for batch in it:
                n += batch["video"].shape[0]
            for batch in loader:  # a second full epoch (the first was short by its warm-up batch)
                n += batch["video"].shape[0]
            out[name] = n / (time.perf_counter() - t0)
        return {"videos": len(paths), "clips_per_s": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="r2plus1d_vcop")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queue", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--videos", type=int, default=48, help="loader: pool videos read per epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", help="loader: a folder of videos (default: the synthetic tiny pool)")
    parser.add_argument("--skip-loader", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    steps = bench_steps(args, device)
    print(f"## rspnet step vs plain fine-tuning step ({args.arch} width {args.width:g}, {args.clip_len}x{args.size}², "
          f"batch {args.batch}, queue {args.queue}, {device}, median of {args.steps})\n")
    print("| step | ms | × fine-tune |\n|---|---|---|")
    print(f"| plain fine-tune (1 fwd+bwd) | {steps['finetune_ms']:.1f} | 1.00 |")
    print(f"| rspnet (2 key fwd + 1 query fwd+bwd) | {steps['rspnet_ms']:.1f} | {steps['ratio']:.2f} |")
    if not args.skip_loader:
        loaders = bench_loaders(args)
        print(f"\n## loaders ({loaders['videos']} videos, {args.clip_len} frames at {args.size}², batch {args.batch}, "
              f"{args.workers} workers)\n")
        print("| loader | clips/s |\n|---|---|")
        for name, rate in loaders["clips_per_s"].items():
            print(f"| {name} | {rate:.1f} |")


if __name__ == "__main__":
    main()
