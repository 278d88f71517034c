"""``sdtl sweep``: a grid over config keys × seeds, each point an ordinary fine-tuning run.

    sdtl sweep --config ucf101_r21d_sd --grid regularizer.weight=0.1,1,10,100,1000 --seeds 3 \\
               --out S --set data.root=/data/UCF101

* ``--grid KEY=V1,V2,...`` is repeatable; the sweep runs the product of all grids × seeds 0..N−1.
  Values are read like ``--set`` values (YAML scalars; a list value is written ``[a,b]``).
* Every run is an ordinary ``sdtl finetune`` run in ``S/runs/<point>/seed<k>`` (inspect, evaluate or
  resume any of them on its own). Every config is built and validated before the first run starts,
  so a wrong key or a value of the wrong type costs nothing.
* Re-running the same command skips finished runs (``results.json``) and resumes unfinished ones
  (``--resume auto``), so a sweep killed at any moment finishes only what is missing. A run folder
  whose stored config is not what the sweep would run is refused, never reused.
* ``S/sweep.json`` records the sweep's identity (base config, grid, seeds). A different grid on the
  same ``S`` is refused unless ``--extend`` (then the old grid's keys must stay and its values and
  seeds may only grow; the finished runs are reused).
* ``--parallel N`` runs N runs at a time as child processes; with GPUs each child sees one
  (``CUDA_VISIBLE_DEVICES``, round robin).

Outputs: ``S/sweep.json`` (every run and every point), ``S/sweep.md`` (a Table-2-style table: mean ±
std over seeds of the validation accuracy that selected each run's checkpoint and of its test
accuracy; the best point *on validation* is marked, test is shown beside it and never used to
choose), ``S/sweep.png`` (both against the first swept key, a log axis when its values are positive
numbers spanning ≥ 10×; one line per value of the other keys).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sdtl.atomic import atomic_write_text
from sdtl.errors import RunFailed, UserError
from sdtl.studies.stats import mean_std

log = logging.getLogger("sdtl.sweep")

MARKER = "sweep.json"
SEED_KEY = "run.seed"
METRIC = "video_acc1"  # test metric of the selected checkpoint (results.json)
VAL_METRIC = "val_video_acc1"  # validation metric at the selected epoch (metrics.jsonl)


@dataclass
class SweepRun:
    """One run of a sweep: a grid point and a seed."""

    point: dict[str, str]  # key -> value as typed
    seed: int
    dir: Path
    label: str | None = None  # a name for logs and failure records (default: point/seed)

    @property
    def name(self) -> str:
        return self.label or f"{point_name(self.point)}/seed{self.seed}"

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.point.items()] + [f"{SEED_KEY}={self.seed}"]


# ------------------------------------------------------------------------------------- the grid
def split_values(text: str) -> list[str]:
    """``"0.1,1,[a,b]"`` -> ``["0.1", "1", "[a,b]"]``: commas inside brackets belong to a list value."""
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    out.append(current.strip())
    return out


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["regularizer.weight=1,10", "optim.lr=0.01"]`` -> ``{key: [values as typed]}`` in order."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--grid {item}: expected KEY=V1,V2,..., e.g. --grid regularizer.weight=0.1,1,10")
        if key == SEED_KEY:
            raise UserError(f"--grid {item}: seeds are set with --seeds N (runs seeds 0..N-1), not a grid")
        if key in grid:
            raise UserError(f"--grid {key}: given twice; put all its values in one --grid")
        vals = split_values(values)
        if any(v == "" for v in vals) or len(set(vals)) != len(vals):
            raise UserError(f"--grid {item}: empty or repeated value; list each value once, comma-separated")
        grid[key] = vals
    if not grid:
        raise UserError("--grid is required at least once, e.g. --grid regularizer.weight=0.1,1,10")
    return grid


def point_name(point: dict[str, str]) -> str:
    """Folder name of a grid point: ``regularizer.weight=10,optim.lr=0.01`` (unsafe characters -> _)."""
    return ",".join(f"{k}={re.sub(r'[^A-Za-z0-9._+-]', '_', v)}" for k, v in point.items())


def plan_runs(grid: dict[str, list[str]], seeds: int, out: Path) -> list[SweepRun]:
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    runs = [SweepRun(p, s, out / "runs" / point_name(p) / f"seed{s}") for p in points for s in range(seeds)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("--grid: two values map to the same run folder name after replacing unsafe characters; "
                        "use values that differ in letters, digits or . _ + -")
    return runs


def build_configs(config: str, sets: list[str], runs: list[SweepRun]) -> list:
    """Every run's config, built and validated now: bad keys or values stop the sweep before any run."""
    from sdtl.engine import config as cfgmod

    cfgs = []
    for run in runs:
        try:
            cfg = cfgmod.load_config(config, [*sets, *run.overrides()], kind="finetune")
            cfgmod.validate_ranges(cfg)
        except UserError as exc:
            raise UserError(f"sweep point {run.name}: {exc}") from None
        cfgs.append(cfg)
    return cfgs


