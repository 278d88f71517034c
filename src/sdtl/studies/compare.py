"""``sdtl compare``: self-distillation against the standard ways of keeping pre-trained knowledge.

On the embedded benchmark (the synthetic ``small`` set and the shipped pre-trained encoder, as
``sdtl demo --quick``), every method fine-tunes with the same data, augmentation, budget and seeds:

* ``scratch`` (random init) and ``plain`` fine-tuning — the two references;
* ``sd`` (the paper), ``fixed_teacher``, ``ema_sd``, ``l2sp``, ``delta``, ``bss`` — penalties;
* ``lp_ft`` and ``llrd`` — schedules that are not penalties (LP-FT, layer-wise lr decay).

Each method's own hyper-parameter is picked from a small grid fixed in :data:`METHODS` (fixed before
any accuracy was seen, by the penalty-scale rule of docs/compare.md) by the **mean validation** accuracy over seeds; test accuracy
is reported for the picked point only and never chooses. Then per seed the difference to plain
fine-tuning (same seed = same split, data order and initial encoder) with its 95% t-interval.

Every run is an ordinary fine-tuning run in ``OUT/runs/<method>/<point>/seed<k>``; re-running the
command reuses finished runs and resumes unfinished ones (a run made with other settings is refused).
Outputs: ``OUT/compare.{json,md,png}``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from sdtl.atomic import atomic_write_text
from sdtl.errors import UserError
from sdtl.studies.stats import describe_difference, paired_difference

log = logging.getLogger("sdtl.compare")

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


METHODS: dict[str, Method] = {
    "scratch": Method("from scratch", ("regularizer.weight=0",), pretrained=False),
    "plain": Method("plain fine-tuning", ("regularizer.weight=0",)),
    "sd": Method("self-distillation, previous-epoch teacher (paper)", ("regularizer.name=sd",),
                 "regularizer.weight", ("0.3", "1", "3")),
    "fixed_teacher": Method("distillation from the fixed pre-trained encoder", ("regularizer.name=fixed_teacher",),
                            "regularizer.weight", ("0.3", "1", "3")),
    "ema_sd": Method("self-distillation, EMA teacher (decay 0.9/step)",
                     ("regularizer.name=ema_sd", "regularizer.ema_decay=0.9"), "regularizer.weight", ("0.3", "1", "3")),
    "l2sp": Method("L2-SP", ("regularizer.name=l2sp",), "regularizer.weight", ("0.1", "1", "10")),
    "delta": Method("DELTA (channel attention)", ("regularizer.name=delta", "regularizer.attention_samples=64"),
                    "regularizer.weight", ("0.001", "0.003", "0.01")),
    "bss": Method("BSS (k=1)", ("regularizer.name=bss",), "regularizer.weight", ("0.1", "1", "10")),
    "lp_ft": Method("LP-FT (head alone first)", ("regularizer.weight=0",), "optim.lp_epochs", ("2", "4", "6")),
    "llrd": Method("layer-wise lr decay", ("regularizer.weight=0",), "optim.layer_decay", ("0.5", "0.65", "0.8")),
}


def _runs(out: Path, methods: list[str], seeds: int):
    from sdtl.studies.sweep import SweepRun

    runs = []
    for name in methods:
        m = METHODS[name]
        points = [{m.key: v} for v in m.values] if m.key else [{}]
        for point in points:
            tag = ",".join(f"{k}={v}" for k, v in point.items()) or "default"
            runs.extend((name, SweepRun(point, s, out / "runs" / name / tag / f"seed{s}", label=f"{name}/{tag}/seed{s}"))
                        for s in range(seeds))
    return runs


def _claim(out: Path) -> None:
    from sdtl.engine.runlock import LOCK_NAME

    if not (out / MARKER).exists() and out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise UserError(f"--out {out}: exists and holds no `sdtl compare`; choose a new --out directory")


def run_compare(out: str | Path | None = None, methods: list[str] | None = None, seeds: int = 3,
                lr: float = DEFAULT_LR, data_dir: str | None = None, command: str | None = None,
                sets: list[str] | None = None) -> dict:
    """Run (or finish) the comparison in ``out``; ``sets`` are extra ``--set`` overrides for every run."""
    from sdtl.studies.demo import QUICK, _ensure_data, _prepare_encoder
    from sdtl.engine import config as cfgmod
    from sdtl.engine.runlock import RunLock
    from sdtl.studies.sweep import execute

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods {','.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
    if "plain" not in methods:
        methods.insert(0, "plain")  # every difference is paired against plain fine-tuning
    if seeds < 2:
        raise UserError(f"--seeds {seeds}: need at least 2 seeds for a mean ± std and an interval (3 or more advised)")
    if not lr > 0:
        raise UserError(f"--lr {lr}: must be > 0")
    out = Path(out or DEFAULT_OUT).resolve()
    plan = QUICK
    _claim(out)
    t_start = time.perf_counter()
    with RunLock(out, "compare"):
        _claim(out)
        out.mkdir(parents=True, exist_ok=True)
        # wall time accumulates over the invocations that ran this comparison's runs
        earlier = json.loads((out / MARKER).read_text()).get("wall_time_s", {}) if (out / MARKER).exists() else {}
        atomic_write_text(out / MARKER, json.dumps({"status": "running", "command": command, "wall_time_s": earlier},
                                                   indent=2) + "\n")
        data = _ensure_data(out, plan, data_dir)
        encoder = _prepare_encoder(out, plan, data)
        base = [f"data.root={data}", f"eval.retention={encoder['retention_probe']}", f"optim.lr={lr:g}",
                *plan.finetune_overrides]
        runs = _runs(out, methods, seeds)
        cfgs, by_method = [], {}
        for name, run in runs:
            m = METHODS[name]
            run_sets = [*base, *m.sets, *([f"model.pretrained={encoder['path']}"] if m.pretrained else []), *(sets or [])]
            try:
                cfg = cfgmod.load_config(plan.finetune_recipe, [*run_sets, *run.overrides()], kind="finetune")
                cfgmod.validate_ranges(cfg)
            except UserError as exc:
                raise UserError(f"compare run {name}/{run.name}: {exc}") from None
            cfgs.append(cfg)
            by_method.setdefault(name, []).append(run)
        t0 = time.perf_counter()
        failed = execute([r for _, r in runs], cfgs, plan.finetune_recipe, [], out, parallel=1)
        summary = summarise(by_method, seeds, failed, out)
        summary.update(command=command, lr=lr, data=str(data), encoder=encoder, recipe=plan.finetune_recipe,
                       overrides=[*base, *(sets or [])],
                       wall_time_s={"finetune": earlier.get("finetune", 0.0) + time.perf_counter() - t0,
                                    "total": earlier.get("total", 0.0) + time.perf_counter() - t_start,
                                    "invocations": earlier.get("invocations", 1 if earlier else 0) + 1})
        atomic_write_text(out / "compare.md", render_markdown(summary))
        plot(summary, out / "compare.png")
        atomic_write_text(out / MARKER, json.dumps(summary, indent=2, default=str) + "\n")
    print(render_markdown(summary))
    return summary


def summarise(by_method: dict, seeds: int, failed: dict, out: Path) -> dict:
    from sdtl.studies.sweep import collect, is_finished

    def last(history, key):
        vals = [r[key] for r in history if isinstance(r.get(key), (int, float))]
        return vals[-1] if vals else float("nan")

    entries = {}
    for name, runs in by_method.items():
        m = METHODS[name]
        points = {}
        for run in runs:
            tag = ",".join(f"{k}={v}" for k, v in run.point.items()) or "default"
            p = points.setdefault(tag, {"point": run.point, "runs": 0, "failed": [], "seeds": [], "val": [],
                                        "test": [], "retention": [], "wall_s": 0.0})
            p["runs"] += 1
            if run.name in failed or not is_finished(run):
                p["failed"].append(failed.get(run.name, "not finished"))
                continue
            c = collect(run)
            p["seeds"].append(run.seed)
            p["val"].append(c["val"])
            p["test"].append(c["test"])
            p["retention"].append(last(c["history"], "retention_acc"))
            p["wall_s"] += sum(r.get("epoch_time_s", 0.0) for r in c["history"])
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


def _mean_std(values):
    from sdtl.studies.stats import mean_std

    return mean_std([v for v in values if not math.isnan(v)])


def _fmt(values, digits: int = 1) -> str:
    m, s = _mean_std(values)
    return "—" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


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
    from sdtl.studies.demo import _plt, _save

    plt = _plt()
    names = [n for n, e in summary["methods"].items() if e["selected"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    for i, name in enumerate(names):
        e = summary["methods"][name]
        p = e["points"][e["selected"]]
        m, s = _mean_std(p["test"])
        ax.bar(i, m, yerr=s, capsize=4, color="tab:gray" if name in ("scratch", "plain") else "tab:blue", alpha=0.8)
        ax.scatter([i] * len(p["test"]), p["test"], color="k", s=10, zorder=3)
    classes = 5  # the synthetic 'small' preset
    ax.axhline(100 / classes, color="r", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test video acc@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"each method at its validation-picked setting, {summary['seeds']} seeds (dots)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
