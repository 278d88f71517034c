"""``sdtl demo``: the whole story of the paper on a laptop, on the embedded synthetic dataset.

1. ``sdtl synth`` writes the synthetic action videos (or ``--data`` reuses them);
2. ``sdtl pretrain`` learns an encoder on the unlabelled pool by playback-speed prediction (once);
3. for every seed, three fine-tunings on the small labelled set:
   *scratch* (random init, λ = 0), *plain* (pre-trained, λ = 0) and *self-distillation*
   (pre-trained, λ > 0, the paper's method);
4. ``OUT/summary.md`` + ``summary.json`` + ``summary.png``: video Acc@1 / Acc@5 as mean ± std per
   method, the seeds, the protocol, wall time.

Every step is an ordinary sdtl run in its own folder under OUT (``pretrain/``, ``runs/<method>_s<seed>``),
so any of them can be inspected, evaluated or resumed on its own. Re-running the demo on the same
OUT reuses finished runs and resumes unfinished ones; nothing finished is thrown away.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtl.engine import config as cfgmod
from sdtl.errors import UserError

log = logging.getLogger("sdtl.demo")


@dataclass(frozen=True)
class DemoPlan:
    preset: str
    seeds: int
    pretrain_recipe: str
    finetune_recipe: str
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    sd_weight: float = 100.0


# Budgets on 2 CPU cores: FULL <= 30 min, QUICK <= 5 min (issue #2).
FULL = DemoPlan(preset="small", seeds=5, pretrain_recipe="synthetic_pretrain",
                finetune_recipe="synthetic_small",
                finetune_overrides=("optim.epochs=40",))
QUICK = DemoPlan(preset="small", seeds=2, pretrain_recipe="synthetic_pretrain",
                 finetune_recipe="synthetic_small",
                 pretrain_overrides=("optim.epochs=2",),
                 finetune_overrides=("optim.epochs=6", "eval.num_clips=5", "eval.probe_videos=0"))

METHODS = {
    "scratch": "from scratch (random init, λ=0)",
    "plain": "pre-trained, plain fine-tuning (λ=0)",
    "sd": "pre-trained + self-distillation (λ={w:g})",
}


def _demo_marker(out: Path) -> Path:
    return out / "demo.json"


def run_demo(out: str | Path, quick: bool = False, seeds: int | None = None, data_dir: str | None = None,
             force: bool = False, plan: DemoPlan | None = None) -> dict:
    from sdtl.data.synthetic import generate_synthetic
    from sdtl.engine.finetune import run_finetune
    from sdtl.engine.pretrain import run_pretrain

    plan = plan or (QUICK if quick else FULL)
    n_seeds = seeds if seeds is not None else plan.seeds
    if n_seeds < 1:
        raise UserError(f"--seeds {n_seeds}: need at least 1 seed (mean ± std needs 2 or more)")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not _demo_marker(out).exists() and not force:
        raise UserError(f"--out {out}: exists and is not an sdtl demo folder; choose a new --out "
                        f"(or pass --force to use it anyway)")
    out.mkdir(parents=True, exist_ok=True)
    cfgmod.load_config(plan.pretrain_recipe, list(plan.pretrain_overrides), kind="pretrain")  # validate early
    (_demo_marker(out)).write_text(json.dumps({"quick": quick, "seeds": n_seeds, "plan": plan.__dict__}, indent=2))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. data
    t0 = time.perf_counter()
    if data_dir is None:
        data = out / "data"
        if not (data / "meta.json").exists():
            log.info("demo: generating the synthetic '%s' dataset in %s", plan.preset, data)
            generate_synthetic(data, preset=plan.preset, seed=0, force=data.exists())
    else:
        data = Path(data_dir)
        if not (data / "meta.json").exists():
            raise UserError(f"--data {data_dir}: not a folder written by `sdtl synth` (no meta.json); "
                            f"run `sdtl synth --out {data_dir}` first or leave --data out")
    timings["data_s"] = time.perf_counter() - t0

    # 2. pre-training (once)
    t0 = time.perf_counter()
    pre_dir = out / "pretrain"
    encoder = pre_dir / "checkpoints" / "encoder.pt"
    if not encoder.exists():
        cfg = cfgmod.load_config(plan.pretrain_recipe, [f"data.root={data}", *plan.pretrain_overrides],
                                 kind="pretrain")
        run_pretrain(cfg, pre_dir, resume="auto")
    timings["pretrain_s"] = time.perf_counter() - t0

    # 3. fine-tuning: methods x seeds
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    t0 = time.perf_counter()
    for seed in range(n_seeds):
        for method in METHODS:
            run_dir = out / "runs" / f"{method}_s{seed}"
            overrides = [f"data.root={data}", f"run.seed={seed}", *plan.finetune_overrides]
            if method != "scratch":
                overrides.append(f"model.pretrained={encoder}")
            overrides.append(f"regularizer.weight={plan.sd_weight if method == 'sd' else 0}")
            result_path = run_dir / "results.json"
            if not result_path.exists():
                log.info("demo: %s, seed %d -> %s", METHODS[method].format(w=plan.sd_weight), seed, run_dir)
                cfg = cfgmod.load_config(plan.finetune_recipe, overrides, kind="finetune")
                run_finetune(cfg, run_dir, resume="auto")
            res = json.loads(result_path.read_text())
            runs[method].append({"seed": seed, "dir": str(run_dir.relative_to(out)), **res})
    timings["finetune_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    summary = summarise(runs, plan, n_seeds, quick, data, timings, pre_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render_markdown(summary))
    plot_summary(summary, out / "summary.png")
    print(render_table(summary))
    print(f"\nwrote {out / 'summary.md'}, {out / 'summary.json'}, {out / 'summary.png'}")
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict, plan: DemoPlan, n_seeds: int, quick: bool, data: Path, timings: dict,
              pre_dir: Path) -> dict:
    any_run = next(iter(runs.values()))[0]
    methods = {}
    for method, rs in runs.items():
        entry = {"label": METHODS[method].format(w=plan.sd_weight), "runs": len(rs)}
        for key in ("video_acc1", "video_acc5", "clip_acc1", "mean_class_acc"):
            vals = [r[key] for r in rs]
            m, s = mean_std(vals)
            entry[key] = {"mean": m, "std": s, "values": vals}
        entry["last_video_acc1"] = dict(zip(("mean", "std"), mean_std([r["last"]["video_acc1"] for r in rs])))
        entry["selected_epochs"] = [r["selected"]["epoch"] for r in rs]
        methods[method] = entry
    meta = json.loads((data / "meta.json").read_text()) if (data / "meta.json").exists() else {}
    preset = meta.get("preset")
    pretrain_log = pre_dir / "metrics.jsonl"
    pretext = None
    if pretrain_log.exists() and pretrain_log.read_text().strip():
        pretext = json.loads(pretrain_log.read_text().strip().splitlines()[-1]).get("train_acc")
    return {
        "methods": methods, "seeds": list(range(n_seeds)), "quick": quick,
        "protocol": any_run["protocol"],
        "dataset": {"root": str(data), "preset": preset.get("name") if isinstance(preset, dict) else preset,
                    "classes": len(meta.get("classes", [])) or None},
        "pretext_train_acc": pretext,
        "pretrain_recipe": plan.pretrain_recipe, "finetune_recipe": plan.finetune_recipe,
        "overrides": {"pretrain": list(plan.pretrain_overrides), "finetune": list(plan.finetune_overrides)},
        "sd_weight": plan.sd_weight, "regularizer": runs["sd"][0]["regularizer"], "wall_time_s": timings,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }


def _fmt(stat: dict) -> str:
    return "n/a" if math.isnan(stat["mean"]) else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def render_table(summary: dict) -> str:
    lines = ["| method | video Acc@1 (%) | video Acc@5 (%) | clip Acc@1 (%) | mean-class Acc (%) |",
             "|---|---|---|---|---|"]
    for m in summary["methods"].values():
        lines.append(f"| {m['label']} | {_fmt(m['video_acc1'])} | {_fmt(m['video_acc5'])} | "
                     f"{_fmt(m['clip_acc1'])} | {_fmt(m['mean_class_acc'])} |")
    return "\n".join(lines)


def render_markdown(summary: dict) -> str:
    p = summary["protocol"]
    t = summary["wall_time_s"]
    n = len(summary["seeds"])
    return "\n".join([
        "# sdtl demo: scratch vs pre-trained vs self-distillation",
        "",
        f"Synthetic dataset `{summary['dataset']['preset']}` ({summary['dataset']['classes']} motion classes), "
        f"{n} seeds ({', '.join(map(str, summary['seeds']))}), mean ± std (sample std over seeds)"
        + (" — **quick mode**: fewer seeds and epochs" if summary["quick"] else "") + ".",
        "",
        render_table(summary),
        "",
        f"Protocol: {p['views']} clips × {p['crops']} crop(s) per test video ({p['crop']}; {p['clip']}), "
        f"{p['aggregation']}; {p['split']}. Checkpoint: selected by {p['selected_by']}.",
        f"Recipes: pre-train `{summary['pretrain_recipe']}`, fine-tune `{summary['finetune_recipe']}` "
        f"(overrides: {summary['overrides']}); self-distillation λ = {summary['sd_weight']:g} "
        f"(reduction {summary['regularizer']['reduction']}, teacher BN {summary['regularizer']['teacher_bn']}).",
        (f"Pre-training: playback-speed (pace) accuracy on the pool at the last epoch "
         f"{summary['pretext_train_acc']:.1f}% (chance 25%)." if summary.get("pretext_train_acc") is not None
         else "Pre-training: reused encoder (pretext accuracy not recorded)."),
        f"Wall time: total {t['total_s'] / 60:.1f} min (data {t['data_s']:.0f} s, pre-training "
        f"{t['pretrain_s']:.0f} s, fine-tuning {t['finetune_s']:.0f} s) on {summary['machine']['platform']}, "
        f"torch {summary['machine']['torch']}, {summary['machine']['threads']} threads.",
        "",
        "Per-run results: `runs/<method>_s<seed>/results.json`; curves: `runs/*/curves.png`; "
        "plot: `summary.png`.",
        "",
    ])


def plot_summary(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["methods"].values())
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, m in enumerate(methods):
        vals = m["video_acc1"]["values"]
        ax.bar(i, m["video_acc1"]["mean"], yerr=m["video_acc1"]["std"], capsize=6, alpha=0.6)
        ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(methods)), [m["label"] for m in methods], fontsize=8)
    ax.set_ylabel("video Acc@1 (%)")
    ax.set_title(f"synthetic benchmark, {len(summary['seeds'])} seeds (mean ± std, dots = seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
