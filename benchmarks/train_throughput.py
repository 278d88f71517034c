"""Training throughput on one device, and what it means for the paper's run.

Two measurements, then a projection:

(a) **Compute only** -- clips already on the device (random tensors), one training step as
    ``sdtl.engine.finetune`` runs it: autocast, the SD teacher's forward *before* the student's
    (``target = sd.teacher_features(clips)``, then ``logits, feats = model.forward_features(clips)``),
    loss = CE + ``sd.penalty(target, feats)``, backward (loss-scaled for fp16), SGD with momentum 0.9
    (fused on CUDA where this torch has it). For ``c3d`` at batch 24 and ``r2plus1d_vcop`` at batch
    32 (the paper's per-GPU batches; 16x112x112, width 1 on CUDA, tiny on CPU), for every option of
    precision {fp32, bf16, fp16 + GradScaler} x memory format {contiguous, channels_last_3d} (bf16/fp16
    on CUDA only): clips/s (batch / median step time over ``--steps`` steps after warm-up, plain and
    SD interleaved so drift hits both alike) and peak memory (CUDA: ``max_memory_allocated`` after
    ``reset_peak_memory_stats``; CPU: the step's resident-set high-water mark above the resident set
    before it, as ``benchmarks/sd_overhead.py`` measures it), with the SD/plain step-time and memory
    ratios.
(b) **Full engine** -- a UCF101-like ``folder`` dataset written here (320x240 MPEG-4 Part 2 in AVI at
    25 fps, ~5 s of panning texture with a moving block, so it compresses like footage and not like
    noise; a few unique files written with PyAV, the rest hard links so that thousands of entries cost
    no disk), then ``run_finetune`` with the ``ucf101_r21d_sd`` recipe on it (SD, lambda 100, batch 32,
    the engine's ``auto`` precision and memory format). From ``metrics.jsonl`` of the last epoch
    (workers warm, every file probed): clips/s, the share of the epoch spent waiting for data
    (``data_wait``), clips/s per decoding worker, and the engine's rate against (a)'s rate for the same
    arch, batch, precision and format.

Projection: 100 epochs x 9,537 training clips (UCF101 split 1, one clip per video per epoch) at (a)'s
best rate (compute bound) and at (b)'s rate (what the engine and its data pipeline deliver), plus the
10-clip test of 3,783 videos at the forward-only rate (compute bound; decoding not counted).
Validation during training is not counted.

    python benchmarks/train_throughput.py                       # CUDA if visible: paper sizes
    python benchmarks/train_throughput.py --device cpu --quick  # seconds: tiny everything
    python benchmarks/train_throughput.py --skip-engine --steps 30
    python benchmarks/train_throughput.py --workers 8 --set data.prefetch_factor=2 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import peak_bytes, reexec_for_cpu_peaks, reset_peak, sync, train_step

PAPER_EPOCHS = 100
PAPER_TRAIN_VIDEOS = 9537  # UCF101 split 1 training list
PAPER_TEST_VIDEOS = 3783  # UCF101 split 1 test list
PAPER_TEST_CLIPS = 10
PAPER_BATCH = {"c3d": 24, "r2plus1d_vcop": 32}  # per GPU
ENGINE_RECIPE = "ucf101_r21d_sd"
ENGINE_ARCH = "r2plus1d_vcop"

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------ measurement helpers
def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_sgd(params, device: torch.device) -> tuple[torch.optim.Optimizer, bool]:
    """SGD(momentum 0.9), fused on CUDA where this torch has a fused SGD (2.4+); (optimizer, fused)."""
    params = list(params)
    if device.type == "cuda":
        try:
            return torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True), True
        except (TypeError, RuntimeError, ValueError):
            pass
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9), False


def timed(device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# -------------------------------------------------------------------------------- (a) compute only
def measure_option(arch: str, width: float, frames: int, size: int, batch: int, precision: str,
                   channels_last: bool, steps: int, warmup: int, device: torch.device,
                   forward_only: bool = False) -> dict:
    from sdtl.models import build_model
    from sdtl.regularizers import SelfDistillation

    dtype = PRECISIONS[precision]
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    opts = {"width": width} if width != 1.0 else {}
    model = build_model(arch, 101, **opts).to(device).train()
    if channels_last:
        model = model.to(memory_format=fmt)
    opt, fused = make_sgd(model.parameters(), device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    clips = torch.randn(batch, 3, frames, size, size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 101, (batch,), device=device)
    out = {"arch": arch, "batch": batch, "precision": precision,
           "format": "channels_last" if channels_last else "contiguous", "fused_sgd": fused}

    def plain():
        train_step(model, None, opt, clips, labels, scaler, dtype)

    # Plain peak before any teacher exists; SD peak with a fresh teacher created after the reset,
    # so its weights count (a real cost) -- the same accounting as benchmarks/sd_overhead.py.
    for _ in range(warmup):
        plain()
    base = reset_peak(device)
    plain()
    out["plain_peak_mib"] = peak_bytes(device, base) / 2**20

    base = reset_peak(device)
    sd = SelfDistillation(model.encoder, weight=1.0)
    sd.snapshot()  # built after the memory-format change, as in the engine: same format as the student
    train_step(model, sd, opt, clips, labels, scaler, dtype)
    out["sd_peak_mib"] = peak_bytes(device, base) / 2**20

    def with_sd():
        train_step(model, sd, opt, clips, labels, scaler, dtype)

    for _ in range(warmup):
        with_sd()
    t_plain, t_sd = [], []
    for _ in range(steps):
        t_plain.append(timed(device, plain))
        t_sd.append(timed(device, with_sd))
    mp, ms = statistics.median(t_plain), statistics.median(t_sd)
    out.update(plain_clips_s=batch / mp, sd_clips_s=batch / ms, time_ratio=ms / mp,
               mem_ratio=out["sd_peak_mib"] / max(out["plain_peak_mib"], 1e-9))

    if forward_only:  # the test's cost: student forward only, no graph
        model.eval()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for _ in range(warmup):
                model(clips)
            t_fwd = [timed(device, lambda: model(clips)) for _ in range(steps)]
        out["forward_clips_s"] = batch / statistics.median(t_fwd)
    return out  # model, optimizer and clips go with this frame; the caller frees the cache


def compute_only(args, device: torch.device, sizes: dict) -> list[dict]:
    precisions = ["fp32"]
    if device.type == "cuda":
        precisions += (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
        torch.backends.cudnn.benchmark = True  # as the engine (run.cudnn_benchmark, default true)
    engine_option = engine_precision_and_format(device)
    rows = []
    print(f"(a) compute only: {sizes['frames']}x{sizes['size']}x{sizes['size']} clips, width {sizes['width']:g}, "
          f"{args.steps} timed steps after {sizes['warmup']} warm-up, median", flush=True)
    header = (f"{'arch':<14} {'batch':>5} {'precision':<9} {'format':<13} {'plain clips/s':>13} {'SD clips/s':>10} "
              f"{'SD/plain time':>13} {'plain MiB':>10} {'SD MiB':>9} {'SD/plain mem':>12}")
    print(header)
    print("-" * len(header))
    for arch in args.archs:
        batch = sizes["batch"] or PAPER_BATCH[arch]
        for precision in precisions:
            for channels_last in (False, True):
                label = (f"{arch:<14} {batch:>5} {precision:<9} "
                         f"{'channels_last' if channels_last else 'contiguous':<13}")
                try:
                    r = measure_option(arch, sizes["width"], sizes["frames"], sizes["size"], batch, precision,
                                       channels_last, args.steps, sizes["warmup"], device,
                                       forward_only=(precision, channels_last) == engine_option)
                except Exception as exc:  # e.g. out of memory, a kernel this build lacks
                    free_memory(device)
                    print(f"{label} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}")
                    rows.append({"arch": arch, "batch": batch, "precision": precision,
                                 "format": "channels_last" if channels_last else "contiguous",
                                 "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                free_memory(device)
                rows.append(r)
                print(f"{label} {r['plain_clips_s']:13.1f} {r['sd_clips_s']:10.1f} {r['time_ratio']:13.3f} "
                      f"{r['plain_peak_mib']:10.1f} {r['sd_peak_mib']:9.1f} {r['mem_ratio']:12.3f}", flush=True)
    fused = any(r.get("fused_sgd") for r in rows)
    mem = "CUDA max_memory_allocated" if device.type == "cuda" else "CPU: step's RSS high-water mark above RSS"
    print(f"SGD momentum 0.9{' (fused)' if fused else ''}; memory: {mem}")
    return rows


def engine_precision_and_format(device: torch.device) -> tuple[str, bool]:
    """What the engine's ``auto`` options resolve to here (optim.amp, run.channels_last)."""
    if device.type != "cuda":
        return "fp32", False
    return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), True


