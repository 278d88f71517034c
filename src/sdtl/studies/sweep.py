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
import math
import re
import time
from pathlib import Path

from sdtl.errors import UserError
from sdtl.studies import core, plots

MARKER = "sweep.json"
SEED_KEY = "run.seed"


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


def plan_runs(grid: dict[str, list[str]], seeds: int, out: Path, config: str, sets: list[str]) -> list[core.RunSpec]:
    """The product of the grid x seeds, point by point: ``OUT/runs/<point>/seed<k>``, each the base
    config + ``--set`` items + the point's values + its seed."""
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    runs = [core.RunSpec(f"{point_name(p)}/seed{s}", out / "runs" / point_name(p) / f"seed{s}", config,
                         [*sets, *(f"{k}={v}" for k, v in p.items()), f"{SEED_KEY}={s}"], seed=s, point=p)
            for p in points for s in range(seeds)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("--grid: two values map to the same run folder name after replacing unsafe characters; "
                        "use values that differ in letters, digits or . _ + -")
    return runs


# --------------------------------------------------------------------------------- the sweep dir
def sweep_identity(config: str, sets: list[str], grid: dict, seeds: int) -> dict:
    from sdtl.engine import config as cfgmod

    base = cfgmod.to_dict(cfgmod.load_config(config, sets, kind="finetune"))
    for key in grid:  # the swept keys' base values do not matter
        section, _, name = key.partition(".")
        base.get(section, {}).pop(name, None)
    base.get("run", {}).pop("seed", None)
    return {"base_config": base, "grid": grid, "seeds": seeds}


def _check_grid(out: Path, old: dict, identity: dict, extend: bool) -> None:
    """The same sweep, or (with ``--extend``) the same base and keys with values and seeds only added."""
    if old == identity or _same_sweep(old, identity):
        return
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


def claim(out: Path, identity: dict, extend: bool) -> dict | None:
    """May ``out`` hold this sweep? Its sweep.json (None for a new sweep)."""
    return core.claim_out(out, "sweep", MARKER, identity, extend=extend, check=_check_grid)


def _same_sweep(old: dict, new: dict) -> bool:
    """The same base, keys, seeds and values (in any order): the same runs."""
    og, ng = old.get("grid") or {}, new["grid"]
    return (old.get("base_config") == new["base_config"] and old.get("seeds") == new["seeds"]
            and list(og) == list(ng) and all(set(og[k]) == set(ng[k]) for k in og))


# ------------------------------------------------------------------------------------- reporting
METRICS = {"val": lambda c: c["val"], "test": lambda c: c["test"], "test_last": lambda c: c["test_last"],
           "test_mean_class": lambda c: c["test_mean_class"]}


def summarise(runs: list[core.RunSpec], grid: dict, seeds: int, failed: dict[str, str], out: Path) -> dict:
    """Per grid point: mean ± std over seeds of the validation value that selected each run's checkpoint
    and of its test results; the best point on validation (complete points only) is marked."""
    by = (lambda r: point_name(r.point))
    rows = core.summarise(runs, METRICS, by=by, failed=failed, root=out)
    table = []
    for key, group in core.group_runs(runs, by).items():
        row = rows[key]
        table.append({"point": group[0].point, "name": key, "runs": row["runs"], "finished": row["finished"],
                      "failed": row["failed"], "seeds": row["seeds"],
                      **{k: row[k] for k in METRICS}, "dirs": row["dirs"]})
    eligible = [i for i, r in enumerate(table) if r["finished"] == r["runs"] and not math.isnan(r["val"]["mean"])]
    best = max(eligible, key=lambda i: (table[i]["val"]["mean"], -i)) if eligible else None
    for i, row in enumerate(table):
        row["best_on_val"] = i == best
    return {"grid": grid, "seeds": seeds, "points": table, "best": table[best]["point"] if best is not None else None,
            "num_classes": core.num_classes_of(runs),
            "selection": "highest mean validation video acc@1 over seeds (ties: the first point in grid order); "
                         "test is reported beside it, never used to choose"}


fmt = core.fmt


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
    plt = plots.pyplot()
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
        plots.chance_line(ax, summary.get("num_classes"))
        ax.set_xlabel(x_key)
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save(fig, path)


# ------------------------------------------------------------------------------------ entry point
def run_sweep(config: str, grid_items: list[str], seeds: int, out: str | Path, sets: list[str] | None = None,
              dry_run: bool = False, parallel: int = 1, extend: bool = False, command: str | None = None,
              slurm: bool = False, wait: bool = False) -> dict | None:
    out = Path(out)
    sets = list(sets or [])
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1 (the sweep runs seeds 0..N-1)")
    grid = parse_grid(grid_items)
    runs = plan_runs(grid, seeds, out, config, sets)
    cfgs = core.build_configs(runs, "sweep")  # every config valid before anything is written
    executor = core.make_executor("sweep", parallel, out, cfgs[0].slurm if slurm else None, wait)
    identity = sweep_identity(config, sets, grid, seeds)
    if dry_run:
        claim(out, identity, extend)
        for run in runs:
            state = "finished" if run.finished else "partial" if run.dir.exists() else "to run"
            print(f"{state:<9} {run.dir}")
        return None
    command = command or f"sdtl sweep --config {config} " + " ".join(
        [*(f"--grid {g}" for g in grid_items), f"--seeds {seeds}", f"--out {out}", *(f"--set {s}" for s in sets)])
    with core.study_folder(out, "sweep", lambda: claim(out, identity, extend)) as old:
        earlier = (old or {}).get("wall_time_s")
        earlier = {"wall_time_s": earlier, "invocations": (old or {}).get("invocations", 1)} \
            if isinstance(earlier, (int, float)) else {}
        marker = {"identity": identity, "command": command, "config": config, "sets": sets}
        core.write_json(out / MARKER, {**marker, **earlier})
        t0 = time.perf_counter()
        failed = core.run_all(runs, cfgs, executor, "sweep")
        if slurm and not wait:
            print(f"see each run's state with: sdtl sweep --status {out}; when every run is done, re-run this "
                  f"command to write sweep.md (it submits only what is missing or failed)")
            return None
        summary = summarise(runs, grid, seeds, failed, out)
        # wall time adds up over the invocations that ran this sweep's runs
        summary.update(marker, **core.accumulate_wall_time(earlier, {"wall_time_s": time.perf_counter() - t0}))
        core.write_text(out / "sweep.md", render_markdown(summary, command))
        plot(summary, out / "sweep.png")
        core.write_json(out / MARKER, summary)
    print(render_markdown(summary, command))
    return summary


def sweep_status(out: str | Path) -> list[dict]:
    """Each run of the sweep in ``out``: ``done``, ``queued`` / ``running`` / ``failed`` / ``stopped``
    (its latest Slurm job, with the reason), ``partial`` (has checkpoints, no job running: re-run the
    sweep to resume it) or ``not started``. Printed by ``sdtl sweep --status``."""
    out = Path(out)
    marker = core.read_marker(out, MARKER) if out.is_dir() else None
    if not marker or "identity" not in marker:
        raise UserError(f"--status {out}: no sweep.json there; give the --out folder of an `sdtl sweep`")
    identity = marker["identity"]
    runs = plan_runs(identity["grid"], identity["seeds"], out, marker["config"], marker.get("sets") or [])
    jobs = core.job_states(out / "slurm") if (out / "slurm").is_dir() else {}
    rows = []
    for run in runs:
        job = jobs.get(run.name)
        if run.finished:
            state, detail = "done", ""
        elif job and job["state"] != "done":
            state, detail = job["state"], job["detail"] or ""
            if state in ("failed", "stopped", "unknown"):
                detail = f"{detail} (log: {job['log'].replace('%t', '0')})"
        elif (run.dir / "checkpoints" / "last.pt").exists():
            state, detail = "partial", "has checkpoints; re-run the sweep to resume it"
        else:
            state, detail = "not started", ""
        rows.append({"run": run.name, "state": state, "job_id": (job or {}).get("job_id", ""), "detail": detail})
    return rows


def render_status(rows: list[dict]) -> str:
    width = max(len(r["run"]) for r in rows)
    lines = [f"{'run':<{width}}  {'state':<11}  {'job':<10}  detail"]
    lines += [f"{r['run']:<{width}}  {r['state']:<11}  {r['job_id']:<10}  {r['detail']}".rstrip() for r in rows]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the CLI
def _cmd(args) -> int:
    import shlex

    if args.status:
        print(render_status(sweep_status(args.status)))
        return 0
    missing = [flag for flag, value in (("--config", args.config), ("--grid", args.grid), ("--out", args.out))
               if not value]
    if missing:
        raise UserError(f"sdtl sweep needs {', '.join(missing)} (or --status DIR to show a sweep's runs)")
    if args.wait and not args.slurm:
        raise UserError("--wait waits for Slurm jobs: use it with --slurm")
    run_sweep(args.config, args.grid, args.seeds, args.out, sets=args.overrides, dry_run=args.dry_run,
              parallel=args.parallel, extend=args.extend,
              command=shlex.join(["sdtl", *getattr(args, "argv", [])]), slurm=args.slurm, wait=args.wait)
    return 0


def register(sub) -> None:
    from sdtl.cli_options import add_set

    p = sub.add_parser("sweep", help="a grid over config keys x seeds (e.g. a lambda sweep), mean ± std table",
                       description="Run the product of the --grid values x seeds 0..N-1 as ordinary fine-tuning runs "
                                   "in OUT/runs/<point>/seed<k>. Re-running the same command skips finished runs and "
                                   "resumes unfinished ones. Writes sweep.json, sweep.md (mean ± std over seeds of the "
                                   "validation accuracy that selected each checkpoint and of its test accuracy; the "
                                   "best point on validation is marked) and sweep.png.",
                       epilog="example: sdtl sweep --config ucf101_r21d_sd --grid regularizer.weight=0.1,1,10,100,1000 "
                              "--seeds 3 --out sweeps/lambda --set data.root=/data/UCF101 "
                              "--set model.pretrained=/weights/model_best_r21d_200epoch.pth.tar")
    p.add_argument("--config", metavar="NAME_OR_PATH", help="fine-tuning recipe name or YAML file")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept config key and its values (repeatable: the sweep runs the product), "
                        "e.g. --grid regularizer.weight=0.1,1,10 --grid optim.lr=0.01,0.1; list values as [a,b]")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 per point (default 1)")
    p.add_argument("--out", metavar="DIR", help="sweep directory (new, or this sweep's to continue it)")
    add_set(p, "override a config key for every run, as in finetune (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    core.add_parallel_option(p)
    p.add_argument("--extend", action="store_true",
                   help="add values or seeds to the sweep already in --out (finished runs are reused)")
    p.add_argument("--slurm", action="store_true",
                   help="submit each point x seed as one job of a Slurm job array (slurm.array_parallelism at a "
                        "time; resources from the slurm config section); re-running submits only what is missing "
                        "or failed. Needs sdtl[slurm]")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the jobs, then write the summary")
    p.add_argument("--status", metavar="DIR", help="show each run of the sweep in DIR: done / running / queued / "
                                                   "failed (with the reason) / partial / not started; runs nothing")
    p.set_defaults(func=_cmd, resume_hint=core.RERUN_HINT)