# --------------------------------------------------------------------------------- the sweep dir
def sweep_identity(config: str, sets: list[str], grid: dict, seeds: int) -> dict:
    from sdtl.engine import config as cfgmod

    base = cfgmod.to_dict(cfgmod.load_config(config, sets, kind="finetune"))
    for key in grid:  # the swept keys' base values do not matter
        section, _, name = key.partition(".")
        base.get(section, {}).pop(name, None)
    base.get("run", {}).pop("seed", None)
    return {"base_config": base, "grid": grid, "seeds": seeds}


def claim(out: Path, identity: dict, extend: bool) -> dict | None:
    """Check that ``out`` may hold this sweep; returns the previous identity (None for a new sweep)."""
    from sdtl.engine.runlock import LOCK_NAME

    marker = out / MARKER
    if not marker.exists():
        if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
            raise UserError(f"--out {out}: exists and holds no sdtl sweep; choose a new --out directory")
        return None
    old = (json.loads(marker.read_text()) or {}).get("identity") or {}
    if old == identity or _same_sweep(old, identity):
        return old
    from sdtl.engine.rundir import config_changes

    base_changes = config_changes(old.get("base_config") or {}, identity["base_config"])
    if base_changes:
        raise UserError(f"--out {out}: holds a sweep of another base config ({'; '.join(base_changes[:3])}); "
                        f"choose a new --out directory")
    old_grid = old.get("grid") or {}
    grows = (list(old_grid) == list(identity["grid"]) and identity["seeds"] >= old.get("seeds", 0)
             and all(set(v) <= set(identity["grid"][k]) for k, v in old_grid.items()))
    if not extend or not grows:
        described = ", ".join(f"{k}={','.join(v)}" for k, v in old_grid.items())
        hint = ("pass --extend to add values or seeds to it" if grows else
                "--extend can only add values or seeds to the same keys")
        raise UserError(f"--out {out}: holds a sweep of another grid ({described}, {old.get('seeds')} seeds); "
                        f"{hint}, or choose a new --out directory")
    return old


def _same_sweep(old: dict, new: dict) -> bool:
    """The same base, keys, seeds and values (in any order): the same runs."""
    og, ng = old.get("grid") or {}, new["grid"]
    return (old.get("base_config") == new["base_config"] and old.get("seeds") == new["seeds"]
            and list(og) == list(ng) and all(set(og[k]) == set(ng[k]) for k in og))


# --------------------------------------------------------------------------------------- running
def is_finished(run: SweepRun) -> bool:
    return (run.dir / "results.json").exists()


def execute(runs: list[SweepRun], cfgs: list, config: str, sets: list[str], out: Path, parallel: int) -> dict[str, str]:
    """Run what is missing; returns ``{run name: error}`` for runs that failed (the others finished)."""
    from sdtl.engine.rundir import check_same_config

    for run, cfg in zip(runs, cfgs):
        check_same_config(run.dir, cfg, "this sweep")
    todo = [(run, cfg) for run, cfg in zip(runs, cfgs) if not is_finished(run)]
    log.info("sweep %s: %d runs, %d finished, %d to run%s", out, len(runs), len(runs) - len(todo), len(todo),
             f" ({parallel} at a time)" if parallel > 1 and todo else "")
    if parallel <= 1:
        return _run_in_process(todo)
    return _run_children(todo, config, sets, out, parallel)


def _run_in_process(todo) -> dict[str, str]:
    from sdtl.engine.finetune import run_finetune

    failed = {}
    for i, (run, cfg) in enumerate(todo, start=1):
        log.info("sweep [%d/%d] %s", i, len(todo), run.name)
        try:
            run_finetune(cfg, run.dir, resume="auto")
        except RunFailed as exc:  # e.g. a diverging point: recorded, the sweep goes on
            log.warning("sweep: %s failed: %s", run.name, exc)
            failed[run.name] = str(exc)
    return failed


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed sweep kills its runs
    except OSError:
        pass