# ------------------------------------------------------------------------------ (b) engine: data
def ucf_like_frames(rng, n: int, h: int, w: int) -> np.ndarray:
    """A panning textured scene with a moving bright block (same recipe as benchmarks/data_pipeline.py)."""
    big = rng.integers(0, 256, (h // 8 + n // 4 + 2, w // 8 + n // 4 + 2, 3), dtype=np.uint8)
    big = np.kron(big, np.ones((8, 8, 1), np.uint8))
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        y = t * 2 % 16 + (t // 8) * 8
        frames[t] = big[y: y + h, t: t + w]
        x = (t * 3) % (w - w // 5)
        frames[t, h // 3: h // 3 + h // 4, x: x + w // 5] = 255
    return frames


def write_avi(job: tuple) -> str:
    """One MPEG-4 Part 2 AVI with PyAV (UCF101 ships XviD/DivX AVIs: same codec family)."""
    import av

    path, seed, frames, h, w = job
    pixels = ucf_like_frames(np.random.default_rng(seed), frames, h, w)
    with av.open(path, mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = 12
        stream.codec_context.bit_rate = 600_000  # about UCF101's average (6.5 GB / 13,320 videos of ~7 s)
        for f in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_folder_dataset(root: Path, classes: int, train_per_class: int, test_per_class: int, unique: int,
                        frames: int, h: int = 240, w: int = 320) -> dict:
    """``root/{train,test}/<Class>/v_<Class>_gNN_cMM.avi`` (the ``folder`` layout with train/ and test/).

    ``unique`` files are encoded (in parallel); every other entry is a hard link to one of them (a
    copy where links are not possible), so each file decodes like a real one at no disk cost.
    Groups of 4 clips (``_gNN_``) keep UCF101's grouping, which the validation split respects.
    """
    if (root / "train").is_dir() and (root / "test").is_dir() and any((root / "train").iterdir()):
        files = list(root.glob("*/*/*"))
        return {"root": str(root), "videos": len(files), "written": 0, "seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    src_dir = root / ".unique"
    src_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(src_dir / f"u{i:03d}.avi"), i, frames, h, w) for i in range(unique)]
    procs = max(1, min(len(jobs), os.cpu_count() or 1, 16))
    if procs > 1:
        # fork before this process touches CUDA: compute_only() runs after the data is written
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            sources = pool.map(write_avi, jobs)
    else:
        sources = [write_avi(j) for j in jobs]
    n = 0
    for subset, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            name = f"Class{c:03d}"
            folder = root / subset / name
            folder.mkdir(parents=True, exist_ok=True)
            for v in range(per_class):
                dst = folder / f"v_{name}_g{v // 4 + 1:02d}_c{v % 4 + 1:02d}.avi"
                src = sources[n % len(sources)]
                n += 1
                try:
                    os.link(src, dst)
                except OSError:
                    dst.write_bytes(Path(src).read_bytes())
    mb = sum(Path(s).stat().st_size for s in sources) / len(sources) / 1e6
    return {"root": str(root), "videos": n, "written": len(sources), "seconds": time.perf_counter() - t0,
            "reused": False, "mb_per_file": mb}


# ---------------------------------------------------------------------------- (b) engine: the run
def engine_run(args, device: torch.device, sizes: dict, data_root: Path, out_dir: Path) -> dict:
    from sdtl.engine.config import load_config
    from sdtl.engine.finetune import run_finetune
    from sdtl.errors import UserError

    overrides = [
        "data.dataset=folder", f"data.root={data_root}", "data.val_fraction=0.1",
        f"data.workers={args.workers}", f"optim.epochs={sizes['epochs']}",
        "eval.num_clips=1", "eval.val_clips=1", "eval.probe_videos=0",
        f"run.device={device.type}", "run.progress=false", "run.tensorboard=false",
        # the keys the fast path reads, at their auto values, so a missing one says so here
        "optim.amp=auto", "run.channels_last=auto", "optim.fused=auto",
    ]
    if sizes["width"] != 1.0:
        overrides.append(f"model.width={sizes['width']}")
    if sizes["size"] != 112:
        overrides.append(f"data.size={sizes['size']}")
    if sizes["batch"]:
        overrides.append(f"data.batch_size={sizes['batch']}")
    if args.threads:
        overrides.append(f"run.threads={args.threads}")
    try:  # this benchmark's own keys first: an engine without them is reported, not a crash
        load_config(ENGINE_RECIPE, overrides)
    except UserError as exc:
        if "unknown key" in str(exc):
            return {"error": f"engine keys not available ({exc})"}
        raise
    cfg = load_config(ENGINE_RECIPE, overrides + args.overrides)  # a typo in --set is the user's error
    t0 = time.perf_counter()
    run_finetune(cfg, out_dir)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "clips_per_s" in r]
    runtime = {}
    try:
        import yaml

        runtime = (yaml.safe_load((out_dir / "config.yaml").read_text()) or {}).get("runtime") or {}
    except Exception:
        pass
    last = epochs[-1]
    return {"arch": cfg.model.arch, "batch": cfg.data.batch_size, "workers": cfg.data.workers,
            "prefetch_factor": cfg.data.prefetch_factor, "epochs": len(epochs),
            "clips_per_s": last["clips_per_s"], "data_wait": last["data_wait"],
            "epoch_time_s": last.get("epoch_time_s"), "steps": last.get("steps"),
            "first_epoch_clips_per_s": epochs[0]["clips_per_s"], "first_epoch_data_wait": epochs[0]["data_wait"],
            "runtime": runtime, "wall_s": wall}


def matching_row(rows: list[dict], arch: str, batch: int, runtime: dict, device: torch.device) -> dict | None:
    precision = runtime.get("amp") or engine_precision_and_format(device)[0]
    precision = {"off": "fp32"}.get(precision, precision)
    channels_last = runtime.get("channels_last", engine_precision_and_format(device)[1])
    fmt = "channels_last" if channels_last else "contiguous"
    for r in rows:
        if (r["arch"], r["batch"], r["precision"], r["format"]) == (arch, batch, precision, fmt) and "error" not in r:
            return r
    return None


# ------------------------------------------------------------------------------------ projection
def hours(seconds: float) -> str:
    return f"{seconds / 3600:6.2f} h"


def projection(rows: list[dict], engine: dict | None, device: torch.device) -> list[tuple[str, str]]:
    clips = PAPER_EPOCHS * PAPER_TRAIN_VIDEOS
    test_clips = PAPER_TEST_VIDEOS * PAPER_TEST_CLIPS
    lines = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        ok = [r for r in rows if r["arch"] == arch and "error" not in r]
        if not ok:
            continue
        best = max(ok, key=lambda r: r["sd_clips_s"])
        lines.append((f"{arch} b{best['batch']} SD, compute bound ({best['precision']}, {best['format']})",
                      f"{hours(clips / best['sd_clips_s'])}  ({best['sd_clips_s']:.0f} clips/s)"))
        fwd = [r for r in ok if "forward_clips_s" in r]
        if fwd:
            f = fwd[0]
            lines.append((f"  + 10-clip test, forward only ({f['precision']}, {f['format']})",
                          f"{hours(test_clips / f['forward_clips_s'])}  ({f['forward_clips_s']:.0f} clips/s)"))
    if engine and "clips_per_s" in engine:
        lines.append((f"{engine['arch']} b{engine['batch']} SD, engine + {engine['workers']} decoding workers",
                      f"{hours(clips / engine['clips_per_s'])}  ({engine['clips_per_s']:.0f} clips/s)"))
    return lines


# ------------------------------------------------------------------------------------------ main
def sizes_for(args, device: torch.device) -> dict:
    if device.type == "cuda":
        s = dict(width=1.0, frames=16, size=112, batch=0, warmup=3, steps=20,
                 classes=10, train_per_class=360, test_per_class=2, unique=32, video_frames=125, epochs=2)
        # ~100 steps of 32 an epoch: each epoch's first batch (a worker decodes a whole batch) is then a
        # small share of it, as in UCF101's ~300 steps
        if args.quick:
            s.update(warmup=2, steps=5, train_per_class=40, unique=8, video_frames=50)
    else:
        s = dict(width=0.125, frames=16, size=32, batch=8, warmup=2, steps=5,
                 classes=4, train_per_class=12, test_per_class=1, unique=6, video_frames=125, epochs=2)
        if args.quick:
            s.update(batch=4, warmup=1, steps=3, classes=3, train_per_class=8, unique=3, video_frames=50)
    for key in ("width", "size", "batch"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.epochs is not None:
        s["epochs"] = args.epochs
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny everything (a CPU smoke test in seconds)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per option (default 20 CUDA, 5 CPU)")
    ap.add_argument("--archs", default="c3d,r2plus1d_vcop", help="compute-only architectures (comma list)")
    ap.add_argument("--width", type=float, default=None, help="encoder width (default 1 CUDA, 0.125 CPU)")
    ap.add_argument("--size", type=int, default=None, help="crop side (default 112 CUDA, 32 CPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch for every arch (default: the paper's, CPU 8)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--workers", type=int, default=None, help="engine decoding workers (default 16 CUDA, 2 CPU)")
    ap.add_argument("--epochs", type=int, default=None, help="engine epochs (default 2; the last one is reported)")
    ap.add_argument("--skip-engine", action="store_true", help="compute-only part alone")
    ap.add_argument("--data", metavar="DIR", default=None,
                    help="write the synthetic folder dataset here (reused if DIR/train and DIR/test exist); "
                         "default: a temporary folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra engine config override (repeatable), e.g. --set data.prefetch_factor=2")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write every figure to FILE as JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        reexec_for_cpu_peaks()  # glibc must hand freed tensor buffers back to the OS, or the RSS hides a step's peak
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sizes_for(args, device)
    args.steps = args.steps or sizes["steps"]
    args.workers = args.workers if args.workers is not None else (16 if device.type == "cuda" else 2)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} threads")

    report: dict = {"device": str(device), "device_name": name, "torch": torch.__version__, "sizes": sizes}
    with tempfile.TemporaryDirectory(prefix="sdtl-throughput-") as tmp:
        data_info = None
        if not args.skip_engine:  # written first: the writer pool forks before CUDA is initialised
            data_root = Path(args.data) if args.data else Path(tmp) / "data"
            data_info = make_folder_dataset(data_root, sizes["classes"], sizes["train_per_class"],
                                            sizes["test_per_class"], sizes["unique"], sizes["video_frames"])
        rows = compute_only(args, device, sizes)
        report["compute_only"] = rows

        engine = None
        if not args.skip_engine:
            print()
            what = ("reused" if data_info["reused"] else
                    f"{data_info['written']} unique 320x240 MPEG-4 AVIs of {sizes['video_frames']} frames "
                    f"({data_info['mb_per_file']:.2f} MB each) written in {data_info['seconds']:.1f} s, "
                    f"the rest hard links")
            print(f"(b) engine: recipe {ENGINE_RECIPE} on a folder dataset of {data_info['videos']} videos "
                  f"({sizes['classes']} classes; {what}), {sizes['epochs']} epochs, last one reported", flush=True)
            try:
                engine = engine_run(args, device, sizes, data_root, Path(tmp) / "run")
            except Exception as exc:
                engine = {"error": f"{type(exc).__name__}: {exc}"}
            report["engine"] = engine
            if "error" in engine:
                print(f"engine run skipped: {engine['error'][:400]}")
            else:
                rt = engine["runtime"]
                row = matching_row(rows, engine["arch"], engine["batch"], rt, device)
                compute = row["sd_clips_s"] if row else None
                engine["compute_only_clips_s"] = compute
                per_worker = engine["clips_per_s"] / max(1, engine["workers"])
                print(f"{'':<34} {'clips/s':>9} {'data wait':>9} {'vs compute':>10} {'per worker':>10}")
                first = f"{'engine, epoch 1 (cold workers)':<34} {engine['first_epoch_clips_per_s']:9.1f} " \
                        f"{100 * engine['first_epoch_data_wait']:8.0f}%"
                print(first)
                print(f"{'engine, epoch ' + str(engine['epochs']) + ' (reported)':<34} {engine['clips_per_s']:9.1f} "
                      f"{100 * engine['data_wait']:8.0f}% "
                      f"{(engine['clips_per_s'] / compute if compute else float('nan')):10.2f} {per_worker:10.1f}")
                if compute:
                    print(f"{'compute only, same option':<34} {compute:9.1f}")
                print(f"engine: {engine['arch']} b{engine['batch']}, precision {rt.get('amp')}"
                      f"{' + loss scaling' if rt.get('grad_scaler') else ''}, channels_last {rt.get('channels_last')}, "
                      f"fused SGD {rt.get('fused_optimizer')}, cuDNN autotune {rt.get('cudnn_benchmark')}, "
                      f"{engine['workers']} workers x prefetch {engine['prefetch_factor']}, "
                      f"{engine['steps']} steps/epoch, run wall {engine['wall_s']:.1f} s")
                wait = engine["data_wait"]
                verdict = ("data bound: more workers (or cheaper decoding) would speed it up; per-worker clips/s "
                           "is about each worker's decode rate" if wait > 0.2 else
                           "partly data bound: the loop waited for data now and then; per-worker clips/s is a "
                           "lower bound on the decode rate" if wait > 0.05 else
                           "compute bound: the loop hardly waited for data; per-worker clips/s is a lower bound "
                           "on the decode rate")
                print(f"-> {verdict}")

    print()
    print(f"projected wall time of the paper's run on this device ({PAPER_EPOCHS} epochs x {PAPER_TRAIN_VIDEOS} "
          f"clips; validation not counted):")
    lines = projection(rows, engine if engine and "error" not in engine else None, device)
    width = max((len(a) for a, _ in lines), default=0)
    for a, b in lines:
        print(f"  {a:<{width}}  {b}")
    report["projection"] = dict(lines)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
