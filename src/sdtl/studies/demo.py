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

Re-running a plan on the same OUT reuses finished runs and resumes unfinished ones — but only runs
whose effective config equals what this invocation would run; anything else is refused, never
mixed into the summary and never overwritten.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdtl.atomic import atomic_copy, atomic_savefig, atomic_write_text
from sdtl.errors import UserError
from sdtl.studies.stats import describe_difference, mean_std, paired_difference

log = logging.getLogger("sdtl.demo")


@dataclass(frozen=True)
class DemoPlan:
    name: str  # quick | full | lr-grid
    preset: str
    seeds: int
    pretrain: bool  # pre-train an encoder here (full) or start from the shipped one
    pool_videos: int | None  # None = the whole pool; else the first N (only the retention probe needs them)
    pretrain_recipe: str
    finetune_recipe: str
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    sd_weight: float = 1.0  # chosen by the --lr-grid rule (docs/demo_regime.md)
    lrs: tuple[float, ...] = ()  # lr-grid only
    weights: tuple[float, ...] = ()  # lr-grid only: the λ values


# The fine-tuning settings (recipe synthetic_small: SGD momentum 0.9, lr, λ) were chosen by the rule
# of docs/demo_regime.md from the --lr-grid study; budgets on 2 CPU cores: quick <= 5 min, full <= 30.
QUICK = DemoPlan(name="quick", preset="small", seeds=3, pretrain=False, pool_videos=48,
                 pretrain_recipe="synthetic_pretrain", finetune_recipe="synthetic_small",
                 finetune_overrides=("eval.num_clips=5",))
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


@dataclass
class RunSpec:
    """One fine-tuning run of a plan: its folder name and its overrides of the plan's recipe."""

    name: str
    method: str  # scratch | plain | sd
    seed: int
    weight: float
    lr: float | None = None
    overrides: list[str] = field(default_factory=list)


# Everything the demo writes at the top of its OUT (folders and files).
DEMO_NAMES = frozenset({"demo.json", "data", "pretrained", "pretrain", "runs", "summary.json", "summary.md",
                        "summary.png", "forgetting.png", "lr_grid.json", "lr_grid.md", "lr_grid.png"})


def _marker(out: Path) -> Path:
    return out / "demo.json"


def _plan_identity(plan: DemoPlan) -> dict:
    """What must match for runs in an OUT to be reused (the number of seeds may grow or shrink)."""
    return {k: v for k, v in asdict(plan).items() if k != "seeds"}


def _claim_out(out: Path, plan: DemoPlan, force: bool, write: bool = True) -> None:
    from sdtl.engine.runlock import LOCK_NAME

    marker = _marker(out)
    if marker.exists():
        old = json.loads(marker.read_text())
        old_identity = old.get("identity") or {}
        if old_identity != json.loads(json.dumps(_plan_identity(plan))):
            diff = sorted(k for k in set(old_identity) | set(_plan_identity(plan))
                          if old_identity.get(k) != json.loads(json.dumps(_plan_identity(plan))).get(k))
            raise UserError(f"--out {out}: holds a `sdtl demo` of plan {old.get('plan', '?')!r} with other settings "
                            f"({', '.join(diff)}); this is plan {plan.name!r}. Nothing was changed: choose another "
                            f"--out (the default for this plan is {DEFAULT_OUT[plan.name]})")
    elif out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not force:
            raise UserError(f"--out {out}: exists and is not an sdtl demo folder; choose a new --out "
                            f"(or pass --force to add the demo's folders to it; nothing in it is deleted)")
        taken = sorted(p.name for p in out.iterdir() if p.name in DEMO_NAMES)
        if taken:  # --force adds the demo's files; it never writes over files the demo did not write
            raise UserError(f"--out {out}: already holds {', '.join(taken)}, which the demo would write over, and "
                            f"no demo.json says the demo wrote them; choose a new --out (nothing was changed)")
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"plan": plan.name, "identity": _plan_identity(plan)}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ data
def _ensure_data(out: Path, plan: DemoPlan, data_dir: str | None) -> Path:
    from sdtl.data.synthetic import GENERATOR_VERSION, PRESETS, generate_synthetic

    need_pool = PRESETS[plan.preset].pool_size if plan.pool_videos is None else plan.pool_videos
    if data_dir is not None:
        data = Path(data_dir).resolve()
        if not (data / "meta.json").exists():
            raise UserError(f"--data {data_dir}: not a folder written by `sdtl synth` (no meta.json); "
                            f"run `sdtl synth --out {data_dir}` first or leave --data out")
    else:
        data = (out / "data").resolve()
        if not (data / "meta.json").exists():
            log.info("demo: generating the synthetic '%s' dataset in %s", plan.preset, data)
            generate_synthetic(data, preset=plan.preset, seed=0, pool_size=plan.pool_videos)
    meta = json.loads((data / "meta.json").read_text())
    preset = meta.get("preset") or {}
    expected = json.loads(json.dumps(asdict(PRESETS[plan.preset])))
    same = {k: v for k, v in preset.items() if k != "pool_size"} == {k: v for k, v in expected.items() if k != "pool_size"}
    if meta.get("generator_version") != GENERATOR_VERSION or not same or meta["counts"]["unlabelled"] < need_pool:
        raise UserError(f"{data}: synthetic data of another version or preset (generator "
                        f"{meta.get('generator_version')}, preset {preset.get('name')}, "
                        f"{meta['counts']['unlabelled']} pool videos); this demo needs preset {plan.preset!r} "
                        f"version {GENERATOR_VERSION} with >= {need_pool} pool videos: use a new --out "
                        f"(or `sdtl synth --out NEW --preset {plan.preset}` and --data NEW)")
    return data


