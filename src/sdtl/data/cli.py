"""``sdtl data check`` and ``sdtl data bench``: look at a dataset before training on it.

``register(subparsers)`` is wired into the ``sdtl`` entry point by :mod:`sdtl.cli`.

* ``check``: class count, train/test counts, files named in the lists but missing; with ``--decode``
  every video is decoded (in parallel) and the corrupt ones, and those that cannot be seeked
  frame-exactly (decoded from the start, slower), are listed -- cf. mmaction2's ``check_videos``.
  Per subset (``subsets`` in ``--json``): listed, found, missing (count and first names) and unreadable
  (empty or unreadable files -- one ``stat`` per found file, check only, never in training -- plus, with
  ``--decode``, the undecodable ones). Kinetics-400 prints this per-subset view: missing downloads are
  normal there and are counts, not a wrong-root diagnosis.
* ``bench``: clips/s for decode only, decode + transforms, and the full DataLoader with N workers,
  per backend; and the time to construct the dataset. It tells whether the decoder or the model
  sets the pace (``shared/REFERENCE.md`` section 6, complaint 1). The measuring functions are reused
  by ``benchmarks/data_pipeline.py``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from sdtl.data import DATASET_NAMES

# torch, PyAV and the dataset code are imported inside the functions that use them: registering the
# subcommands (every `sdtl ...` call, `--help` included) must not pay torch's import time.


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Dataset parameters")
    g.add_argument("--dataset", required=True, choices=sorted(DATASET_NAMES),
                   help="dataset layout: ucf101, hmdb51 (official lists shipped), kinetics400 (official CSVs in "
                        "<root>/annotations, videos in <root>/train and <root>/val), folder (<root>/<class>/"
                        "<video>), csv (train.csv/test.csv), synthetic (what `sdtl synth` wrote)")
    g.add_argument("--root", required=True, help="dataset root (the folder holding the class folders)")
    g.add_argument("--split", type=int, default=1, help="official split 1..3 (default 1; Kinetics has only 1)")
    g.add_argument("--lists-dir", default=None, help="your own split lists instead of the shipped ones")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="check or benchmark a video dataset",
                                 description="Inspect a video dataset: lists, missing and corrupt files, speed.")
    sub = data.add_subparsers(dest="data_command", metavar="{check,bench}")
    sub.required = True

    check = sub.add_parser(
        "check", help="counts, missing files and (with --decode) corrupt videos",
        description="Match the dataset's split lists to the files under --root and report classes, "
                    "train/test counts and the listed files that are missing. With --decode, every video "
                    "is decoded and the corrupt ones, and those that cannot be seeked frame-exactly "
                    "(decoded from the start: slower), are listed. Exit status 1 when files are missing "
                    "or corrupt, 2 when the input is wrong.",
        epilog="example: sdtl data check --dataset ucf101 --root /data/UCF101 --decode")
    _add_dataset_args(check)
    check.add_argument("--decode", action="store_true",
                       help="decode every video and list the corrupt ones and those decoded from the start")
    check.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="decoding processes for --decode (default: one per CPU core)")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    check.set_defaults(func=run_check)

    bench = sub.add_parser(
        "bench", help="clips/s of decoding, transforms and the DataLoader",
        description="Measure, per decoding backend, clips/s of decoding alone, decoding + transforms "
                    "(one thread, like a DataLoader worker) and the whole DataLoader, and the time to "
                    "build the dataset's index. Tells whether the decoder or the model sets the pace, "
                    "and which backend is faster on your files (--clip-len 1: single-frame reads; "
                    "--stride 2: clips of every other frame).",
        epilog="example: sdtl data bench --dataset ucf101 --root /data/UCF101 --clips 128 --workers 4")
    _add_dataset_args(bench)
    g = bench.add_argument_group("Benchmark parameters")
    g.add_argument("--subset", default="train", choices=("train", "test"),
                   help="which list's videos to read (default train; test also measures multi-clip items)")
    g.add_argument("--clips", type=int, default=64, help="clips per measurement (default 64)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    g.add_argument("--batch-size", type=int, default=8, help="DataLoader batch size (default 8)")
    g.add_argument("--clip-len", type=int, default=16, help="frames per clip (default 16; 1 = single frames)")
    g.add_argument("--stride", type=int, default=1,
                   help="temporal stride between the frames of a clip (default 1; pre-training uses 2-8)")
    g.add_argument("--size", type=int, default=112, help="side of the square crop, in pixels (default 112)")
    g.add_argument("--backend", action="append", choices=("pyav", "torchcodec"),
                   help="backend to measure; repeat for several (default: every available one)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    bench.set_defaults(func=run_bench)


# --------------------------------------------------------------------------- check

def _probe_one(path: str) -> dict:
    import torch

    from sdtl.data.video_io import VideoDecodeError, probe_video

    torch.set_num_threads(1)
    try:
        probe = probe_video(path)
    except VideoDecodeError as exc:
        return {"path": path, "error": exc.reason}
    return {"path": path, "frames": probe.num_frames, "sequential": probe.sequential}


def decode_all(paths: list[str], workers: int) -> list[dict]:
    """Decode every file (``probe_video``) in ``workers`` processes; one result dict per path, in order."""
    if workers <= 1 or len(paths) <= 1:
        return [_probe_one(p) for p in paths]
    with multiprocessing.get_context("spawn" if sys.platform != "linux" else "fork").Pool(workers) as pool:
        return list(pool.imap(_probe_one, paths, chunksize=4))


def check_dataset(name: str, root, split: int = 1, lists_dir=None, decode: bool = False,
                  workers: int = 1) -> dict:
    """The report of ``sdtl data check`` as a dict (also its ``--json`` output)."""
    from sdtl.data import datasets as D
    from sdtl.data.video_io import backend_report

    sources = {}
    if name == "kinetics400":
        from sdtl.data import kinetics as K

        K.check_split(split)
        layout = K.scan(D._check_root(root), lists_dir)
        classes, subsets, files_root, sources = layout.classes, layout.entries, layout.root, layout.sources
    else:
        classes, subsets, files_root = D.read_lists(name, root, split, lists_dir)
    report = {"dataset": name, "root": str(root), "split": split, "classes": len(classes),
              "class_names": classes, "subsets": {}}
    found, missing, all_entries, all_missing = {}, [], [], []
    for subset in ("train", "test"):
        entries = subsets.get(subset) or []
        records, miss = D.match_files(files_root, entries)
        report[subset] = len(records)
        found[subset] = records
        missing += [m.relpath for m in miss]
        all_entries += entries
        all_missing += miss
        report["subsets"][subset] = {
            "listed": len(entries) if subsets.get(subset) is not None else None, "found": len(records),
            "missing": len(miss), "missing_examples": [m.relpath for m in miss[:MISSING_EXAMPLES]],
            "unreadable": [], "source": sources.get(subset)}
        for r in records:
            why = _unreadable(r.path)
            if why:
                report["subsets"][subset]["unreadable"].append({"path": str(r.path), "error": why})
    report["missing"] = missing
    if name == "kinetics400":  # missing downloads are normal: only "nothing at all" means a wrong root
        report["root_problem"] = None
        report["wrong_root"] = bool(all_entries) and not any(found.values())
    else:
        report["root_problem"] = D.root_problem(Path(files_root), all_entries, all_missing)
    report["corrupt"] = []
    report["sequential"] = []
    if decode:
        paths = list(dict.fromkeys(str(r.path) for rs in found.values() for r in rs))
        t0 = time.perf_counter()
        results = decode_all(paths, workers)
        report["decoded"] = len(results)
        report["decode_seconds"] = round(time.perf_counter() - t0, 2)
        report["corrupt"] = [{"path": r["path"], "error": r["error"]} for r in results if "error" in r]
        report["sequential"] = [{"path": r["path"], "reason": r["sequential"]} for r in results
                                if r.get("sequential")]
        bad = {c["path"]: c["error"] for c in report["corrupt"]}
        for subset, records in found.items():
            listed = {u["path"] for u in report["subsets"][subset]["unreadable"]}
            report["subsets"][subset]["unreadable"] += [{"path": str(r.path), "error": bad[str(r.path)]}
                                                        for r in records if str(r.path) in bad
                                                        and str(r.path) not in listed]
    report["backends"] = backend_report()
    return report


#: Missing files named per subset in the report (the full list is ``missing`` in ``--json``).
MISSING_EXAMPLES = 5


def _unreadable(path) -> str | None:
    """Why a found file cannot be a video without decoding it (empty, or no access), else None."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if st.st_size == 0:
        return "empty file (0 bytes)"
    if not os.access(path, os.R_OK):
        return "no read permission"
    return None


