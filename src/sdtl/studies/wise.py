"""WiSE-FT: weight-space ensembles of a pre-trained and a fine-tuned model (``sdtl wise``).

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (arXiv:2109.01903): fine-tuning
moves the weights from θ₀ to θ₁; the models on the straight line between them,

    θ_α = (1 − α)·θ₀ + α·θ₁,   α ∈ [0, 1],

are often better than either end. ``sdtl wise`` evaluates that line for a grid of α.

- θ₁ (``--finetuned B``): a checkpoint of ``sdtl finetune`` (``checkpoints/best.pt`` or ``last.pt``).
- θ₀ (``--pretrained A``, default: B's ``model.pretrained``):

  * an encoder checkpoint (RSPNet, ``sdtl pretrain``'s ``encoder.pt``, an ``sdtl export`` file, any
    format :func:`~sdtl.models.checkpoints.load_encoder_weights` reads): loaded into B's arch and
    options, **with B's classification head**. The paper interpolates the zero-shot CLIP head too;
    a new task head has no pre-trained counterpart (a random one would give chance accuracy), so
    both ends share B's head and only the encoder moves along the line;
  * or another ``sdtl finetune`` checkpoint of the same arch and classes (e.g. a linear-probe run):
    its whole model, head included, is θ₀.

- Every floating-point entry of the state dict is interpolated, BatchNorm running statistics
  included (as in the paper's code); integer buffers (``num_batches_tracked``) are taken from θ₁.
  α = 0 gives θ₀ and α = 1 gives θ₁ bit-exactly.
- Each θ_α is evaluated on the run's own validation part (rebuilt from B's stored config exactly as
  the run split it, with its ``eval.val_clips`` centre clips) and on the test list (``eval.num_clips``
  × ``eval.crops``), with ``--set`` overrides as in ``sdtl evaluate``.
- Selection rule (:data:`SELECTION_RULE`): the α with the highest validation video acc@1; ties go
  to the largest α, i.e. the one closest to the fine-tuned model. The test figures are reported
  beside it and never used to choose.

Writes ``wise.json``, ``wise.md`` and ``wise.png`` into a new or empty ``--out`` folder.
Each α decodes the validation and test videos again (the data pipeline is shared with ``evaluate``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path

from sdtl.errors import UserError

log = logging.getLogger("sdtl.wise")

DEFAULT_ALPHAS = tuple(round(i / 10, 1) for i in range(11))
SELECTION_RULE = ("highest validation video acc@1; ties go to the largest alpha (the one closest to the "
                  "fine-tuned model); the test list is never used to choose")
FORMULA = ("theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1 for every floating-point tensor of the "
           "state dict (BatchNorm running statistics included); integer buffers from theta_1")
OUTPUTS = ("wise.json", "wise.md", "wise.png")
# `sdtl: interrupted; ...`: wise keeps no partial state (wise.json is written last).
RESUME_HINT = ("nothing is kept from an interrupted evaluation (wise.json is written last); re-run the same "
               "command")
METRICS = ("video_acc1", "video_acc5", "clip_acc1", "clip_acc5", "mean_class_acc", "loss")


# ------------------------------------------------------------------------------------- alphas
def parse_alphas(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``; anything but numbers in [0, 1] is a :class:`UserError`."""
    values = []
    for part in str(text).split(","):
        try:
            values.append(float(part.strip()))
        except ValueError:
            raise UserError(f"--alphas {text}: {part.strip()!r} is not a number; give comma-separated "
                            f"numbers in [0, 1], e.g. --alphas 0,0.25,0.5,0.75,1") from None
    return check_alphas(values, f"--alphas {text}")


def check_alphas(alphas, what: str = "alphas") -> list[float]:
    """Sorted, deduplicated alphas; refuses an empty list and values outside [0, 1] (or NaN)."""
    values = [float(a) for a in alphas]
    if not values:
        raise UserError(f"{what}: no values; give at least one number in [0, 1]")
    bad = [a for a in values if not (0.0 <= a <= 1.0)]
    if bad:
        raise UserError(f"{what}: {', '.join(f'{a:g}' for a in bad)} outside [0, 1]; alpha 0 is the "
                        f"pre-trained model, 1 the fine-tuned one")
    return sorted(set(values))