# ------------------------------------------------------------------------------ encoder + probes
def _retention_probe_for(encoder: Path, data: Path, plan: DemoPlan, path: Path) -> Path:
    """Retention probe of the shipped encoder, built exactly as `sdtl pretrain` builds its own (from the
    first 48 pool videos, which quick mode writes)."""
    if path.exists():
        return path
    from sdtl.engine import config as cfgmod
    from sdtl.data.videos import find_videos
    from sdtl.engine.pretrain import write_retention_probe

    pcfg = cfgmod.load_config(plan.pretrain_recipe, [f"data.root={data}"], kind="pretrain")
    return write_retention_probe(encoder, find_videos(str(data), None)[:48], pcfg, path)


def _prepare_encoder(out: Path, plan: DemoPlan, data: Path) -> dict:
    """The encoder fine-tuning starts from: shipped (quick, lr-grid) or pre-trained here (full)."""
    from sdtl.assets import demo_encoder, demo_encoder_info, sha256_file

    shipped_info = demo_encoder_info()
    if not plan.pretrain:
        enc_dir = out / "pretrained"
        enc_dir.mkdir(exist_ok=True)
        encoder = enc_dir / "encoder.pt"
        if not encoder.exists():
            src = demo_encoder()  # checks the sha256
            atomic_copy(src, encoder)
        elif sha256_file(encoder) != shipped_info["sha256"]:
            raise UserError(f"{encoder}: is not the shipped demo encoder (sha256 differs); use a new --out")
        retention = _retention_probe_for(encoder, data, plan, enc_dir / "retention_probe.pt")
        return {"source": "shipped", "path": str(encoder), "sha256": shipped_info["sha256"],
                "pretext_train_acc": shipped_info.get("pretext_train_acc"), "retention_probe": str(retention),
                "regenerate": shipped_info["regenerate"]}

    from sdtl.engine import config as cfgmod
    from sdtl.engine.diagnostics import RetentionProbe
    from sdtl.engine.pretrain import run_pretrain
    from sdtl.engine.rundir import check_same_config
    from sdtl.models import build_encoder
    from sdtl.models.checkpoints import safe_load

    pre_dir = out / "pretrain"
    encoder = pre_dir / "checkpoints" / "encoder.pt"
    if not encoder.exists():
        cfg = cfgmod.load_config(plan.pretrain_recipe, [f"data.root={data}", *plan.pretrain_overrides],
                                 kind="pretrain")
        check_same_config(pre_dir, cfg, "this demo")
        run_pretrain(cfg, pre_dir, resume="auto")
    retention = pre_dir / "retention_probe.pt"
    history = [json.loads(line) for line in (pre_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    info = {"source": "pre-trained here", "path": str(encoder), "sha256": sha256_file(encoder),
            "pretext_train_acc": history[-1].get("train_acc") if history else None,
            "retention_probe": str(retention)}
    # How this encoder compares with the shipped one: both on the same pretext probe clips.
    import torch

    probe = RetentionProbe.load(retention)
    try:
        states = {"retention_acc": safe_load(encoder), "shipped_retention_acc": safe_load(demo_encoder())}
    except UserError as exc:  # a broken shipped file must not stop the full demo, which does not need it
        log.warning("demo: cannot compare with the shipped encoder: %s", exc)
        return info
    own_data, shipped_data = (states[k].get("config", {}).get("data", {}) for k in states)
    comparable = all(own_data.get(k) == shipped_data.get(k) for k in ("size", "clip_len")) and \
        states["retention_acc"].get("task_options") == states["shipped_retention_acc"].get("task_options")
    for key, state in states.items():
        if key == "shipped_retention_acc" and not comparable:
            info["shipped_comparison"] = "not comparable: the shipped encoder was pre-trained on other clip sizes"
            continue
        enc = build_encoder(state["arch"], **state.get("arch_options", {}))
        enc.load_state_dict(state["encoder"])
        own_head = RetentionProbe(probe.clips, probe.labels, state["head"], probe.task, probe.task_options)
        info[key] = own_head.accuracy(enc, torch.device("cpu"))
    info["shipped_pretext_train_acc"] = shipped_info.get("pretext_train_acc")
    return info


# ------------------------------------------------------------------------------------ fine-tuning
def _run_specs(plan: DemoPlan, n_seeds: int) -> list[RunSpec]:
    specs = []
    for seed in range(n_seeds):
        if plan.name == "lr-grid":
            for lr in plan.lrs:
                specs.append(RunSpec(f"scratch_lr{lr:g}_s{seed}", "scratch", seed, 0.0, lr))
                specs.append(RunSpec(f"plain_lr{lr:g}_s{seed}", "plain", seed, 0.0, lr))
                for w in plan.weights:
                    specs.append(RunSpec(f"sd{w:g}_lr{lr:g}_s{seed}", "sd", seed, w, lr))
        else:
            for method in METHODS:
                specs.append(RunSpec(f"{method}_s{seed}", method, seed, plan.sd_weight if method == "sd" else 0.0))
    return specs


def _finetune_all(out: Path, plan: DemoPlan, specs: list[RunSpec], data: Path, encoder: dict) -> list[dict]:
    from sdtl.engine import config as cfgmod
    from sdtl.engine.finetune import run_finetune
    from sdtl.engine.rundir import check_same_config

    results = []
    for i, spec in enumerate(specs, start=1):
        run_dir = out / "runs" / spec.name
        overrides = [f"data.root={data}", f"run.seed={spec.seed}", f"regularizer.weight={spec.weight:g}",
                     f"eval.retention={encoder['retention_probe']}", *plan.finetune_overrides]
        if spec.method != "scratch":
            overrides.append(f"model.pretrained={encoder['path']}")
        if spec.lr is not None:
            overrides.append(f"optim.lr={spec.lr:g}")
        cfg = cfgmod.load_config(plan.finetune_recipe, overrides, kind="finetune")
        check_same_config(run_dir, cfg, "this demo")
        result_path = run_dir / "results.json"
        t0 = time.perf_counter()
        if not result_path.exists():
            log.info("demo [%d/%d]: %s, seed %d%s -> %s", i, len(specs), _label(spec.method, spec.weight),
                     spec.seed, f", lr {spec.lr:g}" if spec.lr is not None else "", run_dir)
            run_finetune(cfg, run_dir, resume="auto")
        res = json.loads(result_path.read_text())
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        results.append({"spec": asdict(spec), "dir": str(run_dir.relative_to(out)), "history": history,
                        "wall_s": time.perf_counter() - t0, **res})
    return results


def _label(method: str, weight: float) -> str:
    return METHODS[method].format(w=weight)


# ------------------------------------------------------------------------------------- summaries
def _stat(values: list[float]) -> dict:
    m, s = mean_std(values)
    return {"mean": m, "std": s, "values": values}


def _best_val(history: list[dict]) -> float:
    vals = [r["val_video_acc1"] for r in history if isinstance(r.get("val_video_acc1"), (int, float))]
    return max(vals) if vals else float("nan")


def _final(history: list[dict], key: str) -> float:
    vals = [r[key] for r in history if isinstance(r.get(key), (int, float))]
    return vals[-1] if vals else float("nan")


def _method_entry(label: str, rs: list[dict]) -> dict:
    entry = {"label": label, "runs": len(rs), "seeds": [r["spec"]["seed"] for r in rs]}
    for key in ("video_acc1", "video_acc5", "clip_acc1", "mean_class_acc"):
        entry[key] = _stat([r[key] for r in rs])
    entry["last_video_acc1"] = _stat([r["last"]["video_acc1"] for r in rs])
    entry["val_video_acc1"] = _stat([_best_val(r["history"]) for r in rs])
    entry["selected_epochs"] = [r["selected"]["epoch"] for r in rs]
    entry["forgetting"] = {
        "feat_drift": _stat([_final(r["history"], "feat_drift") for r in rs]),
        "feat_cka": _stat([_final(r["history"], "feat_cka") for r in rs]),
        "retention_acc": _stat([_final(r["history"], "retention_acc") for r in rs]),
        "retention_acc_initial": _stat([r["history"][0].get("retention_acc", float("nan")) for r in rs]),
    }
    entry["wall_s"] = sum(r["wall_s"] for r in rs)
    return entry


def summarise(results: list[dict], plan: DemoPlan, data: Path, encoder: dict, timings: dict) -> dict:
    import torch

    by_method: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in results:
        by_method[r["spec"]["method"]].append(r)
    methods = {m: _method_entry(_label(m, plan.sd_weight), rs) for m, rs in by_method.items() if rs}
    seeds = sorted({r["spec"]["seed"] for r in results})

    def paired(a: str, b: str) -> dict:
        va = {r["spec"]["seed"]: r["video_acc1"] for r in by_method[a]}
        vb = {r["spec"]["seed"]: r["video_acc1"] for r in by_method[b]}
        common = sorted(set(va) & set(vb))
        return paired_difference([va[s] for s in common], [vb[s] for s in common], common)

    meta = json.loads((data / "meta.json").read_text())
    any_run = results[0]
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
        "sd_weight": plan.sd_weight, "regularizer": by_method["sd"][0]["regularizer"] if by_method["sd"] else None,
        "wall_time_s": timings,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }


def _fmt(stat: dict, digits: int = 1) -> str:
    return "n/a" if math.isnan(stat["mean"]) else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def render_table(summary: dict) -> str:
    lines = ["| method | video Acc@1 (%) | clip Acc@1 (%) | val Acc@1 (%) | feature drift | pretext skill kept (%) |",
             "|---|---|---|---|---|---|"]
    for m in summary["methods"].values():
        f = m["forgetting"]
        lines.append(f"| {m['label']} | {_fmt(m['video_acc1'])} | {_fmt(m['clip_acc1'])} | "
                     f"{_fmt(m['val_video_acc1'])} | {_fmt(f['feat_drift'], 2)} | {_fmt(f['retention_acc'])} |")
    return "\n".join(lines)


def effect_sentences(summary: dict) -> list[str]:
    c = summary["comparisons"]
    return [describe_difference(c["plain_vs_scratch"], "Pre-training (plain − scratch, video Acc@1)"),
            describe_difference(c["sd_vs_plain"], f"Self-distillation (SD λ={summary['sd_weight']:g} − plain, "
                                                  f"video Acc@1)")]


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
        f"(chance 25%; at the start {_fmt(summary['methods']['plain']['forgetting']['retention_acc_initial'])}).",
        "",
        f"Protocol: {p['views']} clips × {p['crops']} crop(s) per test video ({p['crop']}; {p['clip']}), "
        f"{p['aggregation']}; {p['split']}. Checkpoint: selected by {p['selected_by']}.",
        f"Recipes: fine-tune `{summary['finetune_recipe']}` (overrides: {summary['overrides']['finetune']}); "
        f"self-distillation λ = {summary['sd_weight']:g} (reduction {summary['regularizer']['reduction']}, "
        f"teacher BN {summary['regularizer']['teacher_bn']}).",
        enc_line,
        f"Wall time: total {t['total_s'] / 60:.1f} min (data {t['data_s']:.0f} s, encoder {t['encoder_s']:.0f} s, "
        f"fine-tuning {t['finetune_s']:.0f} s) on {summary['machine']['platform']}, torch {summary['machine']['torch']}, "
        f"{summary['machine']['threads']} threads.",
        "",
        "Per-run results: `runs/<method>_s<seed>/results.json`; curves: `runs/*/curves.png`; "
        "plots: `summary.png`, `forgetting.png`.",
        "",
    ])


