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
  × ``eval.crops``), with ``--set`` overrides as in ``sdtl evaluate``. A ``--set`` that changes a key
  drawing the validation part from the training list (:data:`SPLIT_KEYS`: ``data.val_fraction``,
  ``run.seed``, ``data.split``) is refused (:func:`check_split_overrides`): another split would
  score α on videos the run trained on, and ignoring an explicit ``--set`` behind a warning would
  report figures for a protocol the user did not ask for.
- Selection rule (:data:`SELECTION_RULE`): the α with the highest validation video acc@1; ties go
  to the largest α, i.e. the one closest to the fine-tuned model. The test figures are reported
  beside it and never used to choose.

Writes ``wise.json``, ``wise.md`` and ``wise.png`` into a new or empty ``--out`` folder.

Decoding once: the data pipeline is ``evaluate``'s (same datasets, loaders, clips, crops and
normalisation). The first α's pass over each list keeps every batch the loader gave
(:class:`DecodedOnce`); the other α replay those very tensors, so each video is decoded once for the
whole sweep and every α is scored bit-identically to a pass of its own. The kept clips cost
``clips × 3 × T × S × S`` float32 values per process, ``clips`` = videos of the process's shard ×
clips per video (``eval.val_clips`` for the validation part, ``eval.num_clips × eval.crops`` for the
test list): 4·3·16·112² bytes ≈ 2.4 MB a clip at 16 × 112², so UCF101's validation part (≈ 950
videos × 3 clips) holds ≈ 6.9 GB and its test list (3,783 × 10 clips) ≈ 91 GB. A list is kept only
when it fits the budget (:func:`cache_budget`: ``--cache-gib``, default :data:`DEFAULT_CACHE_GIB`
GiB per process, and never more than half the memory available to the processes of this machine);
the validation part is considered first, then the test list with what is left. A list that does not
fit is decoded again for every α, as before, and the log says so with the size it would have needed.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
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
#: Keys that choose which training videos form the validation part: ``--set`` may not change them.
SPLIT_KEYS = ("data.val_fraction", "run.seed", "data.split")
#: Default budget (GiB per process) for the decoded clips kept across alphas (``--cache-gib``).
DEFAULT_CACHE_GIB = 8.0


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
        raise UserError(f"{source} {exc.template}") from None
    fmt = detect_format(obj)
    if fmt == "sdtl-finetune":
        del obj
        try:
            model0, payload0 = build_model_from_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
        except UserError as exc:
            raise UserError(f"{source} {exc.template}") from None
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


# ------------------------------------------------------------------------ the validation split
def check_split_overrides(payload: dict, cfg, what: str) -> None:
    """Refuse a ``--set`` that changes a :data:`SPLIT_KEYS` key from the value stored in the run.

    The validation part is drawn from the training list with those keys; another value draws other
    videos, some of which the run trained on, and α would be chosen on them. Setting a key to the
    run's own value is allowed (it changes nothing).
    """
    from sdtl.engine.config import config_from_dict

    stored = config_from_dict(payload.get("config") or {}, "finetune")
    for key in SPLIT_KEYS:
        section, name = key.split(".")
        ours, given = getattr(getattr(stored, section), name), getattr(getattr(cfg, section), name)
        if given != ours:
            raise UserError(f"--set {key}={given}: {what} holds out its validation part with {key}={ours}; "
                            f"another value would choose alpha on videos the run trained on; drop this --set")


# ------------------------------------------------------------------------- decoding once
class DecodedOnce:
    """An evaluation loader whose first complete pass is kept; later passes replay it, decoding nothing.

    The kept batches are the loader's own objects (``video [clips, 3, T, S, S]`` float32, labels,
    video indices, failures), in the loader's order and grouping, so ``evaluate`` over a replay is
    bit-identical to ``evaluate`` over a new pass of the loader. A pass that stops early keeps
    nothing: the next one decodes again. After the first pass the loader is dropped (and with it any
    persistent workers).
    """

    def __init__(self, loader) -> None:
        self._loader = loader
        self._length = len(loader)
        self._batches: list | None = None

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        if self._batches is not None:
            yield from self._batches
            return
        kept = []
        for batch in self._loader:
            kept.append(batch)
            yield batch
        self._batches, self._loader = kept, None


def decoded_bytes(loader) -> int:
    """Bytes of the float32 clips one pass of an evaluation ``loader`` yields on this process:
    videos of its shard × clips per video × 3 × T × S × S × 4 (an upper bound: a video that cannot be
    decoded gives no clips)."""
    ds = loader.dataset
    clips = len(loader.sampler) * ds.num_clips * ds.crops
    return clips * 3 * ds.clip_len * ds.size * ds.size * 4


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cache_budget(cache_gib: float) -> tuple[int, str]:
    """Bytes of decoded clips this process may keep, and where the limit comes from.

    ``cache_gib`` GiB, but never more than half of the memory available on this machine shared by
    its processes (torchrun's ``LOCAL_WORLD_SIZE``); 0 keeps nothing.
    """
    limit, why = int(cache_gib * 2 ** 30), f"--cache-gib {cache_gib:g}"
    available = _mem_available()
    if available is not None and limit > 0:
        try:
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        except ValueError:
            local = 1
        share = available // (2 * local)
        if share < limit:
            limit = share
            why = (f"half of the {available / 2 ** 30:.1f} GiB of memory available"
                   + (f", shared by {local} processes" if local > 1 else ""))
    return limit, why


