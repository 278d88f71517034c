"""Cost of self-distillation: step time and peak memory of SD vs plain fine-tuning.

Same model, same batch, same process. The SD step is what :mod:`sdtl.engine.finetune` runs
(``bench_common.train_step``): the real :class:`sdtl.SelfDistillation`, its teacher forward
(``reg.prepare``, under ``torch.inference_mode``, inside the same autocast) *before* the student's
forward, cross-entropy + ``reg.loss``, backward, optimizer step, ``reg.step_end``. The snapshot is
once per epoch in training and is not timed. Plain and SD steps are interleaved (ABAB...) and the
median is reported, so drift in machine load affects both alike. Peak memory is measured first, one
step each, before any teacher exists for the plain step; the SD step's teacher is made inside the
measurement, so its weight copy (a real cost) is counted with the teacher's transient activations,
which never coexist with the student's saved ones (teacher first).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* CPU, CNN table (Linux): the process's resident-set high-water mark (``VmHWM``) above the resident set,
  reset before each measurement by writing ``5`` to ``/proc/self/clear_refs``. The script re-executes
  itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands every tensor buffer of 64 KiB or more
  back to the OS when it is freed; otherwise cached allocations hide the step's peak from the RSS.
* CPU, families table: see below (the allocator's accounting, not the RSS). No re-execution: with
  that glibc setting every freed activation is unmapped and faulted in again at the next step, which
  slows CPU steps (more so the bigger the activations) and is no part of a real run.

Two tables:

* the CNN rows (default, or ``--arch`` with a CNN): SGD with momentum; on CPU the peak is the step's
  high-water mark *above* the resident set (weights, gradients, momentum), on CUDA the absolute
  ``max_memory_allocated``. Targets (issue #2): step-time ratio <= 1.35 (a teacher forward is about a
  third of a fwd+bwd step), peak-memory ratio <= 1.05 (the teacher holds no activations).
* the modern families (``--families``, or ``--arch`` with s3d / mvit_* / swin3d_* / videomae_*): the
  engine's AdamW (``sdtl.engine.optim.build_optimizer``: no decay on norms, biases, position tables;
  fused on CUDA). "peak" is the whole training state at the step's peak on both devices: on CUDA the
  absolute ``max_memory_allocated``; on CPU the resident tensors (weights, gradients, AdamW moments,
  batch; counted exactly) plus the peak of the bytes PyTorch's CPU allocator held during the step above
  what it held at its start (the profiler's memory events: the allocator's own accounting, like CUDA's;
  the RSS cannot see tiny models' buffers, which glibc serves from memory the process already has).
  "step-peak" is the ratio of the parts above the resident set alone (teacher copy + activations).
  Goal: SD step <= 1.35x plain, peak <= 1.10x plain.

    python benchmarks/sd_overhead.py                       # CPU demo-size and a larger config
    python benchmarks/sd_overhead.py --arch c3d --width 0.5 --size 64 --batch 4
    python benchmarks/sd_overhead.py --families --steps 30  # tiny s3d, mvit_v2_s, swin3d_t, videomae_vit_s (CPU)
    python benchmarks/sd_overhead.py --arch videomae_vit_b --batch 8 --amp bf16 --grad-checkpointing  # CUDA, 16x224²
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from bench_common import peak_bytes, reexec_for_cpu_peaks, reset_peak, sync
from bench_common import train_step as step

from sdtl import SelfDistillation
from sdtl.errors import ConfigError
from sdtl.models import build_model
from sdtl.models.registry import spec_of

FAMILIES = ("s3d", "mvit_v2_s", "swin3d_t", "videomae_vit_s")  # one per modern family, --families
TIME_GOAL, MEM_GOAL = 1.35, 1.10  # the modern families' goal (issue: teacher cost)
AMP = {"none": None, "bf16": torch.bfloat16}


@dataclass
class Case:
    arch: str
    frames: int
    size: int
    batch: int
    width: float = 1.0  # CNNs
    variant: str = ""  # modern encoders
    drop_path: float = 0.0
    amp: str = "none"
    grad_checkpointing: bool = False
    modern: bool = False  # AdamW through the engine's builder, the families table
    options: dict = field(default_factory=dict)

    def label(self) -> str:
        extra = "".join(f" {s}" for s in (self.amp if self.amp != "none" else "",
                                            "ckpt" if self.grad_checkpointing else "") if s)
        return f"{self.arch} w={self.width:g} {self.frames}x{self.size}x{self.size} b={self.batch}{extra}"


def is_modern(arch: str) -> bool:
    """The encoders with a ``tiny`` variant (S3D, MViT, Swin3D, VideoMAE); the CNNs have none."""
    return "tiny" in spec_of(arch).variants


def make_optimizer(case: Case, model, device: torch.device):
    if not case.modern:  # the CNN rows, as they always were
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    from sdtl.engine.optim import build_optimizer

    cfg = SimpleNamespace(name="adamw", lr=1e-4, weight_decay=0.05, layer_decay=1.0, head_lr_mult=1.0,
                          momentum=0.9, nesterov=False)
    return build_optimizer(cfg, model.encoder, model.head, fused=device.type == "cuda")


def resident_bytes(model, opt, *batch: torch.Tensor) -> int:
    """Weights, gradients, optimizer state and the batch: what a step starts from."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None), *batch,
               *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def quiet_stderr():
    """Mute file descriptor 2 (the profiler's own start/stop lines and its once-per-process warning)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_alloc_peak(warm, measured) -> int:
    """Peak of the bytes held by PyTorch's CPU allocator during ``measured()`` above what it held when
    ``measured`` began: CPU's counterpart of CUDA's ``max_memory_allocated - memory_allocated`` (the
    allocator's own accounting, via the profiler's memory events). ``warm()`` runs first, inside the
    profile, so that the buffers it allocates (the gradients ``measured`` frees and makes again) are
    known to the profiler; blocks from before the profile are never counted as freed."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warm()
        with record_function("sd_overhead.measured"):
            measured()
    with tempfile.TemporaryDirectory(prefix="sd_overhead.") as tmp, quiet_stderr():
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    region = next(e for e in events if e.get("name") == "sd_overhead.measured")
    t0, t1 = float(region["ts"]), float(region["ts"]) + float(region["dur"])
    memory = sorted((float(e["ts"]), e["args"]["Total Allocated"]) for e in events
                    if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
    before = [total for ts, total in memory if ts < t0]
    inside = [total for ts, total in memory if t0 <= ts <= t1]
    base = before[-1] if before else 0
    return max([base, *inside]) - base


def one_peak(model, reg_factory, opt, clips, labels, dtype, device: torch.device, cpu_rss: bool) -> tuple[int, int]:
    """(peak, peak above the memory at the start) of one step; ``reg_factory`` makes the regularizer
    inside the measurement (None: plain). The first figure is absolute on CUDA; on CPU it is the resident
    tensors plus the second, except with ``cpu_rss`` (the CNN table), where both are the RSS high-water
    mark above the resident set."""
    if device.type == "cpu" and not cpu_rss:
        resident = resident_bytes(model, opt, clips, labels)

        def measured():
            reg = reg_factory() if reg_factory is not None else None
            step(model, reg, opt, clips, labels, dtype=dtype)

        above = cpu_alloc_peak(lambda: step(model, None, opt, clips, labels, dtype=dtype), measured)
        return resident + above, above
    at_reset = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    base = reset_peak(device)
    reg = reg_factory() if reg_factory is not None else None
    step(model, reg, opt, clips, labels, dtype=dtype)
    peak = peak_bytes(device, base)
    del reg
    if device.type == "cuda":
        return peak, peak - at_reset
    return peak, peak


def measure(case: Case, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    opts = dict(case.options)
    if case.width != 1.0:
        opts["width"] = case.width
    if case.variant:
        opts["variant"] = case.variant
    if case.drop_path:
        opts["drop_path"] = case.drop_path
    try:
        spec_of(case.arch).input_of(opts).check(case.frames, case.size, case.arch)
    except ConfigError as exc:
        raise SystemExit(f"sd_overhead: {exc}") from None
    model = build_model(case.arch, 10, **opts).to(device).train()
    if case.grad_checkpointing:
        if not hasattr(model.encoder, "set_grad_checkpointing"):
            raise SystemExit(f"--grad-checkpointing: {case.arch} has no transformer blocks to checkpoint")
        model.encoder.set_grad_checkpointing(True)  # as sdtl.engine.build.use_grad_checkpointing
    opt = make_optimizer(case, model, device)
    clips = torch.randn(case.batch, 3, case.frames, case.size, case.size, device=device)
    labels = torch.randint(0, 10, (case.batch,), device=device)
    dtype = AMP[case.amp]

    def new_sd():
        reg = SelfDistillation(model.encoder, weight=100.0)
        reg.snapshot()  # the teacher's weight copy, made inside the memory measurement
        return reg

    for _ in range(2):  # warm-up (allocator, kernels, optimizer state) before any teacher exists
        step(model, None, opt, clips, labels, dtype=dtype)
    cpu_rss = not case.modern  # the CNN rows keep their RSS figure
    peaks = {"plain": one_peak(model, None, opt, clips, labels, dtype, device, cpu_rss),
             "sd": one_peak(model, new_sd, opt, clips, labels, dtype, device, cpu_rss)}

    sd = SelfDistillation(model.encoder, weight=100.0)
    times = {"plain": [], "sd": []}
    for _ in range(2):  # warm-up both paths
        step(model, None, opt, clips, labels, dtype=dtype)
        sd.snapshot()
        step(model, sd, opt, clips, labels, dtype=dtype)
    for _ in range(steps):
        for name, reg in (("plain", None), ("sd", sd)):
            if reg is not None:
                reg.snapshot()  # not timed: once per epoch in real training
            sync(device)
            t0 = time.perf_counter()
            step(model, reg, opt, clips, labels, dtype=dtype)
            sync(device)
            times[name].append(time.perf_counter() - t0)

    t_plain, t_sd = statistics.median(times["plain"]), statistics.median(times["sd"])
    (p_plain, s_plain), (p_sd, s_sd) = peaks["plain"], peaks["sd"]
    return {"config": case.label(), "arch": case.arch, "variant": case.variant or "-",
            "input": f"{case.frames}x{case.size}x{case.size} b{case.batch}",
            "mode": "+".join(s for s in ("fp32" if case.amp == "none" else case.amp,
                                         "ckpt" if case.grad_checkpointing else "") if s),
            "device": str(device),
            "step_plain_ms": 1000 * t_plain, "step_sd_ms": 1000 * t_sd, "time_ratio": t_sd / t_plain,
            "peak_plain_mib": p_plain / 2**20, "peak_sd_mib": p_sd / 2**20, "mem_ratio": p_sd / max(1, p_plain),
            "step_peak_ratio": s_sd / max(1, s_plain),
            "params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6}


def print_cnn_table(cases: list[Case], steps: int, device: torch.device) -> None:
    print(f"{'config':<34} {'plain ms':>9} {'SD ms':>9} {'ratio':>6} {'plain MiB':>10} {'SD MiB':>9} "
          f"{'ratio':>6} {'enc Mparams':>11}")
    for case in cases:
        r = measure(case, steps, device)
        print(f"{r['config']:<34} {r['step_plain_ms']:9.1f} {r['step_sd_ms']:9.1f} {r['time_ratio']:6.3f} "
              f"{r['peak_plain_mib']:10.1f} {r['peak_sd_mib']:9.1f} {r['mem_ratio']:6.3f} {r['params_m']:11.3f}")
    print("targets: time ratio <= 1.35, memory ratio <= 1.05")


def print_family_table(cases: list[Case], steps: int, device: torch.device) -> None:
    # Rows start with "SDROW" (device_check.sh parses them); fields are whitespace-separated.
    print(f"{'':5} {'arch':<15} {'variant':<7} {'input':<15} {'mode':<9} {'plain ms':>9} {'SD ms':>9} "
          f"{'ratio':>6} {'<=1.35':>6} {'plain MiB':>10} {'SD MiB':>9} {'ratio':>6} {'<=1.10':>6} {'step-peak':>9} "
          f"{'enc Mparams':>11}")
    for case in cases:
        r = measure(case, steps, device)
        ok_t = "yes" if r["time_ratio"] <= TIME_GOAL else "NO"
        ok_m = "yes" if r["mem_ratio"] <= MEM_GOAL else "NO"
        print(f"SDROW {r['arch']:<15} {r['variant']:<7} {r['input']:<15} {r['mode']:<9} {r['step_plain_ms']:9.1f} "
              f"{r['step_sd_ms']:9.1f} {r['time_ratio']:6.3f} {ok_t:>6} {r['peak_plain_mib']:10.1f} "
              f"{r['peak_sd_mib']:9.1f} {r['mem_ratio']:6.3f} {ok_m:>6} {r['step_peak_ratio']:9.3f} "
              f"{r['params_m']:11.3f}", flush=True)
    where = ("max_memory_allocated" if device.type == "cuda"
             else "resident tensors (weights, grads, AdamW state, batch) + the CPU allocator's peak above them")
    print(f"goal: SD step <= {TIME_GOAL}x plain, peak <= {MEM_GOAL}x plain; peak = {where}; "
          "step-peak = the ratio of the parts above the resident set (teacher copy + activations)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--families", action="store_true",
                    help=f"tiny {', '.join(FAMILIES)} (their tiny input, AdamW, --batch default 4)")
    ap.add_argument("--width", type=float, default=None, help="CNNs")
    ap.add_argument("--variant", default="", help="modern encoders: '' (published size) or 'tiny'")
    ap.add_argument("--drop-path", type=float, default=0.0, help="modern encoders except s3d")
    ap.add_argument("--size", type=int, default=None, help="default: 112 for CNNs, the encoder's input for the others")
    ap.add_argument("--frames", type=int, default=None, help="default: 16 for CNNs, the encoder's input for the others")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--amp", choices=sorted(AMP), default="none", help="autocast dtype (bf16: as optim.amp=bf16)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="transformer encoders (mvit, swin3d, videomae)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    families = args.families or (args.arch and is_modern(args.arch))
    if not families:
        reexec_for_cpu_peaks()  # the CNN table's RSS figure; the families table counts the allocator's bytes
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    if families:
        cases = []
        for arch in (FAMILIES if args.families else (args.arch,)):
            variant = "tiny" if args.families and not args.variant else args.variant
            spec = spec_of(arch).input_of({"variant": variant})
            blocks = not (args.families and arch == "s3d")  # --families: S3D (a CNN) has no blocks for these
            cases.append(Case(arch, args.frames or spec.frames, args.size or spec.size,
                              args.batch or (4 if args.families else 8), variant=variant,
                              drop_path=args.drop_path if blocks else 0.0, amp=args.amp,
                              grad_checkpointing=args.grad_checkpointing and blocks, modern=True))
        print_family_table(cases, args.steps, device)
        return
    common = {"amp": args.amp, "grad_checkpointing": args.grad_checkpointing}
    if args.arch:
        cases = [Case(args.arch, args.frames or 16, args.size or 112, args.batch or 8, width=args.width or 1.0,
                      **common)]
    elif device.type == "cuda":
        cases = [Case("r2plus1d_vcop", args.frames or 16, 112, 32, **common),
                 Case("c3d", args.frames or 16, 112, 24, **common)]
    else:
        cases = [Case("r2plus1d_vcop", args.frames or 16, 32, 8, width=0.125, **common),
                 Case("r2plus1d_vcop", args.frames or 16, 64, 4, width=0.5, **common),
                 Case("c3d", args.frames or 16, 64, 4, width=0.25, **common)]
    print_cnn_table(cases, args.steps, device)


if __name__ == "__main__":
    main()
