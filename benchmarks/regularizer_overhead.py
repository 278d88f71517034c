"""Cost of every regularizer of the family: step time of each vs plain fine-tuning, in one run.

Same model, batch and process for all. Each measured step is a full training step as the engine runs
it (``reg.prepare`` before the student forward, ``reg.loss`` after it, backward, optimizer step,
``reg.step_end``); per round the methods run in turn (plain, sd, fixed_teacher, ...), so drift in
machine load hits all alike, and the median over rounds is reported with its ratio to plain.
Once-per-run or once-per-epoch work is not timed: SD's snapshot (once per epoch) and DELTA's channel
attention (once per run; its cost is printed separately: Σ_j C_j forwards of its clips).

    python benchmarks/regularizer_overhead.py                     # CPU demo size
    python benchmarks/regularizer_overhead.py --arch c3d --width 0.25 --size 64 --batch 4
    python benchmarks/regularizer_overhead.py --device cuda --arch r2plus1d_vcop --width 1 --size 112 --batch 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_common import sync, train_step

from sdtl.engine.config import RegularizerConfig
from sdtl.models import build_model
from sdtl.regularizers import DELTA, build_regularizer

METHODS = {  # the compare defaults' middle values; the cost does not depend on the weight
    "sd": dict(name="sd", weight=1.0),
    "fixed_teacher": dict(name="fixed_teacher", weight=1.0),
    "ema_sd": dict(name="ema_sd", weight=1.0, ema_decay=0.9),
    "l2sp": dict(name="l2sp", weight=1.0),
    "delta": dict(name="delta", weight=0.003),
    "bss": dict(name="bss", weight=1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="r2plus1d_vcop")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    opts = {"width": args.width} if args.width != 1.0 else {}
    model = build_model(args.arch, 10, **opts).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    clips = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)

    regs = {"plain": None}
    for name, kw in METHODS.items():
        regs[name] = build_regularizer(RegularizerConfig(**kw), model.encoder, model.head)
        if regs[name] is not None:
            regs[name].to(device)
            regs[name].epoch_start()
    delta = regs["delta"]
    assert isinstance(delta, DELTA)
    t0 = time.perf_counter()
    delta.compute_attention(clips, labels, 10, batch_size=args.batch)
    sync(device)
    attention_s = time.perf_counter() - t0

    times = {name: [] for name in regs}
    for _ in range(2):  # warm-up every path
        for reg in regs.values():
            train_step(model, reg, opt, clips, labels)
    for _ in range(args.rounds):
        for name, reg in regs.items():
            sync(device)
            t0 = time.perf_counter()
            train_step(model, reg, opt, clips, labels)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    plain = statistics.median(times["plain"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"{args.arch} w={args.width:g} {args.frames}x{args.size}x{args.size} batch {args.batch}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'method':<14} {'step ms':>9} {'vs plain':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<14} {1000 * med:9.1f} {med / plain:9.2f}x")
    channels = sum(w.numel() for w in delta.attention)
    print(f"DELTA channel attention (once per run): {attention_s:.1f} s for {channels} channel ablations "
          f"over {len(delta.layers)} layers on {args.batch} clips")


if __name__ == "__main__":
    main()