# ------------------------------------------------------------------------------ interpolation
def interpolate(theta0: dict, theta1: dict, alpha: float) -> dict:
    """θ_α = (1 − α)·θ₀ + α·θ₁ for floating-point entries; other entries (integer buffers) from θ₁.

    The ends are exact copies (α = 0 → θ₀, α = 1 → θ₁), not results of arithmetic.
    """
    out = {}
    for key, b in theta1.items():
        a = theta0[key]
        if not b.is_floating_point() or alpha == 1.0:
            out[key] = b.clone()
        elif alpha == 0.0:
            out[key] = a.clone()
        else:
            out[key] = (1.0 - alpha) * a + alpha * b
    return out


def check_same_layout(theta0: dict, theta1: dict, what: str) -> None:
    """Refuse two state dicts that cannot be interpolated (other keys, shapes or dtypes)."""
    missing = sorted(set(theta1) - set(theta0))
    unexpected = sorted(set(theta0) - set(theta1))
    differ = sorted(k for k in set(theta0) & set(theta1)
                    if theta0[k].shape != theta1[k].shape or theta0[k].dtype != theta1[k].dtype)
    if missing or unexpected or differ:
        parts = [f"{name} {len(keys)} key(s) ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("shape/dtype-mismatched", differ)) if keys]
        raise UserError(f"{what}: its weights do not fit the fine-tuned model: {'; '.join(parts)}; "
                        f"θ₀ must have the fine-tuned model's arch and options")


def load_theta0(path, model1, payload1: dict, allow_unsafe_pickle: bool = False,
                source: str = "--pretrained") -> tuple[dict, dict]:
    """θ₀'s state dict for the fine-tuned ``model1`` (from ``payload1``) and a description of it.

    ``source`` names where ``path`` came from in messages and the log (``--pretrained``, or the
    fine-tuned run's ``model.pretrained`` when no --pretrained was given).
    """
    from sdtl.models.checkpoints import _load_encoder, build_model_from_checkpoint, detect_format, safe_load

    what = f"{source} {path}"
    try:
        obj = safe_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    except UserError as exc:
        raise UserError(f"{source} {exc}") from None
    fmt = detect_format(obj)
    if fmt == "sdtl-finetune":
        del obj
        try:
            model0, payload0 = build_model_from_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
        except UserError as exc:
            raise UserError(f"{source} {exc}") from None
        if payload0["arch"] != payload1["arch"]:
            raise UserError(f"{what}: a fine-tune checkpoint of arch {payload0['arch']!r}, but the fine-tuned "
                            f"model is {payload1['arch']!r}; θ₀ must have the same arch and options")
        if list(payload0.get("class_names") or []) != list(payload1.get("class_names") or []):
            raise UserError(f"{what}: its classes differ from the fine-tuned checkpoint's; θ₀ must be a "
                            f"fine-tune checkpoint of the same dataset and classes (or an encoder checkpoint)")
        theta0 = model0.state_dict()
        description = "whole model (encoder and head) of the fine-tune checkpoint A"
    else:
        model0 = copy.deepcopy(model1)  # B's head, and B's values for any buffer A lacks
        report = _load_encoder(model0.encoder, obj, payload1["arch"], what)
        theta0 = model0.state_dict()
        description = ("encoder of A with B's classification head (a new task head has no pre-trained "
                       "counterpart, so both ends share B's head)")
        log.info("θ₀: %s", report.summary())
    check_same_layout(theta0, model1.state_dict(), what)
    return {k: v.detach().cpu().clone() for k, v in theta0.items()}, {"format": fmt, "theta0": description}


def select(rows: list[dict]) -> int:
    """Index of the selected row: best ``val.video_acc1``, ties to the largest alpha (rows sorted by alpha)."""
    def key(i):
        v = rows[i]["val"]["video_acc1"]
        return (-math.inf if math.isnan(v) else v, rows[i]["alpha"])

    return max(range(len(rows)), key=key)


# ------------------------------------------------------------------------------- the evaluation
def claim(out_dir: Path) -> None:
    """``--out`` must be new or empty: a report is written once, never over another (or a finished one)."""
    from sdtl.studies import core

    core.claim_out(out_dir, "wise", "wise.json", reuse=False)


def run_wise(finetuned, out_dir, pretrained=None, alphas=DEFAULT_ALPHAS, overrides: list[str] | None = None,
             allow_unsafe_pickle: bool = False) -> dict:
    """``sdtl wise``: evaluate θ_α for every alpha, write wise.json / wise.md / wise.png into ``out_dir``.

    Returns the report (the content of wise.json) on rank 0, ``{}`` on the other ranks.
    Bad input raises :class:`UserError` before anything is written (and leaves no folder behind).
    """
    from sdtl.engine.runlock import rank0_lock
    from sdtl.studies import core

    alphas = check_alphas(alphas, "--alphas")
    out_dir = Path(out_dir)
    with core.study_folder(out_dir, "wise", lambda: claim(out_dir), lock=rank0_lock):
        return _run_wise(Path(finetuned), out_dir, pretrained, alphas, overrides, allow_unsafe_pickle)


def _run_wise(finetuned: Path, out_dir: Path, pretrained, alphas, overrides, allow_unsafe_pickle) -> dict:
    from sdtl.data.corrupt import check_failures
    from sdtl.engine import distributed as dist_utils
    from sdtl.engine.evaluate import evaluate, make_eval_loader
    from sdtl.engine.build import build_datasets
    from sdtl.engine.evaluate import check_checkpoint_data, checkpoint_config, protocol
    from sdtl.engine.runtime import amp_dtype, configure_determinism
    from sdtl.models.checkpoints import build_model_from_checkpoint

    try:
        model, payload = build_model_from_checkpoint(finetuned, allow_unsafe_pickle=allow_unsafe_pickle)
    except UserError as exc:
        raise UserError(f"--finetuned {exc}") from None
    cfg = checkpoint_config(payload, overrides)
    source = "--pretrained"
    if pretrained is None:
        pretrained, source = cfg.model.pretrained, "the fine-tuned run's model.pretrained"
        if not pretrained:
            raise UserError(f"--finetuned {finetuned}: its run started from random weights (model.pretrained "
                            f"is null), so it has no pre-trained θ₀; pass --pretrained CKPT (an encoder checkpoint "
                            f"or a fine-tune checkpoint of the same arch and classes)")
    pretrained = Path(pretrained)
    theta1 = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    theta0, described = load_theta0(pretrained, model, payload, allow_unsafe_pickle, source)

    info = dist_utils.setup(cfg.run.device)
    try:
        configure_determinism(cfg.run.deterministic, cfg.run.threads)
        _, val_ds, test_ds, classes = build_datasets(cfg)
        check_checkpoint_data(f"--finetuned {finetuned}", payload, cfg, classes, info)
        if val_ds is None:
            raise UserError(f"--finetuned {finetuned}: its run held out no validation part (data.val_fraction=0), "
                            f"and alpha must be chosen on held-out training videos, never on the test list; "
                            f"use a run fine-tuned with data.val_fraction > 0")
        model.to(info.device)
        eval_bs = cfg.eval.batch_size or cfg.data.batch_size
        dtype = amp_dtype(cfg.optim.amp, info.device)
        loaders = {"val": make_eval_loader(val_ds, eval_bs, info, cfg.data.workers),
                   "test": make_eval_loader(test_ds, eval_bs, info, cfg.data.workers)}
        rows, skipped = [], 0
        for alpha in alphas:
            model.load_state_dict(interpolate(theta0, theta1, alpha))
            row = {"alpha": alpha}
            for part, loader in loaders.items():
                out = evaluate(model, loader, len(classes), info, eval_bs, dtype,
                               desc=f"{part} alpha={alpha:g}" if cfg.run.progress else None)
                if part == "test" and alpha == alphas[0]:  # the same videos fail for every alpha
                    # out.failed is gathered over ranks: every rank refuses together, none waits alone.
                    skipped = check_failures(out.failed, skip=cfg.eval.skip_corrupt)
                row[part] = {k: out.metrics[k] for k in METRICS}
                row[f"num_{part}_videos"] = out.num_videos
            rows.append(row)
            if info.is_main:
                log.info("alpha %g: val video acc@1 %.2f | test video acc@1 %.2f", alpha,
                         row["val"]["video_acc1"], row["test"]["video_acc1"])
        if not info.is_main:
            return {}
        chosen = rows[select(rows)]
        val_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_clips=cfg.eval.val_clips, crops=1))
        ckpt = str(finetuned.resolve())
        report = {
            "method": "WiSE-FT (Wortsman et al., CVPR 2022, arXiv:2109.01903)",
            "formula": FORMULA,
            "finetuned": ckpt, "finetuned_epoch": payload.get("epoch"),
            "pretrained": str(pretrained.resolve()), "pretrained_format": described["format"],
            "pretrained_from": source, "theta0": described["theta0"], "num_classes": len(classes),
            "alphas": alphas,
            "selected": {"alpha": chosen["alpha"], "rule": SELECTION_RULE,
                         "val_video_acc1": chosen["val"]["video_acc1"],
                         "test_video_acc1": chosen["test"]["video_acc1"]},
            "results": rows,
            "protocol": {
                "val": {**protocol(val_cfg, "validation part of the train", ckpt, payload.get("epoch"),
                                   SELECTION_RULE),
                        "validation_part": f"stratified data.val_fraction={cfg.data.val_fraction} of the "
                                           f"training list, seed {cfg.run.seed} (the run's own split)"},
                "test": protocol(cfg, "test", ckpt, payload.get("epoch"), SELECTION_RULE),
            },
            "skipped_corrupt": skipped,
        }
        write_outputs(out_dir, report)
        return report
    finally:
        dist_utils.teardown()