def _print_kinetics(rep: dict) -> None:
    from sdtl.data.kinetics import KINETICS_NAMES, ROOT_HINT

    print(f"dataset {rep['dataset']} at {rep['root']}")
    print(f"  classes: {rep['classes']}")
    for subset, s in rep["subsets"].items():
        title = f"  {subset} ({KINETICS_NAMES[subset]}"
        if s["listed"] is None:
            print(f"{title}): none (no annotation file and no class folders)")
            continue
        print(f"{title}, from {s['source']}): {s['listed']} listed, {s['found']} found, {s['missing']} missing"
              + (f" ({100.0 * s['missing'] / max(s['listed'], 1):.1f}%)" if s["missing"] else "")
              + f", {len(s['unreadable'])} unreadable")
        if s["missing"]:
            more = ", ..." if s["missing"] > len(s["missing_examples"]) else ""
            print(f"    missing, e.g.: {', '.join(s['missing_examples'])}{more}")
        for u in s["unreadable"][:10]:
            print(f"    unreadable: {u['path']}: {u['error']}")
        if len(s["unreadable"]) > 10:
            print(f"    ... and {len(s['unreadable']) - 10} more unreadable (see --json)")
    if rep.get("wrong_root"):
        print(f"  no listed video was found: {ROOT_HINT}")
    elif rep["missing"]:
        print("  videos gone from YouTube are normal for Kinetics: train with data.on_missing=skip")
    if "decoded" in rep:
        print(f"  decoded: {rep['decoded']} videos in {rep['decode_seconds']} s")
        print(f"  decoded from the start (cannot be seeked frame-exactly, slower): {len(rep['sequential'])}")
    for name, status in rep["backends"].items():
        print(f"  backend {name}: {status}")


