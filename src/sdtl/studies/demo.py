"""``sdtl demo``: the paper's story on a laptop, on the embedded synthetic dataset.

Three plans, each an ordinary set of sdtl runs in its own folder (so any run can be inspected,
evaluated or resumed on its own):

* ``--quick`` (default out ``sdtl-demo-quick``): writes the labelled videos and a few pool videos,
  starts from the **shipped pre-trained encoder** (:mod:`sdtl.assets`, as real users start from
  released weights), and fine-tunes scratch / plain / self-distillation for 3 seeds.
* full (default out ``sdtl-demo``): writes the whole dataset, **pre-trains its own encoder** on the
  unlabelled pool (the recipe that made the shipped one), compares it with the shipped one, and
  fine-tunes the three methods for 5 seeds.
* ``--lr-grid`` (default out ``sdtl-lr-grid``): the regime study behind the demo's settings — scratch,
  plain and self-distillation (λ ∈ {1, 10, 100}) over a range of SGD learning rates and seeds, and the
  selection rule of docs/demo_regime.md applied on *validation* accuracy.

Every fine-tuning run also records, per epoch, the forgetting diagnostics (feature drift from the
pre-trained encoder, accuracy of the frozen pretext head = retention of the pre-trained skill).
``OUT/summary.{md,json,png}`` and ``OUT/forgetting.png`` (or ``lr_grid.*``) hold the results: mean ±
std over seeds, and paired per-seed differences with 95% t-intervals.

Re-running a plan on the same OUT reuses finished runs (and says so) and resumes unfinished ones —
but only runs whose effective config equals what this invocation would run; anything else is
refused, never mixed into the summary and never overwritten. The wall time adds up over the
invocations. ``--seeds`` may grow a folder's seeds (the new ones are run), never shrink them.
``--parallel N`` runs N fine-tunes at a time as child processes (:mod:`sdtl.studies.core`).
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path

from sdtl.errors import RunFailed, UserError
from sdtl.studies import core, plots
from sdtl.studies.stats import describe_difference, paired_difference
from sdtl.studies.synthetic_bench import QUICK, DemoPlan, ensure_data, prepare_encoder

log = logging.getLogger("sdtl.demo")

__all__ = ["FULL", "LR_GRID", "QUICK", "DemoPlan", "register", "run_demo"]

FULL = DemoPlan(name="full", preset="small", seeds=5, pretrain=True, pool_videos=None,
                pretrain_recipe="synthetic_pretrain", finetune_recipe="synthetic_small")
LR_GRID = DemoPlan(name="lr-grid", preset="small", seeds=3, pretrain=False, pool_videos=48,
                   pretrain_recipe="synthetic_pretrain", finetune_recipe="synthetic_small",
                   finetune_overrides=("eval.num_clips=5",),
                   lrs=(0.001, 0.003, 0.01, 0.03, 0.1), weights=(1.0, 10.0, 100.0))
PLANS = {p.name: p for p in (QUICK, FULL, LR_GRID)}
DEFAULT_OUT = {"quick": "sdtl-demo-quick", "full": "sdtl-demo", "lr-grid": "sdtl-lr-grid"}

METHODS = {
    "scratch": "from scratch (random init, λ=0)",
    "plain": "pre-trained, plain fine-tuning (λ=0)",
    "sd": "pre-trained + self-distillation (λ={w:g})",
}
SHORT = {"scratch": "scratch", "plain": "plain", "sd": "SD λ={w:g}"}
PRETEXT_CLASSES = 4  # playback speeds of the pretext task: its frozen head's chance is 25%

MARKER = "demo.json"
# Everything the demo writes at the top of its OUT (folders and files).
DEMO_NAMES = frozenset({MARKER, "data", "pretrained", "pretrain", "runs", "logs", "summary.json", "summary.md",
                        "summary.png", "forgetting.png", "lr_grid.json", "lr_grid.md", "lr_grid.png"})


# ------------------------------------------------------------------------------------ the folder
def _plan_identity(plan: DemoPlan) -> dict:
    """What must match for runs in an OUT to be reused (the number of seeds may grow, see :func:`_seeds_for`)."""
    return {k: v for k, v in asdict(plan).items() if k != "seeds"}


def _same_plan(plan: DemoPlan):
    def check(out: Path, old: dict, new: dict, extend: bool) -> None:
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(f"--out {out}: holds a `sdtl demo` of plan {old.get('name', '?')!r} with other settings "
                            f"({', '.join(diff)}); this is plan {plan.name!r}. Nothing was changed: choose another "
                            f"--out (the default for this plan is {DEFAULT_OUT.get(plan.name, '?')})")
    return check


def claim(out: Path, plan: DemoPlan, force: bool = False) -> dict | None:
    """May ``out`` hold this plan? Its demo.json (None: new or empty, or ``force`` on a foreign folder)."""
    return core.claim_out(out, "demo", MARKER, _plan_identity(plan), check=_same_plan(plan), force=force,
                          writes=DEMO_NAMES)


def _summary_of(out: Path, plan: DemoPlan) -> dict | None:
    path = out / ("lr_grid.json" if plan.name == "lr-grid" else "summary.json")
    return json.loads(path.read_text()) if path.exists() else None


def _recorded_seeds(out: Path, plan: DemoPlan, marker: dict | None) -> int:
    """How many seeds the folder's summary covers (0: none yet); older folders: from the summary itself."""
    if marker and marker.get("seeds"):
        return int(marker["seeds"])
    summary = _summary_of(out, plan) if marker else None
    if not summary:
        return 0
    if "points" in summary:
        return len({s for p in summary["points"] for s in p.get("seeds", [])})
    return len(summary.get("seeds") or [])


