"""Data-pipeline benchmark: is the decoder or the model setting the pace?

Prints, per decoding backend, clips/s for decode only, decode + transforms and the full DataLoader
with 2 workers, on UCF101-like videos written here (320x240, 25 fps, ~7 s; MPEG-4 Part 2 in AVI as
UCF101 ships, and H.264 in MP4); the time to construct a 13,320-entry UCF101 dataset (placeholder
files, official split 1 lists); and torchvision's ``datasets.UCF101`` construction time where it can
run (it decodes every file to index it, so it gets a small tree of real videos).

``--kinds`` compares the backends file kind by file kind (MPEG-4 AVI, H.264 MP4 with one key frame,
H.264 MKV with a key frame per second, H.264 muxed with pts == dts, MPEG program stream): single
frames, 16-frame clips and 16-frame clips at stride 2, decode only and through a 2-worker DataLoader,
the two backends interleaved and the median of 3 rounds taken (the machine may be shared). This is
the evidence behind ``auto`` (:data:`sdtl.data.video_io.AUTO_BACKEND`).

Run: ``python benchmarks/data_pipeline.py [--videos 16] [--clips 96] [--kinds]``. Results go to stdout.
"""
from __future__ import annotations

import argparse
import fractions
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sdtl.data import splits as S
from sdtl.data.cli import measure_dataset, measure_decode, measure_loader
from sdtl.data.datasets import VideoClipDataset, VideoRecord, build_dataset
from sdtl.data.video_io import available_backends, backend_report, open_video, write_video


