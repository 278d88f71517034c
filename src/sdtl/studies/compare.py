"""``sdtl compare``: self-distillation against the standard ways of keeping pre-trained knowledge.

On the embedded benchmark (the synthetic ``small`` set and the shipped pre-trained encoder, as
``sdtl demo --quick``), every method fine-tunes with the same data, augmentation, budget and seeds:

* ``scratch`` (random init) and ``plain`` fine-tuning — the two references;
* ``sd`` (the paper), ``fixed_teacher``, ``ema_sd``, ``l2sp``, ``delta``, ``bss`` — penalties: every
  regularizer of :data:`sdtl.regularizers.registry.REGULARIZERS`, over its ``weight_grid``;
* ``lp_ft`` and ``llrd`` — schedules that are not penalties (LP-FT, layer-wise lr decay).

Each method's own hyper-parameter is picked from a small grid fixed in :func:`method_table` (fixed before
any accuracy was seen, by the penalty-scale rule of docs/compare.md) by the **mean validation** accuracy over seeds; test accuracy
is reported for the picked point only and never chooses. Then per seed the difference to plain
fine-tuning (same seed = same split, data order and initial encoder) with its 95% t-interval.

Every run is an ordinary fine-tuning run in ``OUT/runs/<method>/<point>/seed<k>``; re-running the
command reuses finished runs and resumes unfinished ones (a run made with other settings is refused);
``--parallel N`` runs N at a time as child processes (:mod:`sdtl.studies.core`). Outputs: ``OUT/compare.{json,md,png}``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from sdtl.errors import UserError
from sdtl.regularizers.registry import REGULARIZERS
from sdtl.studies import core, plots
from sdtl.studies.stats import describe_difference, paired_difference
from sdtl.studies.synthetic_bench import QUICK, ensure_data, prepare_encoder

DEFAULT_OUT = "sdtl-compare"
MARKER = "compare.json"
# The learning rate at which `sdtl demo --lr-grid` measured plain fine-tuning forgetting (pretext
# skill kept 63% vs 82% at the recipe's 0.001) while every method still trained stably: a comparison
# of ways to keep pre-trained knowledge needs a regime where there is something to keep.
DEFAULT_LR = 0.01


@dataclass(frozen=True)
class Method:
    label: str
    sets: tuple[str, ...]  # overrides of the benchmark's recipe
    key: str | None = None  # the method's own hyper-parameter, picked on validation
    values: tuple[str, ...] = ()
    pretrained: bool = True


#: the comparison's own choices for some regularizers: a shorter table label than the registry's help
#: line, and fixed options (docs/compare.md); every other registered regularizer joins with its help line
LABELS = {"sd": "self-distillation, previous-epoch teacher (paper)",
          "ema_sd": "self-distillation, EMA teacher (decay 0.9/step)",
          "l2sp": "L2-SP", "delta": "DELTA (channel attention)", "bss": "BSS (k=1)"}
FIXED = {"ema_sd": ("regularizer.ema_decay=0.9",), "delta": ("regularizer.attention_samples=64",)}


def method_table() -> dict[str, Method]:
    """The methods a comparison can run, in table order (read from the registry at each call, so a
    regularizer registered later is one of them)."""
    return {
        "scratch": Method("from scratch", ("regularizer.weight=0",), pretrained=False),
        "plain": Method("plain fine-tuning", ("regularizer.weight=0",)),
        # every registered regularizer, over the weights its RegSpec says a comparison tries
        **{name: Method(LABELS.get(name, spec.help), (f"regularizer.name={name}", *FIXED.get(name, ())),
                        "regularizer.weight", spec.weight_grid) for name, spec in REGULARIZERS.items()},
        "lp_ft": Method("LP-FT (head alone first)", ("regularizer.weight=0",), "optim.lp_epochs", ("2", "4", "6")),
        "llrd": Method("layer-wise lr decay", ("regularizer.weight=0",), "optim.layer_decay", ("0.5", "0.65", "0.8")),
    }


def _tag(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "default"


def _runs(out: Path, methods: list[str], seeds: int, recipe: str, base: list[str], encoder: dict,
          sets: list[str]) -> list[core.RunSpec]:
    """Every run, method by method, grid value by value, seed by seed (the order they run in)."""
    runs, table = [], method_table()
    for name in methods:
        m = table[name]
        run_sets = [*base, *m.sets, *([f"model.pretrained={encoder['path']}"] if m.pretrained else []), *sets]
        for point in ([{m.key: v} for v in m.values] if m.key else [{}]):
            tag = _tag(point)
            runs.extend(core.RunSpec(f"{name}/{tag}/seed{s}", out / "runs" / name / tag / f"seed{s}", recipe,
                                     [*run_sets, *(f"{k}={v}" for k, v in point.items()), f"run.seed={s}"],
                                     seed=s, method=name, point=point)
                        for s in range(seeds))
    return runs


def claim(out: Path) -> dict | None:
    """May ``out`` hold a comparison? Its compare.json (None: a new or empty folder)."""
    return core.claim_out(out, "compare", MARKER)


def run_compare(out: str | Path | None = None, methods: list[str] | None = None, seeds: int = 3,
                lr: float = DEFAULT_LR, data_dir: str | None = None, command: str | None = None,
                sets: list[str] | None = None, parallel: int = 1) -> dict:
    """Run (or finish) the comparison in ``out``; ``sets`` are extra ``--set`` overrides for every run."""
    table = method_table()
    methods = list(methods or table)
    unknown = [m for m in methods if m not in table]
    if unknown:
        raise UserError(f"--methods {','.join(unknown)}: unknown; choose from {', '.join(table)}")
    if "plain" not in methods:
        methods.insert(0, "plain")  # every difference is paired against plain fine-tuning
    if seeds < 2:
        raise UserError(f"--seeds {seeds}: need at least 2 seeds for a mean ± std and an interval (3 or more advised)")
    if not lr > 0:
        raise UserError(f"--lr {lr}: must be > 0")
    out = Path(out or DEFAULT_OUT).resolve()
    plan = QUICK
    executor = core.make_executor("compare", parallel, out)
    t_start = time.perf_counter()
    with core.study_folder(out, "compare", lambda: claim(out)) as marker:
        out.mkdir(parents=True, exist_ok=True)
        # wall time accumulates over the invocations that ran this comparison's runs
        earlier = (marker or {}).get("wall_time_s", {})
        core.write_json(out / MARKER, {"status": "running", "command": command, "wall_time_s": earlier})
        data = ensure_data(out, plan, data_dir)
        encoder = prepare_encoder(out, plan, data, "this comparison")
        base = [f"data.root={data}", f"eval.retention={encoder['retention_probe']}", f"optim.lr={lr:g}",
                *plan.finetune_overrides]
        runs = _runs(out, methods, seeds, plan.finetune_recipe, base, encoder, list(sets or []))
        cfgs = core.build_configs(runs, "compare")
        t0 = time.perf_counter()
        failed = core.run_all(runs, cfgs, executor, "compare")
        summary = summarise(runs, seeds, failed)
        summary.update(command=command, lr=lr, data=str(data), encoder=encoder, recipe=plan.finetune_recipe,
                       overrides=[*base, *(sets or [])], num_classes=core.num_classes_of(runs),
                       wall_time_s=core.accumulate_wall_time(earlier, {
                           "finetune": time.perf_counter() - t0, "total": time.perf_counter() - t_start}))
        core.write_text(out / "compare.md", render_markdown(summary))
        plot(summary, out / "compare.png")
        core.write_json(out / MARKER, summary)
    print(render_markdown(summary))
    return summary


SUMMARY_METRICS = {"val": lambda c: c["val"], "test": lambda c: c["test"],
                   "retention": lambda c: core.final(c["history"], "retention_acc"),
                   "seconds": lambda c: c["seconds"]}


def summarise(runs: list[core.RunSpec], seeds: int, failed: dict) -> dict:
    by = (lambda r: (r.method, _tag(r.point)))
    rows = core.summarise(runs, SUMMARY_METRICS, by=by, failed=failed)
    entries, table = {}, method_table()
    for name in dict.fromkeys(r.method for r in runs):
        m = table[name]
        points = {}
        for (method, tag), group in core.group_runs(runs, by).items():
            if method != name:
                continue
            row = rows[(method, tag)]
            points[tag] = {"point": group[0].point, "runs": row["runs"], "failed": list(row["failed"].values()),
                           "seeds": row["seeds"], "val": row["val"]["values"], "test": row["test"]["values"],
                           "retention": row["retention"]["values"], "wall_s": sum(row["seconds"]["values"])}
        eligible = [t for t, p in points.items()
                    if not p["failed"] and p["val"] and not any(math.isnan(v) for v in p["val"])]
        # highest mean validation accuracy; ties: the first value listed (the smaller / gentler one)
        chosen = max(eligible, key=lambda t: (sum(points[t]["val"]) / len(points[t]["val"]),
                                              -list(points).index(t))) if eligible else None
        entries[name] = {"label": m.label, "key": m.key, "grid": list(m.values), "points": points,
                         "selected": chosen}
    plain = entries["plain"]["points"][entries["plain"]["selected"]] if entries["plain"]["selected"] else None
    for name, e in entries.items():
        sel = e["points"].get(e["selected"]) if e["selected"] else None
        if sel is None or plain is None or name == "plain":
            e["vs_plain"] = None
            continue
        common = sorted(set(sel["seeds"]) & set(plain["seeds"]))
        a = [sel["test"][sel["seeds"].index(s)] for s in common]
        b = [plain["test"][plain["seeds"].index(s)] for s in common]
        e["vs_plain"] = paired_difference(a, b, common) if len(common) >= 2 else None
    return {"seeds": seeds, "methods": entries,
            "selection": "per method, the grid value with the highest mean validation video acc@1 over seeds "
                         "(ties: the first listed); test reported for that value only"}


def _fmt(values, digits: int = 1) -> str:
    return core.fmt(core.stat(values, drop_nan=True), digits)


def render_markdown(summary: dict) -> str:
    lines = [f"# sdtl compare: {len(summary['methods'])} methods × {summary['seeds']} seeds (SGD lr {summary.get('lr', '?')})",
             "", f"`{summary.get('command') or 'sdtl compare'}`", "",
             "Test video acc@1 (mean ± std over seeds) at each method's hyper-parameter picked on **validation**; "
             "Δ vs plain: paired per seed, mean [95% CI]. *kept*: accuracy of the frozen pretext head on "
             "pre-training clips after fine-tuning (the pre-trained skill kept, %).", "",
             "| method | picked on val | val acc@1 | test acc@1 | Δ vs plain [95% CI] | kept | grid (val mean) |",
             "|---|---|---|---|---|---|---|"]
    for name, e in summary["methods"].items():
        sel = e["points"].get(e["selected"]) if e["selected"] else None
        grid = "; ".join(f"{t.split('=')[-1]}: {_fmt(p['val'])}" + (" ✗" if p["failed"] else "")
                         for t, p in e["points"].items()) if e["key"] else ""
        if sel is None:
            lines.append(f"| {e['label']} | all points failed | — | — | — | — | {grid} |")
            continue
        d = e["vs_plain"]
        delta = (f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d else "")
        picked = f"{e['key']}={e['selected'].split('=')[-1]}" if e["key"] else "—"
        lines.append(f"| {e['label']} | {picked} | {_fmt(sel['val'])} | {_fmt(sel['test'])} | {delta} | "
                     f"{_fmt(sel['retention'])} | {grid} |")
    lines.append("")
    for name, e in summary["methods"].items():
        if e.get("vs_plain"):
            lines.append("- " + describe_difference(e["vs_plain"], f"{e['label']} − plain (test video acc@1)"))
    failed = [(name, t, f) for name, e in summary["methods"].items() for t, p in e["points"].items() for f in p["failed"]]
    if failed:
        lines += ["", "✗ runs that failed (points with a failed seed are not eligible):", ""]
        lines += [f"- {name} {t}: {f}" for name, t, f in failed]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    plt = plots.pyplot()
    names = [n for n, e in summary["methods"].items() if e["selected"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    for i, name in enumerate(names):
        e = summary["methods"][name]
        p = e["points"][e["selected"]]
        s = core.stat(p["test"], drop_nan=True)
        ax.bar(i, s["mean"], yerr=s["std"], capsize=4, color="tab:gray" if name in ("scratch", "plain") else "tab:blue",
               alpha=0.8)
        ax.scatter([i] * len(p["test"]), p["test"], color="k", s=10, zorder=3)
    plots.chance_line(ax, summary.get("num_classes"), color="r")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test video acc@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"each method at its validation-picked setting, {summary['seeds']} seeds (dots)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plots.save(fig, path)


# --------------------------------------------------------------------------------------- the CLI
def _cmd(args) -> int:
    import shlex

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    run_compare(args.out, methods=methods, seeds=args.seeds, lr=args.lr, data_dir=args.data,
                command=shlex.join(["sdtl", *getattr(args, "argv", [])]), sets=args.overrides,
                parallel=args.parallel)
    return 0


def register(sub) -> None:
    from sdtl.cli_options import add_set

    p = sub.add_parser("compare", help="self-distillation vs L2-SP, DELTA, BSS, LP-FT, ... on the embedded benchmark",
                       description="Fine-tune the shipped pre-trained encoder on the embedded synthetic benchmark with "
                                   "each method (scratch, plain, sd, fixed_teacher, ema_sd, l2sp, delta, bss, lp_ft, "
                                   "llrd), each method's own hyper-parameter picked from a small fixed grid on "
                                   "validation, over seeds; writes compare.md/json/png with test accuracy at the "
                                   "picked setting and paired differences to plain fine-tuning (95%% CI). About 35 "
                                   "min on 2 CPU cores for all methods and 3 seeds. Re-running the same command "
                                   "reuses finished runs and resumes an interrupted one.",
                       epilog="example: sdtl compare --methods sd,l2sp,lp_ft --seeds 3 --out sdtl-compare")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default sdtl-compare)")
    p.add_argument("--methods", default=None, metavar="A,B,...",
                   help="comma-separated subset (default: all; plain is always included as the reference)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every method and grid value (default 3)")
    p.add_argument("--lr", type=float, default=0.01,
                   help="SGD learning rate for every method (default 0.01: where plain fine-tuning forgets, see docs/compare.md)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="reuse a dataset written by `sdtl synth --preset small` (default: generate into OUT/data)")
    add_set(p, "override a key of the benchmark recipe (synthetic_small) for every run, e.g. --set optim.epochs=6")
    core.add_parallel_option(p)
    p.set_defaults(func=_cmd, resume_hint=core.RERUN_HINT)