def _seeds_for(out: Path, plan: DemoPlan, seeds: int | None, marker: dict | None) -> int:
    """The seeds this invocation summarises: never fewer than the folder's summary already has."""
    recorded = _recorded_seeds(out, plan, marker)
    if seeds is None:
        return max(plan.seeds, recorded)
    if seeds < recorded:
        raise UserError(f"--seeds {seeds}: {out} already holds a {recorded}-seed demo summary; fewer seeds would "
                        f"replace it with a smaller one. Nothing was changed: pass --seeds {recorded} or more "
                        f"(or leave --seeds out) to reuse its runs, or choose another --out")
    return seeds


def _say_seeds(out: Path, plan: DemoPlan, seeds: int | None, recorded: int, n_seeds: int) -> None:
    if recorded and n_seeds > recorded:
        log.info("demo: extending the %d-seed demo in %s to %d seeds (its finished runs are reused)",
                 recorded, out, n_seeds)
    elif recorded and seeds is None and n_seeds > plan.seeds:
        log.info("demo: %s holds a %d-seed summary: keeping all %d seeds (--seeds N to add more)",
                 out, recorded, n_seeds)


def _earlier_wall_time(out: Path, plan: DemoPlan, marker: dict | None) -> dict:
    """The wall time of the earlier invocations on this folder (older folders: their summary's)."""
    if not marker:
        return {}
    if "wall_time_s" in marker:
        return marker["wall_time_s"] or {}
    return (_summary_of(out, plan) or {}).get("wall_time_s") or {}


def _write_marker(out: Path, plan: DemoPlan, seeds: int, wall_time: dict) -> None:
    core.write_json(out / MARKER, {"plan": plan.name, "identity": _plan_identity(plan), "seeds": seeds,
                                   "wall_time_s": wall_time})


# ------------------------------------------------------------------------------------ fine-tuning
def _label(method: str, weight: float) -> str:
    return METHODS[method].format(w=weight)


