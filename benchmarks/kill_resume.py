"""kill -9 at random moments inside epochs, resume, compare with an uninterrupted run.

What ``tests/test_stop_and_resume.py`` checks in CI (three kills per run), run longer and with more kills,
printing where each kill landed and what was compared: on CPU with ``run.deterministic`` a fine-tune
(self-distillation with a teacher refreshed every 3 steps, dropout, a checkpoint after every optimizer
step) that is killed N times and resumed each time (``--resume auto``) must end with exactly the
uninterrupted run's weights, optimizer, scheduler, teacher, RNG, history and test results. One more run
keeps the default checkpoints (epoch ends only) and is killed once inside every epoch after the first:
each resume starts from an epoch boundary and repeats the killed epoch's steps.

    python benchmarks/kill_resume.py --out /tmp/kill9 --kills 10 --workers 0 2

Exit status 0 when every compared entry is equal, 1 otherwise. The synthetic data and the pre-trained
encoder are made in ``OUT`` first (tiny preset; about a minute in all on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMING = {"clips_per_s", "data_wait", "epoch_time_s", "eta", "wall_time_s", "time"}
COMPARED = ("model", "optimizer", "scheduler", "scaler", "task_state", "callback_state", "rng", "best",
            "epoch", "step_in_epoch")


def sdtl(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdtl", "-q", *args]


def finetune_args(data: Path, encoder: Path, out: Path, workers: int, epochs: int, every: bool) -> list[str]:
    sets = [f"data.root={data}", f"model.pretrained={encoder}", f"optim.epochs={epochs}", "run.threads=1",
            "regularizer.snapshot_every=3", "model.dropout=0.5", f"data.workers={workers}"]
    if every:
        sets.append("run.checkpoint_every_steps=1")
    return ["finetune", "--config", "synthetic_tiny", "--deterministic", "--out", str(out),
            *[a for s in sets for a in ("--set", s)]]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def position(out: Path):
    """(epoch, step_in_epoch) of the run's last.pt, or None before the first one."""
    try:
        ckpt = load(out / "checkpoints" / "last.pt")
    except Exception:  # noqa: BLE001 - not written yet (renames are atomic: never half a file)
        return None
    return ckpt["epoch"], ckpt.get("step_in_epoch") or 0


def differences(a, b, where: str = "") -> list[str]:
    """Every place two checkpoint entries differ (tensors by torch.equal; timing fields skipped)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - TIMING
        return [d for k in sorted(keys, key=str) for d in differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length {len(a)} vs {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def killed_run(args: list[str], out: Path, kills: int, rng: random.Random) -> list[tuple]:
    """Start, kill -9 somewhere inside an epoch, resume; ``kills`` times; then let it finish."""
    landed, resume = [], []
    while len(landed) < kills:
        proc = subprocess.Popen(sdtl(*args, *resume), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = position(out)
        wait = rng.uniform(0.0, 0.3)
        while proc.poll() is None:
            now = position(out)
            if now is not None and now != start:  # a step of this process was saved: kill somewhere after it
                time.sleep(wait)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                landed.append(position(out))
                break
            time.sleep(0.01)
        else:
            sys.exit(f"the run ended before kill {len(landed) + 1}: use more --epochs\n"
                     f"{proc.stderr.read().decode()[-2000:]}")
        resume = ["--resume", "auto"]
    subprocess.run(sdtl(*args, "--resume", "auto"), env=ENV, check=True)
    return landed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    p.add_argument("--kills", type=int, default=10, help="kills per killed run (default 10)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.workers values (default 0 2)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of 5 steps (default 8: room for 10 kills)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--no-epoch-run", action="store_true", help="skip the epoch-end-checkpoints run")
    a = p.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        sys.exit(f"--out {a.out}: not empty; give a new folder")
    a.out.mkdir(parents=True, exist_ok=True)

    data, encoder_run = a.out / "data", a.out / "pretrain"
    subprocess.run(sdtl("synth", "--preset", "tiny", "--out", str(data)), env=ENV, check=True)
    subprocess.run(sdtl("pretrain", "--config", "synthetic_tiny_pretrain", "--out", str(encoder_run),
                        "--set", f"data.root={data}"), env=ENV, check=True)
    encoder = encoder_run / "checkpoints" / "encoder.pt"

    rng, failed, rows = random.Random(a.seed), False, []
    plans = [(w, "every step", a.kills) for w in a.workers]
    if not a.no_epoch_run:
        plans.append((a.workers[0], "epoch ends", a.epochs - 1))
    references = {}
    for workers, every, kills in plans:
        ref, run = a.out / f"reference_w{workers}", a.out / f"killed_w{workers}_{every.replace(' ', '_')}"
        t0 = time.time()
        if workers not in references:
            subprocess.run(sdtl(*finetune_args(data, encoder, ref, workers, a.epochs, every=False)), env=ENV,
                           check=True)
            references[workers] = time.time() - t0
        ref_s = references[workers]
        t0 = time.time()
        landed = killed_run(finetune_args(data, encoder, run, workers, a.epochs, every=every == "every step"),
                            run, kills, rng)
        killed_s = time.time() - t0
        mine, theirs = load(run / "checkpoints" / "last.pt"), load(ref / "checkpoints" / "last.pt")
        diffs = [d for key in COMPARED for d in differences(mine.get(key), theirs.get(key), key)]
        history = differences(mine.get("history"), theirs.get("history"), "history")
        results = [k for k in ("video_acc1", "clip_acc1", "mean_class_acc", "video_acc5")
                   if json.loads((run / "results.json").read_text()).get(k)
                   != json.loads((ref / "results.json").read_text()).get(k)]
        same_metrics = metrics(run) == metrics(ref)
        tensors = sum(1 for v in mine["model"].values() if isinstance(v, torch.Tensor))
        ok = not diffs and not history and not results and same_metrics
        failed |= not ok
        inside = sum(1 for pos in landed if pos and pos[1] > 0)
        rows.append((workers, every, len(landed), inside, landed, tensors, ok, diffs + history + results, ref_s,
                     killed_s))

    print("\n| data.workers | checkpoints | kills | resumed inside an epoch | resumed from (epoch, step) | "
          "model tensors | everything equal | reference s | killed run s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workers, every, n, inside, landed, tensors, ok, diffs, ref_s, killed_s in rows:
        where = " ".join(f"({e},{s})" for e, s in landed)
        print(f"| {workers} | {every} | {n} | {inside} | {where} | {tensors} | "
              f"{'yes' if ok else 'NO: ' + ', '.join(diffs[:5])} | {ref_s:.0f} | {killed_s:.0f} |")
    print("\ncompared: " + ", ".join(COMPARED) + ", history, metrics.jsonl (timing fields left out), results.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