def _run_children(todo, config: str, sets: list[str], out: Path, parallel: int) -> dict[str, str]:
    import torch

    gpus = torch.cuda.device_count()
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    pending, running, failed = list(todo), {}, {}
    load = {g: 0 for g in range(gpus)}  # children per GPU: a new child gets the least loaded one
    while pending or running:
        while pending and len(running) < parallel:
            run, _ = pending.pop(0)
            cmd = [sys.executable, "-m", "sdtl", "-q", "finetune", "--config", config, "--out", str(run.dir),
                   "--resume", "auto"]
            for item in [*sets, *run.overrides()]:
                cmd += ["--set", item]
            env = dict(os.environ)
            gpu = min(load, key=lambda g: (load[g], g)) if gpus else None
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
                load[gpu] += 1
            log_path = logs / (run.name.replace("/", "__") + ".log")
            with open(log_path, "a", encoding="utf-8") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
            running[proc] = (run, log_path, gpu)
            log.info("sweep: started %s (pid %d%s)", run.name, proc.pid, f", GPU {gpu}" if gpu is not None else "")
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            run, log_path, gpu = running.pop(proc)
            if gpu is not None:
                load[gpu] -= 1
            if proc.returncode != 0:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                failed[run.name] = f"exit {proc.returncode}: {tail[0]} (log: {log_path})"
                log.warning("sweep: %s failed: %s", run.name, failed[run.name])
    return failed


# ------------------------------------------------------------------------------------- reporting
def collect(run: SweepRun) -> dict:
    """What the tables need from a finished run: its test result and the validation value that selected it."""
    res = json.loads((run.dir / "results.json").read_text())
    history = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epoch = res["selected"]["epoch"]
    at_selected = next((r for r in history if r.get("epoch") == epoch), {})
    return {"test": res[METRIC], "test_last": res["last"][METRIC], "test_mean_class": res["mean_class_acc"],
            "val": at_selected.get(VAL_METRIC, float("nan")), "epoch": epoch, "history": history}


def _stat(values: list[float]) -> dict:
    m, s = mean_std(values)
    return {"mean": m, "std": s, "values": values}


def summarise(runs: list[SweepRun], grid: dict, seeds: int, failed: dict[str, str], out: Path) -> dict:
    rows = []
    for key, group in itertools.groupby(runs, key=lambda r: point_name(r.point)):
        group = list(group)
        done = [(r, collect(r)) for r in group if is_finished(r)]
        rows.append({
            "point": group[0].point, "name": key, "runs": len(group), "finished": len(done),
            "failed": {r.name: failed[r.name] for r in group if r.name in failed},
            "seeds": [r.seed for r, _ in done],
            "val": _stat([c["val"] for _, c in done]), "test": _stat([c["test"] for _, c in done]),
            "test_last": _stat([c["test_last"] for _, c in done]),
            "test_mean_class": _stat([c["test_mean_class"] for _, c in done]),
            "dirs": [str(r.dir.relative_to(out)) for r, _ in done],
        })
    eligible = [i for i, r in enumerate(rows) if r["finished"] == r["runs"] and not math.isnan(r["val"]["mean"])]
    best = max(eligible, key=lambda i: (rows[i]["val"]["mean"], -i)) if eligible else None
    for i, row in enumerate(rows):
        row["best_on_val"] = i == best
    return {"grid": grid, "seeds": seeds, "points": rows, "best": rows[best]["point"] if best is not None else None,
            "selection": "highest mean validation video acc@1 over seeds (ties: the first point in grid order); "
                         "test is reported beside it, never used to choose"}