def run_specs(plan: DemoPlan, n_seeds: int, out: Path, data: Path, encoder: dict) -> list[core.RunSpec]:
    """The plan's fine-tuning runs, seed by seed, in the order they run in this process."""
    coords = []
    for seed in range(n_seeds):
        if plan.name == "lr-grid":
            for lr in plan.lrs:
                coords.append((f"scratch_lr{lr:g}_s{seed}", "scratch", seed, 0.0, lr))
                coords.append((f"plain_lr{lr:g}_s{seed}", "plain", seed, 0.0, lr))
                for w in plan.weights:
                    coords.append((f"sd{w:g}_lr{lr:g}_s{seed}", "sd", seed, w, lr))
        else:
            for method in METHODS:
                coords.append((f"{method}_s{seed}", method, seed, plan.sd_weight if method == "sd" else 0.0, None))
    specs = []
    for name, method, seed, weight, lr in coords:
        sets = [f"data.root={data}", f"run.seed={seed}", f"regularizer.weight={weight:g}",
                f"eval.retention={encoder['retention_probe']}", *plan.finetune_overrides]
        if method != "scratch":
            sets.append(f"model.pretrained={encoder['path']}")
        if lr is not None:
            sets.append(f"optim.lr={lr:g}")
        specs.append(core.RunSpec(name, out / "runs" / name, plan.finetune_recipe, sets, seed, method,
                                  {"weight": weight, "lr": lr},
                                  label=f"{_label(method, weight)}, seed {seed}" + (f", lr {lr:g}" if lr is not None else "")))
    return specs


# ------------------------------------------------------------------------------------- summaries
def _best_val(history: list[dict]) -> float:
    vals = [r["val_video_acc1"] for r in history if isinstance(r.get("val_video_acc1"), (int, float))]
    return max(vals) if vals else float("nan")


def _result(key: str):
    return lambda c: c["results"][key]


def _last(key: str):
    return lambda c: core.final(c["history"], key)


METRICS = {
    "video_acc1": _result("video_acc1"), "video_acc5": _result("video_acc5"), "clip_acc1": _result("clip_acc1"),
    "mean_class_acc": _result("mean_class_acc"),
    "last_video_acc1": lambda c: c["results"]["last"]["video_acc1"],
    "val_video_acc1": lambda c: _best_val(c["history"]),
    "selected_epoch": lambda c: c["results"]["selected"]["epoch"],
    "feat_drift": _last("feat_drift"), "feat_cka": _last("feat_cka"), "retention_acc": _last("retention_acc"),
    "retention_acc_initial": lambda c: c["history"][0].get("retention_acc", float("nan")),
    "seconds": lambda c: c["seconds"],
}


def _method_entry(label: str, row: dict) -> dict:
    entry = {"label": label, "runs": row["finished"], "seeds": row["seeds"]}
    for key in ("video_acc1", "video_acc5", "clip_acc1", "mean_class_acc", "last_video_acc1", "val_video_acc1"):
        entry[key] = row[key]
    entry["selected_epochs"] = row["selected_epoch"]["values"]
    entry["forgetting"] = {k: row[k] for k in ("feat_drift", "feat_cka", "retention_acc", "retention_acc_initial")}
    entry["wall_s"] = sum(row["seconds"]["values"])  # the runs' own epochs and final tests
    return entry