# ----------------------------------------------------------------------------------- outputs
_COLUMNS = (("val", "video_acc1", "val video acc@1"), ("val", "clip_acc1", "val clip acc@1"),
            ("val", "mean_class_acc", "val mean-class"), ("test", "video_acc1", "test video acc@1"),
            ("test", "clip_acc1", "test clip acc@1"), ("test", "mean_class_acc", "test mean-class"))


def markdown(report: dict) -> str:
    sel = report["selected"]["alpha"]
    val, test = report["protocol"]["val"], report["protocol"]["test"]
    lines = [
        "# WiSE-FT weight-space ensembles",
        "",
        f"θ_α = (1 − α)·θ₀ + α·θ₁: {report['method']}.",
        "",
        f"- B, the fine-tuned checkpoint (--finetuned), gives θ₁ (α = 1): `{report['finetuned']}` "
        f"(epoch {report['finetuned_epoch']})",
        f"- A, the pre-trained checkpoint ({report.get('pretrained_from', '--pretrained')}), gives θ₀ (α = 0): "
        f"`{report['pretrained']}` ({report['pretrained_format']})",
        f"- θ₀ is the {report['theta0']}",
        f"- interpolated: {report['formula']}",
        f"- selection: {report['selected']['rule']}",
        f"- validation: {val['validation_part']}, {val['views']} centre clip(s) per video",
        f"- test: {test['split']}, {test['views']} clip(s) × {test['crops']} crop(s), {test['aggregation']}",
        "",
        "| α | " + " | ".join(c[2] for c in _COLUMNS) + " | |",
        "|---:|" + "---:|" * len(_COLUMNS) + "---|",
    ]
    for row in report["results"]:
        mark = row["alpha"] == sel
        cells = [f"{row[p][k]:.2f}" for p, k, _ in _COLUMNS]
        if mark:
            cells = [f"**{c}**" for c in cells]
        alpha = f"**{row['alpha']:g}**" if mark else f"{row['alpha']:g}"
        lines.append(f"| {alpha} | " + " | ".join(cells) + f" | {'← selected (validation)' if mark else ''} |")
    return "\n".join(lines) + "\n"


