"""Cost of self-distillation: step time and peak memory of SD vs plain fine-tuning.

Same model, same batch, same process. Plain and SD steps are interleaved (ABAB...) and the median
is reported, so drift in machine load affects both alike. Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
* CPU (Linux): the process's resident-set high-water mark (``VmHWM``), reset before each
  measurement by writing ``5`` to ``/proc/self/clear_refs``. The script re-executes itself with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands every tensor buffer back to the OS when it
  is freed; otherwise cached allocations hide the step's peak from the RSS. The SD figure includes the teacher's
  weights (a real cost) and its transient activations; the step runs the teacher *before* the
  student, as ``sdtl.engine.finetune`` does, so they never coexist with the student's saved ones.

Targets (issue #2): step-time ratio <= 1.35 (a teacher forward is about a third of a fwd+bwd step),
peak-memory ratio <= 1.05 (the teacher holds no activations).

    python benchmarks/sd_overhead.py                       # CPU demo-size and a larger config
    python benchmarks/sd_overhead.py --arch c3d --width 0.5 --size 64 --batch 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_common import peak_bytes, reexec_for_cpu_peaks, reset_peak, sync
from bench_common import train_step as step

from sdtl import SelfDistillation
from sdtl.models import build_model


def measure(arch: str, width: float, size: int, frames: int, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    opts = {"width": width} if width != 1.0 else {}
    model = build_model(arch, 10, **opts).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    clips = torch.randn(batch, 3, frames, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    sd = SelfDistillation(model.encoder, weight=100.0)

    times = {"plain": [], "sd": []}
    for _ in range(2):  # warm-up both paths (allocator, kernels)
        step(model, None, opt, clips, labels)
        sd.snapshot()
        step(model, sd, opt, clips, labels)
    for _ in range(steps):
        for name, reg in (("plain", None), ("sd", sd)):
            if reg is not None:
                reg.snapshot()  # not timed: once per epoch in real training
            sync(device)
            t0 = time.perf_counter()
            step(model, reg, opt, clips, labels)
            sync(device)
            times[name].append(time.perf_counter() - t0)

    peaks = {}
    for name in ("plain", "sd"):
        # Memory: a fresh SD object for the SD measurement, so the teacher copy is counted.
        reg = None
        base = reset_peak(device)
        if name == "sd":
            reg = SelfDistillation(model.encoder, weight=100.0)
            reg.snapshot()
        step(model, reg, opt, clips, labels)
        peaks[name] = peak_bytes(device, base)
        del reg
    t_plain, t_sd = statistics.median(times["plain"]), statistics.median(times["sd"])
    return {"config": f"{arch} w={width:g} {frames}x{size}x{size} b={batch}", "device": str(device),
            "step_plain_ms": 1000 * t_plain, "step_sd_ms": 1000 * t_sd, "time_ratio": t_sd / t_plain,
            "peak_plain_mib": peaks["plain"] / 2**20, "peak_sd_mib": peaks["sd"] / 2**20,
            "mem_ratio": peaks["sd"] / max(1, peaks["plain"]),
            "params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6}


def main() -> None:
    reexec_for_cpu_peaks()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--width", type=float, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.arch:
        configs = [(args.arch, args.width or 1.0, args.size or 112, args.batch or 8)]
    elif device.type == "cuda":
        configs = [("r2plus1d_vcop", 1.0, 112, 32), ("c3d", 1.0, 112, 24)]
    else:
        configs = [("r2plus1d_vcop", 0.125, 32, 8), ("r2plus1d_vcop", 0.5, 64, 4), ("c3d", 0.25, 64, 4)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"{'config':<34} {'plain ms':>9} {'SD ms':>9} {'ratio':>6} {'plain MiB':>10} {'SD MiB':>9} "
          f"{'ratio':>6} {'enc Mparams':>11}")
    for arch, width, size, batch in configs:
        r = measure(arch, width, size, args.frames, batch, args.steps, device)
        print(f"{r['config']:<34} {r['step_plain_ms']:9.1f} {r['step_sd_ms']:9.1f} {r['time_ratio']:6.3f} "
              f"{r['peak_plain_mib']:10.1f} {r['peak_sd_mib']:9.1f} {r['mem_ratio']:6.3f} {r['params_m']:11.3f}")
    print("targets: time ratio <= 1.35, memory ratio <= 1.05")


if __name__ == "__main__":
    main()