def summarise(runs: list[core.RunSpec], plan: DemoPlan, data: Path, encoder: dict, timings: dict) -> dict:
    import torch

    rows = core.summarise(runs, METRICS, by=lambda r: r.method)
    methods = {m: _method_entry(_label(m, plan.sd_weight), rows[m]) for m in METHODS if m in rows}
    seeds = sorted({r.seed for r in runs})

    def paired(a: str, b: str) -> dict:
        va = dict(zip(rows[a]["seeds"], rows[a]["video_acc1"]["values"])) if a in rows else {}
        vb = dict(zip(rows[b]["seeds"], rows[b]["video_acc1"]["values"])) if b in rows else {}
        common = sorted(set(va) & set(vb))
        return paired_difference([va[s] for s in common], [vb[s] for s in common], common)

    meta = json.loads((data / "meta.json").read_text())
    any_run = core.collect(runs[0])["results"]
    sd = next((r for r in runs if r.method == "sd"), None)
    return {
        "plan": plan.name, "quick": plan.name == "quick", "methods": methods, "seeds": seeds,
        "comparisons": {"sd_vs_plain": paired("sd", "plain"), "plain_vs_scratch": paired("plain", "scratch"),
                        "sd_vs_scratch": paired("sd", "scratch")},
        "protocol": any_run["protocol"],
        "dataset": {"root": str(data), "preset": meta["preset"]["name"], "classes": len(meta["classes"]),
                    "chance": 100.0 / len(meta["classes"]),
                    "counts": {"train_list": meta["counts"]["train"], "test": meta["counts"]["test"],
                               "train": any_run.get("num_train_videos"), "val": any_run.get("num_val_videos")}},
        "encoder": encoder,
        "pretrain_recipe": plan.pretrain_recipe, "finetune_recipe": plan.finetune_recipe,
        "overrides": {"pretrain": list(plan.pretrain_overrides), "finetune": list(plan.finetune_overrides)},
        "sd_weight": plan.sd_weight, "regularizer": core.collect(sd)["results"]["regularizer"] if sd else None,
        "wall_time_s": timings,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }


def render_table(summary: dict) -> str:
    fmt = core.fmt
    lines = ["| method | video Acc@1 (%) | clip Acc@1 (%) | val Acc@1 (%) | feature drift | pretext skill kept (%) |",
             "|---|---|---|---|---|---|"]
    for m in summary["methods"].values():
        f = m["forgetting"]
        lines.append(f"| {m['label']} | {fmt(m['video_acc1'])} | {fmt(m['clip_acc1'])} | "
                     f"{fmt(m['val_video_acc1'])} | {fmt(f['feat_drift'], 2)} | {fmt(f['retention_acc'])} |")
    return "\n".join(lines)


def effect_sentences(summary: dict) -> list[str]:
    c = summary["comparisons"]
    return [describe_difference(c["plain_vs_scratch"], "Pre-training (plain − scratch, video Acc@1)"),
            describe_difference(c["sd_vs_plain"], f"Self-distillation (SD λ={summary['sd_weight']:g} − plain, "
                                                  f"video Acc@1)")]


def _wall_time_note(t: dict, reused: int | None) -> str:
    """What the wall time covers when the folder was filled by more than one invocation."""
    parts = []
    if t.get("invocations", 1) > 1:
        parts.append(f"summed over the {t['invocations']} invocations that filled this folder")
    if reused:
        parts.append(f"this one reused {reused} finished run(s)")
    return f" ({'; '.join(parts)})" if parts else ""