def _print_check(rep: dict) -> None:
    from sdtl.data import datasets as D

    if rep["dataset"] == "kinetics400":
        return _print_kinetics(rep)
    print(f"dataset {rep['dataset']} (split {rep['split']}) at {rep['root']}")
    print(f"  classes: {rep['classes']}")
    print(f"  train:   {rep['train']} videos")
    print(f"  test:    {rep['test']} videos")
    miss = rep["missing"]
    shown = 3 if rep.get("root_problem") else 10  # a wrong root: the hint below matters, not the list
    print(f"  missing: {len(miss)}" + (f" (first: {', '.join(miss[:shown])}{', ...' if len(miss) > shown else ''})"
                                       if miss else ""))
    if rep.get("root_problem"):
        print(f"  {D.describe_root_problem(rep['root_problem'])}")
    corrupt = {c["path"] for c in rep["corrupt"]}  # listed below, with --decode
    unreadable = [u for s in rep["subsets"].values() for u in s["unreadable"] if u["path"] not in corrupt]
    if unreadable:
        print(f"  unreadable: {len(unreadable)}")
        for u in unreadable[:10]:
            print(f"    {u['path']}: {u['error']}")
    if "decoded" in rep:
        print(f"  decoded: {rep['decoded']} videos in {rep['decode_seconds']} s")
        print(f"  corrupt: {len(rep['corrupt'])}")
        for c in rep["corrupt"]:
            print(f"    {c['path']}: {c['error']}")
        print(f"  decoded from the start (cannot be seeked frame-exactly, slower): {len(rep['sequential'])}")
        for s in rep["sequential"][:20]:
            print(f"    {s['path']}: {s['reason']}")
        if len(rep["sequential"]) > 20:
            print(f"    ... and {len(rep['sequential']) - 20} more (see --json)")
    for name, status in rep["backends"].items():
        print(f"  backend {name}: {status}")


def _check_kinetics_split(args) -> None:
    if args.dataset == "kinetics400" and args.split != 1:
        from sdtl.errors import UserError

        raise UserError(f"--split {args.split}: Kinetics-400 has one official split (train / validate); "
                        f"leave --split out")


def run_check(args) -> int:
    """Exit status 0: all good; 1: missing, unreadable or corrupt files; 2: the root is wrong (no class
    folder; for Kinetics: none of the listed videos found)."""
    _check_kinetics_split(args)
    rep = check_dataset(args.dataset, args.root, args.split, args.lists_dir, args.decode, args.workers)
    if args.json:
        print(json.dumps(rep))
    else:
        _print_check(rep)
    problem = rep["root_problem"]
    if (problem and problem["present_folders"] == 0) or rep.get("wrong_root"):
        return 2
    unreadable = any(s["unreadable"] for s in rep["subsets"].values())
    return 1 if rep["missing"] or rep["corrupt"] or unreadable else 0


# --------------------------------------------------------------------------- bench