def text_table(report: dict) -> str:
    """The short table ``sdtl wise`` prints: alpha, validation and test figures, the selected row marked."""
    sel = report["selected"]["alpha"]
    head = f"{'alpha':>5}  {'val v@1':>7}  {'val c@1':>7}  {'test v@1':>8}  {'test c@1':>8}  {'test mc':>7}"
    lines = [head]
    for row in report["results"]:
        v, t = row["val"], row["test"]
        lines.append(f"{row['alpha']:>5g}  {v['video_acc1']:>7.2f}  {v['clip_acc1']:>7.2f}  {t['video_acc1']:>8.2f}  "
                     f"{t['clip_acc1']:>8.2f}  {t['mean_class_acc']:>7.2f}" + ("  <- selected" if row["alpha"] == sel else ""))
    lines.append(f"selected alpha {sel:g}: {report['selected']['rule']}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    from sdtl.studies import plots

    plt = plots.pyplot()
    alphas = [r["alpha"] for r in report["results"]]
    sel = report["selected"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(alphas, [r["val"]["video_acc1"] for r in report["results"]], "o-", color="C0",
            label="validation (selects α)")
    ax.plot(alphas, [r["test"]["video_acc1"] for r in report["results"]], "s--", color="C1",
            label="test (reported, not used)")
    ax.axvline(sel["alpha"], color="grey", ls=":", lw=1)
    ax.scatter([sel["alpha"]], [sel["val_video_acc1"]], marker="*", s=180, color="C0", zorder=3,
               label=f"selected α = {sel['alpha']:g}")
    plots.chance_line(ax, report.get("num_classes"))
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(0, 100)
    ax.set_xlabel("α   (0 = θ₀ pre-trained, 1 = θ₁ fine-tuned)")
    ax.set_ylabel("video acc@1 (%)")
    ax.set_title(r"WiSE-FT: $\theta_\alpha = (1-\alpha)\,\theta_0 + \alpha\,\theta_1$", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    plots.save(fig, path)


def write_outputs(out_dir: Path, report: dict) -> None:
    """wise.png, wise.md, then wise.json (last: its presence marks a finished evaluation), each atomically."""
    from sdtl.atomic import atomic_write_text
    from sdtl.engine.evaluate import write_json

    plot(report, out_dir / "wise.png")
    atomic_write_text(out_dir / "wise.md", markdown(report))
    write_json(out_dir / "wise.json", report)


# --------------------------------------------------------------------------------------- the CLI
def _cmd(args) -> int:
    alphas = parse_alphas(args.alphas) if args.alphas is not None else DEFAULT_ALPHAS
    report = run_wise(args.finetuned, args.out, pretrained=args.pretrained, alphas=alphas,
                      overrides=args.overrides, allow_unsafe_pickle=args.allow_unsafe_pickle)
    if report:
        print(f"{text_table(report)}\n-> {args.out}/wise.json, wise.md, wise.png")
    return 0


def register(sub) -> None:
    from sdtl.cli_options import add_set

    p = sub.add_parser("wise", help="WiSE-FT: evaluate weight-space ensembles of pre-trained and fine-tuned weights",
                       description="WiSE-FT (Wortsman et al., CVPR 2022): evaluate theta_alpha = (1-alpha)*theta_0 + "
                                   "alpha*theta_1 for each alpha on the run's validation part and on the test list "
                                   "(protocol and dataset from the fine-tuned checkpoint; override with --set). "
                                   "theta_1 is the fine-tuned model; theta_0 is an encoder checkpoint with the "
                                   "fine-tuned model's head, or another fine-tune checkpoint of the same arch and "
                                   "classes. The alpha with the best validation video acc@1 is selected (ties: the "
                                   "largest alpha); test is reported beside it. Writes wise.json, wise.md and "
                                   "wise.png into a new or empty --out.",
                       epilog="example: sdtl wise --finetuned runs/r21d/checkpoints/best.pt --out runs/r21d/wise "
                              "--alphas 0,0.25,0.5,0.75,1")
    p.add_argument("--finetuned", required=True, metavar="CKPT", help="theta_1: a checkpoint of `sdtl finetune`")
    p.add_argument("--pretrained", metavar="CKPT", default=None,
                   help="theta_0: an encoder checkpoint (RSPNet, sdtl pretrain, exported) or a fine-tune "
                        "checkpoint of the same arch and classes (default: the run's model.pretrained)")
    p.add_argument("--alphas", metavar="A,B,...", default=None,
                   help="comma-separated alphas in [0, 1] (default: 0,0.1,...,1; 0 = theta_0, 1 = theta_1)")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty directory for wise.json/md/png")
    add_set(p, "override the checkpoint's config, e.g. --set data.root=/data/UCF101 --set eval.num_clips=10")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="DANGEROUS: load checkpoints that need full unpickling (runs code from the files)")
    p.set_defaults(func=_cmd, resume_hint=RESUME_HINT)