def render_markdown(summary: dict) -> str:
    p, t, enc, ds = summary["protocol"], summary["wall_time_s"], summary["encoder"], summary["dataset"]
    n = len(summary["seeds"])
    enc_line = (f"Encoder: the shipped demo encoder (sha256 {enc['sha256'][:12]}…, pretext accuracy "
                f"{enc['pretext_train_acc']:.1f}% at the end of its pre-training)." if enc["source"] == "shipped" else
                f"Encoder: pre-trained here ({summary['pretrain_recipe']}), pretext accuracy "
                f"{enc['pretext_train_acc']:.1f}% at its last epoch; " + (
                    f"on the retention probe it scores {enc['retention_acc']:.1f}% vs "
                    f"{enc['shipped_retention_acc']:.1f}% for the shipped encoder."
                    if "shipped_retention_acc" in enc and "retention_acc" in enc else
                    f"not compared with the shipped encoder ({enc.get('shipped_comparison', 'see the log')})."))
    return "\n".join([
        f"# sdtl demo ({summary['plan']}): scratch vs pre-trained vs self-distillation",
        "",
        f"Synthetic dataset `{ds['preset']}` ({ds['classes']} tempo classes, chance {ds['chance']:.0f}%; "
        f"{ds['counts']['train']} training / {ds['counts']['val']} validation / {ds['counts']['test']} test videos), "
        f"{n} seeds ({', '.join(map(str, summary['seeds']))}); mean ± std over seeds.",
        "",
        *effect_sentences(summary),
        "",
        render_table(summary),
        "",
        "Feature drift: ‖f_t − f_0‖² / ‖f_0‖² on fixed probe clips at the last epoch (0 = the pre-trained features). "
        "Pretext skill kept: accuracy of the frozen playback-speed head on pool clips at the last epoch "
        f"(chance 25%; at the start {core.fmt(summary['methods']['plain']['forgetting']['retention_acc_initial'])}).",
        "",
        f"Protocol: {p['views']} clips × {p['crops']} crop(s) per test video ({p['crop']}; {p['clip']}), "
        f"{p['aggregation']}; {p['split']}. Checkpoint: selected by {p['selected_by']}.",
        f"Recipes: fine-tune `{summary['finetune_recipe']}` (overrides: {summary['overrides']['finetune']}); "
        f"self-distillation λ = {summary['sd_weight']:g} (reduction {summary['regularizer']['reduction']}, "
        f"teacher BN {summary['regularizer']['teacher_bn']}).",
        enc_line,
        f"Wall time: total {t['total_s'] / 60:.1f} min (data {t['data_s']:.0f} s, encoder {t['encoder_s']:.0f} s, "
        f"fine-tuning {t['finetune_s']:.0f} s){_wall_time_note(t, summary.get('reused_runs'))} on "
        f"{summary['machine']['platform']}, torch {summary['machine']['torch']}, "
        f"{summary['machine']['threads']} threads.",
        "",
        "Per-run results: `runs/<method>_s<seed>/results.json`; curves: `runs/*/curves.png`; "
        "plots: `summary.png`, `forgetting.png`.",
        "",
    ])