def measure_decode(records, backend: str, clips: int, clip_len: int = 16, seed: int = 0, stride: int = 1) -> float:
    """Clips/s of open + decode of one random training clip per video, in this process.

    Every file is probed before the clock starts, as a run probes each file once (its
    ``video_index.jsonl``): what is measured is the per-clip cost of the rest of a run.
    """
    import torch

    from sdtl.data.sampling import sample_train_clip
    from sdtl.data.video_io import VideoDecodeError, open_video, probe_file

    for r in records[:clips]:
        try:
            probe_file(r.path)
        except VideoDecodeError:
            pass
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for i in range(clips):
        with open_video(records[i % len(records)].path, backend) as reader:
            reader.get_frames(sample_train_clip(reader.num_frames, clip_len, stride, g))
    return clips / (time.perf_counter() - t0)


def measure_dataset(dataset, clips: int) -> float:
    """Clips/s of ``dataset[i]`` (decode + transforms) in this process, on one thread like a worker."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run single-threaded; measure the same thing
    try:
        t0 = time.perf_counter()
        n = 0
        for i in range(clips):
            item = dataset[i % len(dataset)]
            n += item["video"].shape[0] if item["video"].dim() == 5 else 1
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def measure_loader(dataset, clips: int, workers: int, batch_size: int) -> float:
    """Steady-state clips/s of a DataLoader (worker start-up and the first batch not counted)."""
    import torch

    from sdtl.data import datasets as D

    n_items = max(clips, 2 * batch_size * max(workers, 1))
    sampler = [i % len(dataset) for i in range(n_items + batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=D.collate_clips, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["video"].shape[0]
    return n / (time.perf_counter() - t0)


def bench_dataset(name: str, root, split: int = 1, lists_dir=None, subset: str = "train", clips: int = 64,
                  workers: int = 2, batch_size: int = 8, clip_len: int = 16, size: int = 112,
                  backends=None, stride: int = 1) -> dict:
    from sdtl.data import datasets as D
    from sdtl.data.video_io import available_backends, backend_report

    t0 = time.perf_counter()
    records, classes = D.list_records(name, root, split, subset, lists_dir, on_missing="skip")
    construct = time.perf_counter() - t0
    result = {"dataset": name, "videos": len(records), "construct_seconds": round(construct, 4),
              "clip_len": clip_len, "stride": stride, "backends": {}, "unavailable": {}}
    for b in backends or ("torchcodec", "pyav"):
        if b not in available_backends():
            result["unavailable"][b] = backend_report()[b]
            continue
        ds = D.VideoClipDataset(records, classes, mode=subset, clip_len=clip_len, stride=stride, size=size,
                                backend=b)
        result["backends"][b] = {
            "decode_clips_per_s": round(measure_decode(records, b, clips, clip_len, stride=stride), 1),
            "decode_transform_clips_per_s": round(measure_dataset(ds, clips), 1),
            f"loader_{workers}w_clips_per_s": round(measure_loader(ds, clips, workers, batch_size), 1),
        }
        if b == "torchcodec":  # the probe hands some files to PyAV: say how many torchcodec really decodes
            result["torchcodec_files"] = _count_torchcodec_files(records[:clips])
    return result


def _count_torchcodec_files(records) -> str:
    from sdtl.data.video_io import VideoDecodeError, open_video

    own = 0
    for r in records:
        try:
            with open_video(r.path, "torchcodec") as reader:
                own += reader.decoder == "torchcodec"
        except VideoDecodeError:
            pass
    return f"{own} of {len(records)} files decoded by torchcodec itself, the others by PyAV's exact path"


def run_bench(args) -> int:
    _check_kinetics_split(args)
    res = bench_dataset(args.dataset, args.root, args.split, args.lists_dir, args.subset, args.clips, args.workers,
                        args.batch_size, args.clip_len, args.size, args.backend, args.stride)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"dataset {res['dataset']}: {res['videos']} videos, constructed in {res['construct_seconds']:.3f} s; "
          f"clips of {res['clip_len']} frames, stride {res['stride']}")
    for b, r in res["backends"].items():
        print(f"  {b:10s} " + "  ".join(f"{k.replace('_clips_per_s', '')}: {v} clips/s" for k, v in r.items()))
    if "torchcodec_files" in res:
        print(f"  torchcodec: {res['torchcodec_files']}")
    for b, why in res["unavailable"].items():
        print(f"  {b:10s} unavailable: {why}")
    return 0