def check_cache_gib(cache_gib) -> float:
    """``--cache-gib`` as a float; anything but a finite number >= 0 is a :class:`UserError`."""
    try:
        value = float(cache_gib)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 0 or math.isinf(value):
        shown = f"{cache_gib:g}" if isinstance(cache_gib, (int, float)) else str(cache_gib)
        raise UserError(f"--cache-gib {shown}: must be a number >= 0 (GiB of decoded clips kept across "
                        f"alphas per process; 0 decodes every list again for each alpha)")
    return value


def keep_decoded(loaders: dict, budget: int, why: str, alphas, info) -> dict:
    """Wrap each loader whose decoded clips fit the remaining ``budget`` in :class:`DecodedOnce` (in
    order: the validation part first); log what is kept and what is decoded again for every alpha."""
    if len(alphas) < 2:
        return loaders
    out = {}
    for part, loader in loaders.items():
        need = decoded_bytes(loader)
        if need <= budget:
            budget -= need
            out[part] = DecodedOnce(loader)
            if info.is_main:
                log.info("%s: decoding once for all %d alphas, keeping %.2f GiB of clips in memory", part,
                         len(alphas), need / 2 ** 30)
        else:
            out[part] = loader
            if info.is_main:
                log.warning("%s: its decoded clips would take %.2f GiB, more than the %.2f GiB left (%s); "
                            "decoding it again for each of the %d alphas (raise --cache-gib to keep it)", part,
                            need / 2 ** 30, max(budget, 0) / 2 ** 30, why, len(alphas))
    return out


# ------------------------------------------------------------------------------- the evaluation
def claim(out_dir: Path) -> None:
    """``--out`` must be new or empty: a report is written once, never over another (or a finished one)."""
    from sdtl.studies import core

    core.claim_out(out_dir, "wise", "wise.json", reuse=False)


def run_wise(finetuned, out_dir, pretrained=None, alphas=DEFAULT_ALPHAS, overrides: list[str] | None = None,
             allow_unsafe_pickle: bool = False, cache_gib: float = DEFAULT_CACHE_GIB) -> dict:
    """``sdtl wise``: evaluate θ_α for every alpha, write wise.json / wise.md / wise.png into ``out_dir``.

    ``cache_gib``: GiB of decoded clips each process may keep so that every video is decoded once for
    all alphas (see the module's docstring); 0 decodes every list again for each alpha.
    Returns the report (the content of wise.json) on rank 0, ``{}`` on the other ranks.
    Bad input raises :class:`UserError` before anything is written (and leaves no folder behind).
    """
    from sdtl.engine.runlock import rank0_lock
    from sdtl.studies import core

    alphas = check_alphas(alphas, "--alphas")
    cache_gib = check_cache_gib(cache_gib)
    out_dir = Path(out_dir)
    with core.study_folder(out_dir, "wise", lambda: claim(out_dir), lock=rank0_lock):
        return _run_wise(Path(finetuned), out_dir, pretrained, alphas, overrides, allow_unsafe_pickle, cache_gib)


def _run_wise(finetuned: Path, out_dir: Path, pretrained, alphas, overrides, allow_unsafe_pickle,
              cache_gib: float = DEFAULT_CACHE_GIB) -> dict:
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
        raise UserError(f"--finetuned {exc.template}") from None
    cfg = checkpoint_config(payload, overrides)
    check_split_overrides(payload, cfg, f"--finetuned {finetuned}")
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
        loaders = keep_decoded(loaders, *cache_budget(cache_gib), alphas, info)
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
                      overrides=args.overrides, allow_unsafe_pickle=args.allow_unsafe_pickle,
                      cache_gib=args.cache_gib)
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
    p.add_argument("--cache-gib", type=float, default=DEFAULT_CACHE_GIB, metavar="G",
                   help=f"GiB of decoded clips each process keeps so that every video is decoded once for all "
                        f"alphas (default {DEFAULT_CACHE_GIB:g}, capped at half the available memory); a list "
                        f"that does not fit is decoded again per alpha; 0 keeps nothing")
    add_set(p, "override the checkpoint's config, e.g. --set data.root=/data/UCF101 --set eval.num_clips=10 "
               "(not data.val_fraction, run.seed or data.split: alpha is chosen on the run's own validation part)")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="DANGEROUS: load checkpoints that need full unpickling (runs code from the files)")
    p.set_defaults(func=_cmd, resume_hint=RESUME_HINT)