# ----------------------------------------------------------------------------------------- plots
def plot_summary(summary: dict, path: Path) -> None:
    plt = plots.pyplot()
    methods = list(summary["methods"].items())
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (key, m) in enumerate(methods):
        vals = m["video_acc1"]["values"]
        ax.bar(i, m["video_acc1"]["mean"], yerr=m["video_acc1"]["std"], capsize=6, alpha=0.6, color=f"C{i}")
        ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
        ax.annotate(f"{m['video_acc1']['mean']:.1f}", (i, m["video_acc1"]["mean"]), textcoords="offset points",
                    xytext=(14, 3), fontsize=8)
    plots.chance_line(ax, summary["dataset"]["classes"])
    ax.set_xticks(range(len(methods)), [SHORT[k].format(w=summary["sd_weight"]) for k, _ in methods])
    ax.set_ylim(0, 100)
    ax.set_ylabel("test video Acc@1 (%)")
    ax.set_title(f"{summary['plan']} demo: {len(summary['seeds'])} seeds (bars: mean ± std, dots: seeds)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plots.save(fig, path)


def plot_forgetting(records: list[dict], summary: dict, path: Path) -> None:
    """Per method: feature drift from the pre-trained encoder and pretext skill kept, vs epoch."""
    import numpy as np

    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for i, method in enumerate(summary["methods"]):
        rs = [r for r in records if r["spec"].method == method]
        for ax, key in zip(axes, ("feat_drift", "retention_acc")):
            series = [[row.get(key, np.nan) for row in r["history"]] for r in rs]
            length = min(len(s) for s in series)
            arr = np.array([s[:length] for s in series], dtype=float)
            epochs = [row["epoch"] for row in rs[0]["history"][:length]]
            mean, std = np.nanmean(arr, 0), (np.nanstd(arr, 0, ddof=1) if len(arr) > 1 else np.zeros(length))
            ax.plot(epochs, mean, color=f"C{i}", marker="o", ms=2.5, label=SHORT[method].format(w=summary["sd_weight"]))
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    axes[0].set_title("feature drift from the pre-trained encoder", fontsize=9)
    axes[0].set_ylabel(r"feature drift $\Vert f_t - f_0 \Vert^2 / \Vert f_0 \Vert^2$")
    axes[1].set_title("pre-trained skill kept: frozen pretext head accuracy", fontsize=9)
    axes[1].set_ylabel("playback-speed accuracy (%)")
    plots.chance_line(axes[1], PRETEXT_CLASSES)
    axes[1].set_ylim(0, 100)
    for ax in axes:
        ax.set_xlabel("epoch (0 = start of fine-tuning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"forgetting, mean ± std over {len(summary['seeds'])} seeds (scratch: drift from its random init)",
                 fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


# --------------------------------------------------------------------------------------- lr grid
GRID_METRICS = {"val_video_acc1": METRICS["val_video_acc1"], "video_acc1": METRICS["video_acc1"],
                "retention_acc": METRICS["retention_acc"], "feat_drift": METRICS["feat_drift"]}


def summarise_grid(runs: list[core.RunSpec], plan: DemoPlan, data: Path, encoder: dict, timings: dict) -> dict:
    """Every (method, λ, lr) point with mean ± std, and the selection rule applied on validation."""
    rows = core.summarise(runs, GRID_METRICS, by=lambda r: (r.method, r.point["weight"], r.point["lr"]))
    table = []
    for (method, weight, lr), row in sorted(rows.items(), key=lambda kv: (kv[0][0] != "scratch", kv[0][0] != "plain",
                                                                          kv[0][1], kv[0][2])):
        table.append({"method": method, "weight": weight, "lr": lr, "seeds": row["seeds"],
                      **{k: row[k] for k in GRID_METRICS}})

    def val(method, weight, lr):
        return next(p["val_video_acc1"]["mean"] for p in table if (p["method"], p["weight"], p["lr"]) == (method, weight, lr))

    # The rule (docs/demo_regime.md), on validation only: ties go to the smaller value.
    lr_star = max(plan.lrs, key=lambda lr: (val("plain", 0.0, lr), -lr))
    w_star = max(plan.weights, key=lambda w: (val("sd", w, lr_star), -w))
    return {"plan": plan.name, "points": table, "lrs": list(plan.lrs), "weights": list(plan.weights),
            "selection": {"rule": "lr = argmax mean validation video Acc@1 of plain fine-tuning; "
                                  "λ = argmax mean validation video Acc@1 of SD at that lr (ties: smaller)",
                          "lr": lr_star, "weight": w_star},
            "encoder": encoder, "finetune_recipe": plan.finetune_recipe,
            "overrides": list(plan.finetune_overrides), "dataset": str(data), "wall_time_s": timings}


def _grid_label(p: dict) -> str:
    return p["method"] if p["method"] != "sd" else f"SD λ={p['weight']:g}"


def render_grid_markdown(grid: dict) -> str:
    fmt = core.fmt
    sel = grid["selection"]
    lines = ["# sdtl demo --lr-grid: test accuracy vs fine-tuning learning rate", "",
             f"Rule (fixed before looking at test numbers): {sel['rule']}. Selected: lr = {sel['lr']:g}, "
             f"λ = {sel['weight']:g}.", "",
             "| method | lr | val Acc@1 (%) | test video Acc@1 (%) | pretext skill kept (%) | feature drift |",
             "|---|---|---|---|---|---|"]
    for p in grid["points"]:
        mark = " **(selected)**" if (p["lr"] == sel["lr"] and (p["method"] == "plain" or
                                                               (p["method"] == "sd" and p["weight"] == sel["weight"]))) else ""
        lines.append(f"| {_grid_label(p)}{mark} | {p['lr']:g} | {fmt(p['val_video_acc1'])} | {fmt(p['video_acc1'])} | "
                     f"{fmt(p['retention_acc'])} | {fmt(p['feat_drift'], 2)} |")
    t = grid["wall_time_s"]
    lines += ["", f"Mean ± std over seeds {sorted({s for p in grid['points'] for s in p['seeds']})}; "
                  f"recipe `{grid['finetune_recipe']}` with {grid['overrides']}; wall time {t['total_s'] / 60:.1f} min"
                  f"{_wall_time_note(t, grid.get('reused_runs'))}.", ""]
    return "\n".join(lines)


def plot_grid(grid: dict, path: Path) -> None:
    import numpy as np

    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    lines: dict[str, list[dict]] = {}
    for p in grid["points"]:
        lines.setdefault(_grid_label(p), []).append(p)
    for i, (label, ps) in enumerate(lines.items()):
        ps = sorted(ps, key=lambda p: p["lr"])
        lrs = [p["lr"] for p in ps]
        for ax, key in zip(axes, ("val_video_acc1", "video_acc1")):
            mean = np.array([p[key]["mean"] for p in ps])
            std = np.array([p[key]["std"] for p in ps])
            ax.plot(lrs, mean, marker="o", ms=3, color=f"C{i}", label=label)
            ax.fill_between(lrs, mean - std, mean + std, color=f"C{i}", alpha=0.15)
    for ax, title in zip(axes, ("validation video Acc@1 (selection)", "test video Acc@1")):
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning learning rate (SGD, momentum 0.9)")
        ax.set_title(title, fontsize=9)
        ax.axvline(grid["selection"]["lr"], color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%) — mean ± std over seeds")
    axes[0].set_ylim(0, 100)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    plots.save(fig, path)


# ------------------------------------------------------------------------------------------ entry
def run_demo(out: str | Path | None = None, quick: bool = False, seeds: int | None = None,
             data_dir: str | None = None, force: bool = False, plan: DemoPlan | None = None,
             lr_grid: bool = False, parallel: int = 1) -> dict:
    plan = plan or (LR_GRID if lr_grid else QUICK if quick else FULL)
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds {seeds}: need at least 1 seed (mean ± std and intervals need 2 or more)")
    out = Path(out if out is not None else DEFAULT_OUT.get(plan.name, f"sdtl-demo-{plan.name}")).resolve()
    from sdtl.engine import config as cfgmod

    # Validate the recipes before anything is written.
    cfgmod.load_config(plan.pretrain_recipe, list(plan.pretrain_overrides), kind="pretrain")
    cfgmod.load_config(plan.finetune_recipe, list(plan.finetune_overrides), kind="finetune")
    executor = core.make_executor("demo", parallel, out)

    def claim_and_seeds():  # both refuse before a lock file is written (and again under the lock)
        marker = claim(out, plan, force)
        return marker, _seeds_for(out, plan, seeds, marker)

    with core.study_folder(out, "demo", claim_and_seeds) as (marker, n_seeds):
        recorded = _recorded_seeds(out, plan, marker)
        _say_seeds(out, plan, seeds, recorded, n_seeds)
        earlier = _earlier_wall_time(out, plan, marker)
        _write_marker(out, plan, recorded, earlier)
        return _run_plan(out, plan, n_seeds, data_dir, executor, earlier)


def _run_plan(out: Path, plan: DemoPlan, n_seeds: int, data_dir: str | None, executor: core.Executor,
              earlier: dict) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        data = ensure_data(out, plan, data_dir)
        timings["data_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        encoder = prepare_encoder(out, plan, data, "this demo")
        timings["encoder_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        specs = run_specs(plan, n_seeds, out, data, encoder)
        cfgs = core.build_configs(specs, "demo")
        reused = sum(s.finished for s in specs)
        failed = core.run_all(specs, cfgs, executor, "demo")
        timings["finetune_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        if failed:
            raise RunFailed(core.failures_message("demo", failed))
    except UserError:
        raise  # refused before anything ran: nothing to add to the wall time
    except BaseException:  # failed or interrupted: keep the time it spent for the next invocation's total
        now = {k: timings.get(k, 0.0) for k in ("data_s", "encoder_s", "finetune_s")}
        now["total_s"] = time.perf_counter() - t_start
        _write_marker(out, plan, _recorded_seeds(out, plan, core.read_marker(out, MARKER)),
                      core.accumulate_wall_time(earlier, now))
        raise
    timings = core.accumulate_wall_time(earlier, timings)

    if plan.name == "lr-grid":
        grid = summarise_grid(specs, plan, data, encoder, timings)
        grid["reused_runs"] = reused
        core.write_json(out / "lr_grid.json", grid)
        core.write_text(out / "lr_grid.md", render_grid_markdown(grid))
        plot_grid(grid, out / "lr_grid.png")
        _write_marker(out, plan, n_seeds, timings)
        print(render_grid_markdown(grid))
        print(f"wrote {out / 'lr_grid.md'}, {out / 'lr_grid.json'}, {out / 'lr_grid.png'}")
        return grid
    summary = summarise(specs, plan, data, encoder, timings)
    summary["reused_runs"] = reused
    core.write_json(out / "summary.json", summary)
    core.write_text(out / "summary.md", render_markdown(summary))
    plot_summary(summary, out / "summary.png")
    plot_forgetting([core.collect(s) for s in specs], summary, out / "forgetting.png")
    _write_marker(out, plan, n_seeds, timings)
    print(render_table(summary))
    print()
    print("\n".join(effect_sentences(summary)))
    print(f"\nwrote {out / 'summary.md'}, {out / 'summary.json'}, {out / 'summary.png'}, {out / 'forgetting.png'}")
    return summary


# --------------------------------------------------------------------------------------- the CLI
def _cmd(args) -> int:
    run_demo(args.out, quick=args.quick, seeds=args.seeds, data_dir=args.data, force=args.force,
             lr_grid=args.lr_grid, parallel=args.parallel)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="compare scratch / plain / self-distillation over seeds on the embedded "
                                    "synthetic dataset",
                       description="The paper's comparison on the embedded synthetic dataset: from scratch, "
                                   "plain fine-tuning and self-distillation from a pre-trained encoder, over "
                                   "seeds, with forgetting diagnostics and paired 95% intervals. --quick starts "
                                   "from the shipped pre-trained encoder (about 5 min on 2 cores); the full demo "
                                   "pre-trains its own (under 30 min); --lr-grid runs the learning-rate study "
                                   "behind the demo's settings. Re-running the same command on the same --out "
                                   "reuses finished runs and resumes an interrupted one.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 seeds from the shipped encoder (default out sdtl-demo-quick)")
    mode.add_argument("--lr-grid", action="store_true",
                      help="scratch / plain / SD (λ 1, 10, 100) over SGD lr 0.001-0.1 x 3 seeds, and the selection "
                           "rule on validation (default out sdtl-lr-grid)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: sdtl-demo, sdtl-demo-quick or sdtl-lr-grid by mode)")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (default: full 5, quick 3, lr-grid 3, or all the seeds --out already has); "
                        "more than --out has adds seeds, fewer is refused")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="reuse a synthetic dataset written by `sdtl synth --preset small` (default: generate into OUT/data)")
    p.add_argument("--force", action="store_true",
                   help="use a non-empty --out that is not a demo folder (its files are kept; refused if it already "
                        "holds a name the demo writes, e.g. summary.md or runs/)")
    core.add_parallel_option(p)
    p.set_defaults(func=_cmd, resume_hint=core.RERUN_HINT)