def fmt(stat: dict) -> str:
    if not stat["values"]:
        return "—"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def render_markdown(summary: dict, command: str) -> str:
    keys = list(summary["grid"])
    lines = [f"# sdtl sweep: {', '.join(keys)} × {summary['seeds']} seeds", "",
             f"`{command}`", "",
             "Mean ± std over seeds. *val*: validation video acc@1 of the epoch each run selected on validation; "
             "*test*: test video acc@1 of that checkpoint. ◀ marks the best point on validation "
             "(test never chooses).", "",
             "| " + " | ".join(keys) + " | val acc@1 | test acc@1 | test mean-class | runs |",
             "|" + "---|" * (len(keys) + 4)]
    for row in summary["points"]:
        mark = " ◀" if row["best_on_val"] else ""
        status = f"{row['finished']}/{row['runs']}" + (f" ({len(row['failed'])} failed)" if row["failed"] else "")
        vals = [row["point"][k] for k in keys]
        val = f"**{fmt(row['val'])}**{mark}" if row["best_on_val"] else fmt(row["val"])
        lines.append("| " + " | ".join(vals) + f" | {val} | {fmt(row['test'])} | {fmt(row['test_mean_class'])} "
                     f"| {status} |")
    failed = {k: v for row in summary["points"] for k, v in row["failed"].items()}
    if failed:
        lines += ["", "Failed runs (re-run the sweep to retry them from their last checkpoint):", ""]
        lines += [f"- `{k}`: {v}" for k, v in failed.items()]
    return "\n".join(lines) + "\n"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def plot(summary: dict, path: Path) -> None:
    from sdtl.studies.demo import _plt, _save

    plt = _plt()
    keys = list(summary["grid"])
    x_key, others = keys[0], keys[1:]
    xs_text = summary["grid"][x_key]
    numeric = all(_number(v) is not None for v in xs_text)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    groups: dict[tuple, list[dict]] = {}
    for row in summary["points"]:
        groups.setdefault(tuple(row["point"][k] for k in others), []).append(row)
    for ax, (metric, title) in zip(axes[0], (("val", "validation video acc@1 (%)"), ("test", "test video acc@1 (%)"))):
        for label, rows in groups.items():
            pts = [(_number(r["point"][x_key]) if numeric else xs_text.index(r["point"][x_key]), r[metric])
                   for r in rows if r[metric]["values"]]
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                        marker="o", capsize=3, label=", ".join(f"{k}={v}" for k, v in zip(others, label)) or None)
        best = next((r for r in summary["points"] if r["best_on_val"]), None)
        if best is not None and best[metric]["values"]:
            bx = _number(best["point"][x_key]) if numeric else xs_text.index(best["point"][x_key])
            ax.plot([bx], [best[metric]["mean"]], marker="*", ms=14, color="gold", mec="k", zorder=5,
                    label="best on validation")
        if numeric and min(_number(v) for v in xs_text) > 0 and \
                max(_number(v) for v in xs_text) / min(_number(v) for v in xs_text) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(xs_text)), xs_text)
        ax.set_xlabel(x_key)
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------ entry point
def run_sweep(config: str, grid_items: list[str], seeds: int, out: str | Path, sets: list[str] | None = None,
              dry_run: bool = False, parallel: int = 1, extend: bool = False, command: str | None = None) -> dict | None:
    from sdtl.engine.runlock import RunLock

    out = Path(out)
    sets = list(sets or [])
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1 (the sweep runs seeds 0..N-1)")
    if parallel < 1:
        raise UserError(f"--parallel {parallel}: must be >= 1")
    grid = parse_grid(grid_items)
    runs = plan_runs(grid, seeds, out)
    cfgs = build_configs(config, sets, runs)  # every config valid before anything is written
    identity = sweep_identity(config, sets, grid, seeds)
    if dry_run:
        claim(out, identity, extend)
        for run in runs:
            state = "finished" if is_finished(run) else "partial" if run.dir.exists() else "to run"
            print(f"{state:<9} {run.dir}")
        return None
    claim(out, identity, extend)  # refuse before creating anything
    command = command or f"sdtl sweep --config {config} " + " ".join(
        [*(f"--grid {g}" for g in grid_items), f"--seeds {seeds}", f"--out {out}", *(f"--set {s}" for s in sets)])
    with RunLock(out, "sweep"):
        claim(out, identity, extend)  # again, under the lock
        marker = {"identity": identity, "command": command, "config": config, "sets": sets}
        atomic_write_text(out / MARKER, json.dumps(marker, indent=2) + "\n")
        t0 = time.perf_counter()
        failed = execute(runs, cfgs, config, sets, out, parallel)
        summary = summarise(runs, grid, seeds, failed, out)
        summary.update(marker, wall_time_s=time.perf_counter() - t0)
        atomic_write_text(out / "sweep.md", render_markdown(summary, command))
        plot(summary, out / "sweep.png")
        atomic_write_text(out / MARKER, json.dumps(summary, indent=2, default=str) + "\n")
    print(render_markdown(summary, command))
    return summary