def ucf_like_frames(rng, n=175, h=240, w=320) -> np.ndarray:
    """A panning textured scene with a moving block: compresses like real footage, not like noise."""
    big = rng.integers(0, 256, (h // 8 + n // 4 + 2, w // 8 + n // 4 + 2, 3), dtype=np.uint8)
    big = np.kron(big, np.ones((8, 8, 1), np.uint8))
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        frames[t] = big[t * 2 % 16 + (t // 8) * 8: t * 2 % 16 + (t // 8) * 8 + h, t: t + w]
        frames[t, 80:140, (t * 3) % (w - 60):(t * 3) % (w - 60) + 60] = 255
    return frames


def make_videos(folder: Path, count: int, codec: str, ext: str) -> list[VideoRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        cls = f"Class{i % 4}"
        path = write_video(folder / cls / f"v_{cls}_g{i:02d}_c01{ext}", ucf_like_frames(rng), codec=codec)
        records.append(VideoRecord(path, i % 4, f"{cls}/{path.name}"))
    return records


def bench_backends(records, clips: int) -> None:
    for backend in ("torchcodec", "pyav"):
        if backend not in available_backends():
            print(f"  {backend:10s} unavailable: {backend_report()[backend]}")
            continue
        ds = VideoClipDataset(records, [f"Class{i}" for i in range(4)], "train", backend=backend)
        measure_decode(records, backend, 4)  # warm-up (imports, probe)
        dec = measure_decode(records, backend, clips)
        full = measure_dataset(ds, clips // 2)
        loader = measure_loader(ds, clips, workers=2, batch_size=8)
        print(f"  {backend:10s} decode only {dec:6.1f} clips/s | decode+transforms {full:6.1f} clips/s | "
              f"DataLoader 2 workers {loader:6.1f} clips/s ({loader / dec:.2f}x decode-only)")


def _write_program_stream(path: Path, frames) -> None:
    import av

    with av.open(str(path), "w", format="vob") as c:
        s = c.add_stream("mpeg2video", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.gop_size, s.codec_context.max_b_frames, s.codec_context.bit_rate = 12, 2, 2_000_000
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _write_pts_eq_dts(path: Path, frames) -> None:
    """H.264 with B-frames whose packets carry their decode times as presentation times (box.mp4)."""
    import av

    ms = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.max_b_frames = 2
        s.codec_context.time_base = s.time_base = ms
        n = 0

        def mux(packets):
            nonlocal n
            for p in packets:
                p.pts = p.dts = n * 40 + (n % 3 == 1) - (n % 3 == 2)
                p.time_base = ms
                c.mux(p)
                n += 1

        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i * 40, ms
            mux(s.encode(vf))
        mux(s.encode())


KINDS = {  # name -> writer(path_without_suffix, frames) -> path
    "MPEG-4 AVI": lambda p, f: write_video(p.with_suffix(".avi"), f, codec="mpeg4", gop=12),
    "H.264 MP4, 1 key frame": lambda p, f: write_video(p.with_suffix(".mp4"), f, codec="libx264", gop=250),
    "H.264 MKV, key frame/s": lambda p, f: write_video(p.with_suffix(".mkv"), f, codec="libx264", gop=25),
    "H.264 MP4, pts == dts": lambda p, f: (_write_pts_eq_dts(p.with_suffix(".mp4"), f), p.with_suffix(".mp4"))[1],
    "MPEG-PS": lambda p, f: (_write_program_stream(p.with_suffix(".mpg"), f), p.with_suffix(".mpg"))[1],
    # torchcodec indexes the whole file at every open; PyAV's probe is kept for the run
    "MPEG-4 AVI, 63 s": lambda p, f: write_video(p.with_suffix(".avi"), np.concatenate([f] * 9), codec="mpeg4",
                                                gop=12),
}


def bench_kinds(tmp: Path, videos: int, clips: int) -> None:
    """Both backends, file kind by file kind; interleaved rounds, medians (see the module docstring)."""
    if "torchcodec" not in available_backends():
        print(f"  torchcodec unavailable: {backend_report()['torchcodec']}")
        return
    import torch

    print("| files | clip (frames x stride) | PyAV decode | torchcodec decode | ratio | PyAV loader 2w | "
          "torchcodec loader 2w | ratio | files torchcodec decodes itself |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, write in KINDS.items():
        rng = np.random.default_rng(0)
        folder = tmp / "kinds" / kind.replace(" ", "_").replace(",", "").replace("/", "").replace("=", "")
        records = []
        for i in range(videos):
            (folder / f"Class{i % 4}").mkdir(parents=True, exist_ok=True)
            path = write(folder / f"Class{i % 4}" / f"v{i:02d}", ucf_like_frames(rng))
            records.append(VideoRecord(Path(path), i % 4, Path(path).name))
        own = 0
        for r in records:
            with open_video(r.path, "torchcodec") as reader:
                reader.get_frames([0])
                own += reader.decoder == "torchcodec"
        for clip_len, stride in ((1, 1), (16, 1), (16, 2)):
            decode = {"pyav": [], "torchcodec": []}
            loader = {"pyav": [], "torchcodec": []}
            sets = {b: VideoClipDataset(records, [f"Class{i}" for i in range(4)], "train", clip_len=clip_len,
                                        stride=stride, backend=b) for b in decode}
            threads = torch.get_num_threads()
            for rnd in range(3):
                for b in decode:
                    torch.set_num_threads(1)
                    decode[b].append(measure_decode(records, b, clips // 2, clip_len, seed=rnd, stride=stride))
                    torch.set_num_threads(threads)
                    if clip_len > 1:
                        sets[b].set_epoch(rnd)
                        loader[b].append(measure_loader(sets[b], clips, workers=2, batch_size=8))
            d = {b: statistics.median(v) for b, v in decode.items()}
            line = (f"| {kind} | {clip_len} x {stride} | {d['pyav']:.0f} | {d['torchcodec']:.0f} | "
                    f"{d['torchcodec'] / d['pyav']:.2f} |")
            if clip_len > 1:
                ld = {b: statistics.median(v) for b, v in loader.items()}
                line += f" {ld['pyav']:.0f} | {ld['torchcodec']:.0f} | {ld['torchcodec'] / ld['pyav']:.2f} |"
            else:
                line += " | | |"
            print(line + f" {own} of {len(records)} |", flush=True)


def bench_construction(tmp: Path) -> None:
    root = tmp / "ucf_placeholder"
    lists = S.shipped_lists("ucfTrainTestlist")
    for k in (1, 2, 3):
        for kind in ("trainlist", "testlist"):
            for line in lists.joinpath(f"{kind}{k:02d}.txt").read_text().splitlines():
                if line.strip():
                    p = root / line.split()[0]
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.touch()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        train = build_dataset("ucf101", root, 1, "train", backend="pyav")
        test = build_dataset("ucf101", root, 1, "test", backend="pyav")
        times.append(time.perf_counter() - t0)
    print(f"  sdtl ucf101 split 1, {len(train) + len(test)} entries (train + test): "
          f"median {sorted(times)[2] * 1000:.0f} ms, best {min(times) * 1000:.0f} ms")


def bench_torchvision(tmp: Path, records: list[VideoRecord]) -> None:
    try:
        import warnings

        from torchvision.datasets import UCF101
    except Exception as exc:
        print(f"  torchvision datasets.UCF101: cannot import ({exc})")
        return
    ann = tmp / "tv_lists"
    ann.mkdir(exist_ok=True)
    root = records[0].path.parent.parent
    classes = sorted({r.path.parent.name for r in records})
    (ann / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (ann / "trainlist01.txt").write_text("".join(f"{r.path.parent.name}/{r.path.name} {r.label + 1}\n"
                                                 for r in records))
    (ann / "testlist01.txt").write_text("")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            ds = UCF101(str(root), str(ann), frames_per_clip=16, step_between_clips=16, fold=1, train=True,
                        num_workers=0, output_format="THWC")
            dt = time.perf_counter() - t0
        print(f"  torchvision datasets.UCF101 on {len(records)} real videos: {dt * 1000:.0f} ms "
              f"({dt / len(records) * 1000:.1f} ms per video, it opens and reads every file; ~{dt / len(records) * 13320:.0f} s "
              f"for UCF101's 13,320) -> {len(ds)} clips")
    except Exception as exc:
        print(f"  torchvision datasets.UCF101 could not run: {type(exc).__name__}: {str(exc)[:200]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--kinds", action="store_true", help="only the backend comparison by file kind")
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs; backends: {backend_report()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.kinds:
            print(f"backends by file kind: {args.videos} videos 320x240x175 frames each, clips/s")
            bench_kinds(tmp, args.videos, args.clips)
            return 0
        for codec, ext, label in (("mpeg4", ".avi", "MPEG-4 Part 2 AVI (UCF101-like)"),
                                  ("libx264", ".mp4", "H.264 MP4")):
            t0 = time.perf_counter()
            records = make_videos(tmp / ext.strip("."), args.videos, codec, ext)
            print(f"{label}: {len(records)} videos 320x240x175 frames (written in {time.perf_counter() - t0:.1f} s), "
                  f"16-frame train clips at 112x112")
            bench_backends(records, args.clips)
            if ext == ".avi":
                avi_records = records
        print("dataset construction")
        bench_construction(tmp)
        bench_torchvision(tmp, avi_records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