# ----------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_savefig(fig, path, dpi=110)


def plot_summary(summary: dict, path: Path) -> None:
    plt = _plt()
    methods = list(summary["methods"].items())
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (key, m) in enumerate(methods):
        vals = m["video_acc1"]["values"]
        ax.bar(i, m["video_acc1"]["mean"], yerr=m["video_acc1"]["std"], capsize=6, alpha=0.6, color=f"C{i}")
        ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
        ax.annotate(f"{m['video_acc1']['mean']:.1f}", (i, m["video_acc1"]["mean"]), textcoords="offset points",
                    xytext=(14, 3), fontsize=8)
    ax.axhline(summary["dataset"]["chance"], color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(methods)), [SHORT[k].format(w=summary["sd_weight"]) for k, _ in methods])
    ax.set_ylim(0, 100)
    ax.set_ylabel("test video Acc@1 (%)")
    ax.set_title(f"{summary['plan']} demo: {len(summary['seeds'])} seeds (bars: mean ± std, dots: seeds)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_forgetting(results: list[dict], summary: dict, path: Path) -> None:
    """Per method: feature drift from the pre-trained encoder and pretext skill kept, vs epoch."""
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for i, method in enumerate(summary["methods"]):
        rs = [r for r in results if r["spec"]["method"] == method]
        for ax, key in zip(axes, ("feat_drift", "retention_acc")):
            series = [[row.get(key, np.nan) for row in r["history"]] for r in rs]
            length = min(len(s) for s in series)
            arr = np.array([s[:length] for s in series], dtype=float)
            epochs = [row["epoch"] for row in rs[0]["history"][:length]]
            mean, std = np.nanmean(arr, 0), (np.nanstd(arr, 0, ddof=1) if len(arr) > 1 else np.zeros(length))
            ax.plot(epochs, mean, color=f"C{i}", marker="o", ms=2.5, label=SHORT[method].format(w=summary["sd_weight"]))
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    axes[0].set_title("feature drift from the pre-trained encoder", fontsize=9)
    axes[0].set_ylabel("‖f_t − f_0‖² / ‖f_0‖²")
    axes[1].set_title("pre-trained skill kept: frozen pretext head accuracy", fontsize=9)
    axes[1].set_ylabel("playback-speed accuracy (%)")
    axes[1].axhline(25.0, color="grey", ls="--", lw=1, label="chance")
    axes[1].set_ylim(0, 100)
    for ax in axes:
        ax.set_xlabel("epoch (0 = start of fine-tuning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"forgetting, mean ± std over {len(summary['seeds'])} seeds (scratch: drift from its random init)",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------- lr grid
def summarise_grid(results: list[dict], plan: DemoPlan, data: Path, encoder: dict, timings: dict) -> dict:
    """Every (method, λ, lr) point with mean ± std, and the selection rule applied on validation."""
    points: dict[tuple, list[dict]] = {}
    for r in results:
        s = r["spec"]
        points.setdefault((s["method"], s["weight"], s["lr"]), []).append(r)
    table = []
    for (method, weight, lr), rs in sorted(points.items(), key=lambda kv: (kv[0][0] != "scratch", kv[0][0] != "plain",
                                                                            kv[0][1], kv[0][2])):
        table.append({"method": method, "weight": weight, "lr": lr, "seeds": [r["spec"]["seed"] for r in rs],
                      "val_video_acc1": _stat([_best_val(r["history"]) for r in rs]),
                      "video_acc1": _stat([r["video_acc1"] for r in rs]),
                      "retention_acc": _stat([_final(r["history"], "retention_acc") for r in rs]),
                      "feat_drift": _stat([_final(r["history"], "feat_drift") for r in rs])})

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
    sel = grid["selection"]
    lines = ["# sdtl demo --lr-grid: test accuracy vs fine-tuning learning rate", "",
             f"Rule (fixed before looking at test numbers): {sel['rule']}. Selected: lr = {sel['lr']:g}, "
             f"λ = {sel['weight']:g}.", "",
             "| method | lr | val Acc@1 (%) | test video Acc@1 (%) | pretext skill kept (%) | feature drift |",
             "|---|---|---|---|---|---|"]
    for p in grid["points"]:
        mark = " **(selected)**" if (p["lr"] == sel["lr"] and (p["method"] == "plain" or
                                                               (p["method"] == "sd" and p["weight"] == sel["weight"]))) else ""
        lines.append(f"| {_grid_label(p)}{mark} | {p['lr']:g} | {_fmt(p['val_video_acc1'])} | {_fmt(p['video_acc1'])} | "
                     f"{_fmt(p['retention_acc'])} | {_fmt(p['feat_drift'], 2)} |")
    t = grid["wall_time_s"]
    lines += ["", f"Mean ± std over seeds {sorted({s for p in grid['points'] for s in p['seeds']})}; "
                  f"recipe `{grid['finetune_recipe']}` with {grid['overrides']}; wall time {t['total_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot_grid(grid: dict, path: Path) -> None:
    import numpy as np

    plt = _plt()
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
    _save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ entry
def run_demo(out: str | Path | None = None, quick: bool = False, seeds: int | None = None,
             data_dir: str | None = None, force: bool = False, plan: DemoPlan | None = None,
             lr_grid: bool = False) -> dict:
    plan = plan or (LR_GRID if lr_grid else QUICK if quick else FULL)
    n_seeds = seeds if seeds is not None else plan.seeds
    if n_seeds < 1:
        raise UserError(f"--seeds {n_seeds}: need at least 1 seed (mean ± std and intervals need 2 or more)")
    out = Path(out if out is not None else DEFAULT_OUT.get(plan.name, f"sdtl-demo-{plan.name}")).resolve()
    from sdtl.engine import config as cfgmod

    # Validate the recipes before anything is written.
    cfgmod.load_config(plan.pretrain_recipe, list(plan.pretrain_overrides), kind="pretrain")
    cfgmod.load_config(plan.finetune_recipe, list(plan.finetune_overrides), kind="finetune")
    from sdtl.engine.runlock import RunLock

    _claim_out(out, plan, force, write=False)  # refuse a foreign folder before writing a lock file into it
    with RunLock(out, "demo"):
        _claim_out(out, plan, force)
        return _run_plan(out, plan, n_seeds, data_dir)


def _run_plan(out: Path, plan: DemoPlan, n_seeds: int, data_dir: str | None) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = _ensure_data(out, plan, data_dir)
    timings["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder = _prepare_encoder(out, plan, data)
    timings["encoder_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = _finetune_all(out, plan, _run_specs(plan, n_seeds), data, encoder)
    timings["finetune_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    if plan.name == "lr-grid":
        grid = summarise_grid(results, plan, data, encoder, timings)
        atomic_write_text(out / "lr_grid.json", json.dumps(grid, indent=2) + "\n")
        atomic_write_text(out / "lr_grid.md", render_grid_markdown(grid))
        plot_grid(grid, out / "lr_grid.png")
        print(render_grid_markdown(grid))
        print(f"wrote {out / 'lr_grid.md'}, {out / 'lr_grid.json'}, {out / 'lr_grid.png'}")
        return grid
    summary = summarise(results, plan, data, encoder, timings)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", render_markdown(summary))
    plot_summary(summary, out / "summary.png")
    plot_forgetting(results, summary, out / "forgetting.png")
    print(render_table(summary))
    print()
    print("\n".join(effect_sentences(summary)))
    print(f"\nwrote {out / 'summary.md'}, {out / 'summary.json'}, {out / 'summary.png'}, {out / 'forgetting.png'}")
    return summary
