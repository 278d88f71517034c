"""Multi-clip evaluation: clip- and video-level accuracy, per-class accuracy, confusion matrix.

Protocol (RSPNet's, REFERENCE §3): every test video gives ``num_clips`` clips whose starts are spread
uniformly over the video, each centre-cropped (or 3 crops); the *raw logits* of all its clips are
averaged and the video is scored on that average. Clip-level accuracy scores each clip on its own.
Both are always reported, labelled, with the protocol, because papers often mix them up.

Called by :mod:`sdtl.engine.finetune` (validation each epoch, test at the end) and by
``sdtl evaluate`` (:func:`evaluate_checkpoint`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sdtl.atomic import atomic_savefig, atomic_write_text
from sdtl.data.video_io import decoder_identity
from sdtl.engine import config as cfgmod
from sdtl.engine import distributed as dist_utils
from sdtl.engine.build import build_datasets
from sdtl.engine.distributed import DistInfo, all_gather_objects
from sdtl.engine.runtime import amp_dtype, configure_determinism, ignore_stop_signals, progress
from sdtl.errors import ConfigError, UserError

log = logging.getLogger("sdtl.evaluate")


@dataclass
class EvalOutput:
    metrics: dict
    confusion: list[list[int]]
    failed: list = field(default_factory=list)
    num_videos: int = 0
    num_clips: int = 0


def forward_clips(model, videos: torch.Tensor, clips_per_forward: int, device, amp) -> torch.Tensor:
    """``model`` on the clips ``videos [N, 3, T, S, S]``, ``clips_per_forward`` at a time (autocast to
    ``amp`` when set), as float32 on the CPU: ``[N, ...]``."""
    parts = []
    for start in range(0, videos.shape[0], clips_per_forward):
        chunk = videos[start:start + clips_per_forward].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            parts.append(model(chunk).float().cpu())
    return torch.cat(parts)


def forward_batches(model, loader, clips_per_forward: int, device, amp, bar, failed: list):
    """``(batch, outputs)`` for each batch of a test-mode ``loader`` that holds clips (:func:`forward_clips`
    on them); the progress ``bar`` advances per batch and undecodable videos are appended to ``failed``."""
    for batch in loader:
        bar.update(1)
        failed.extend(batch.get("failed", []))
        if batch["video"].shape[0] == 0:
            continue
        yield batch, forward_clips(model, batch["video"], clips_per_forward, device, amp)


class ShardSampler(torch.utils.data.Sampler):
    """Every rank takes indices rank, rank+W, ... (no padding, so no video is counted twice)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_eval_loader(dataset, clips_per_forward: int, info: DistInfo, workers: int):
    from sdtl.data.datasets import collate_clips

    clips_per_video = max(1, dataset.num_clips * dataset.crops)
    videos_per_batch = max(1, clips_per_forward // clips_per_video)
    return torch.utils.data.DataLoader(
        dataset, batch_size=videos_per_batch, sampler=ShardSampler(len(dataset), info.rank, info.world_size),
        num_workers=workers, collate_fn=collate_clips, pin_memory=info.device.type == "cuda",
        # Evaluation items do not depend on the epoch, so the workers can live across validations
        # (re-spawning them every epoch cost more than validating a small set).
        persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(0))  # not the global RNG


@torch.no_grad()
def evaluate(model, loader, num_classes: int, info: DistInfo, clips_per_forward: int = 16,
             amp_dtype: torch.dtype | None = None, desc: str | None = None) -> EvalOutput:
    """Run ``model`` over a test-mode loader and compute all metrics (gathered over ranks).

    ``desc``: show a progress bar with ETA (rank 0) under that name, e.g. "validation", "test".
    """
    bar = progress(len(loader), desc or "", info.is_main and desc is not None)
    was_training = model.training
    model.eval()
    device = info.device
    video_sum: dict[int, torch.Tensor] = {}
    video_label: dict[int, int] = {}
    clip_top1 = clip_top5 = clip_count = 0
    clip_loss = 0.0
    failed: list = []
    k5 = min(5, num_classes)
    for batch, logits in forward_batches(model, loader, clips_per_forward, device, amp_dtype, bar, failed):
        labels = torch.as_tensor(batch["label"]).long()
        vids = torch.as_tensor(batch["video_index"]).long()
        top = logits.topk(k5, dim=1).indices
        clip_top1 += int((top[:, 0] == labels).sum())
        clip_top5 += int((top == labels[:, None]).any(dim=1).sum())
        clip_count += len(labels)
        clip_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        for v in vids.unique().tolist():
            mask = vids == v
            video_sum[v] = video_sum.get(v, 0) + logits[mask].sum(0)
            video_label[v] = int(labels[mask][0])
    if was_training:
        model.train()

    bar.close()
    shards = all_gather_objects(info, (video_sum, video_label, clip_top1, clip_top5, clip_count,
                                       clip_loss, failed))
    video_sum, video_label, failed = {}, {}, []
    clip_top1 = clip_top5 = clip_count = 0
    clip_loss = 0.0
    for vs, vl, c1, c5, cc, cl, fl in shards:
        video_sum.update(vs)
        video_label.update(vl)
        clip_top1 += c1
        clip_top5 += c5
        clip_count += cc
        clip_loss += cl
        failed.extend(fl)
    return summarise(video_sum, video_label, num_classes, clip_top1, clip_top5, clip_count, clip_loss,
                     failed)


def summarise(video_sum: dict, video_label: dict, num_classes: int, clip_top1: int, clip_top5: int,
              clip_count: int, clip_loss: float, failed: list) -> EvalOutput:
    """Turn per-video logit sums into the metric dict (percentages)."""
    confusion = [[0] * num_classes for _ in range(num_classes)]
    v_top1 = v_top5 = 0
    k5 = min(5, num_classes)
    for v, total in video_sum.items():
        label = video_label[v]
        top = total.topk(k5).indices.tolist()
        confusion[label][top[0]] += 1
        v_top1 += int(top[0] == label)
        v_top5 += int(label in top)
    n = len(video_sum)
    per_class = []
    for c in range(num_classes):
        support = sum(confusion[c])
        per_class.append(100.0 * confusion[c][c] / support if support else float("nan"))
    present = [a for a in per_class if not math.isnan(a)]
    pct = (lambda a, b: 100.0 * a / b if b else float("nan"))
    metrics = {
        "video_acc1": pct(v_top1, n), "video_acc5": pct(v_top5, n),
        "clip_acc1": pct(clip_top1, clip_count), "clip_acc5": pct(clip_top5, clip_count),
        "mean_class_acc": sum(present) / len(present) if present else float("nan"),
        "loss": clip_loss / clip_count if clip_count else float("nan"),
        "per_class_acc": per_class,
    }
    return EvalOutput(metrics=metrics, confusion=confusion, failed=failed, num_videos=n,
                      num_clips=clip_count)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    side = min(max(4.0, 0.28 * n + 2), 30.0)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=max(4, 9 - n // 15))
        ax.set_yticks(range(n), class_names, fontsize=max(4, 9 - n // 15))
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically so a killed run never leaves half a file."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def final_test(cfg, model, test_ds, classes, out_dir: Path, info, best: dict, counts: dict | None = None) -> dict | None:
    """Test the selected and the last checkpoint; write results.json and confusion.png."""
    from sdtl.models.checkpoints import safe_load

    ckpt_dir = out_dir / "checkpoints"
    eval_bs = cfg.eval.batch_size or cfg.data.batch_size
    loader = make_eval_loader(test_ds, eval_bs, info, cfg.data.workers)
    dtype = amp_dtype(cfg.optim.amp, info.device)
    outputs = {}
    for tag, path in (("selected", ckpt_dir / "best.pt"), ("last", ckpt_dir / "last.pt")):
        if not path.exists():
            continue
        state = safe_load(path)
        if tag == "last" and "selected" in outputs and outputs["selected"][1] == state["epoch"]:
            # The selected checkpoint is the last one: same weights, same test; don't run it twice.
            outputs[tag] = (outputs["selected"][0], state["epoch"], path, 0.0)
            continue
        model.load_state_dict(state["model"])
        t0 = time.perf_counter()
        outputs[tag] = (evaluate(model, loader, len(classes), info, eval_bs, dtype,
                                 desc=f"test ({tag} checkpoint)" if cfg.run.progress else None), state["epoch"], path,
                        time.perf_counter() - t0)
    if "selected" not in outputs:
        outputs["selected"] = outputs["last"]
    if not info.is_main:
        return None
    return write_results(out_dir, cfg, classes, outputs, best, test_ds, counts)


def protocol(cfg, split_name: str, checkpoint: str, epoch: int, selected_by: str) -> dict:
    return {
        "split": f"{cfg.data.dataset} split {cfg.data.split} ({split_name} list)",
        "views": cfg.eval.num_clips, "crops": cfg.eval.crops,
        "crop": "centre square (side = min(H, W)) resized to %d" % cfg.data.size
        if cfg.eval.crops == 1 else "3 square crops along the long side, resized to %d" % cfg.data.size,
        "clip": f"{cfg.data.clip_len} frames, stride {cfg.data.stride}",
        "decoder": decoder_identity(cfg.data.backend),
        "aggregation": "mean of raw logits over all clips of a video",
        "checkpoint": checkpoint, "epoch": epoch, "selected_by": selected_by,
    }


def write_results(out_dir: Path, cfg, classes, outputs: dict, best: dict, test_ds, counts: dict | None = None) -> dict:
    sel, sel_epoch, sel_path, sel_time = outputs["selected"]
    last, last_epoch, last_path, _ = outputs["last"]
    rel = (lambda p: str(Path(p).relative_to(out_dir)) if Path(p).is_relative_to(out_dir) else str(p))
    selected_by = (f"best {best['metric']} on the validation part of the training list"
                   if best.get("epoch") and cfg.eval.select != "last" else "last epoch")
    metrics = {k: v for k, v in sel.metrics.items() if k != "per_class_acc"}
    results = {
        **metrics,
        "protocol": protocol(cfg, "test", rel(sel_path), sel_epoch, selected_by),
        "per_class_acc": dict(zip(classes, sel.metrics["per_class_acc"])),
        "num_test_videos": sel.num_videos, "num_test_clips": sel.num_clips, **(counts or {}),
        "skipped_corrupt": len(sel.failed), "eval_time_s": sel_time,
        "selected": {"checkpoint": rel(sel_path), "epoch": sel_epoch, **metrics},
        "last": {"checkpoint": rel(last_path), "epoch": last_epoch,
                 **{k: v for k, v in last.metrics.items() if k != "per_class_acc"}},
        "regularizer": cfgmod.to_dict(cfg)["regularizer"],
        "pretrained": cfg.model.pretrained,
        "_failed": sel.failed,
    }
    if not sel.failed or cfg.eval.skip_corrupt:
        write_json(out_dir / "results.json", {k: v for k, v in results.items() if k != "_failed"})
        plot_confusion(sel.confusion, list(classes), out_dir / "confusion.png",
                       f"video-level confusion (epoch {sel_epoch}, acc@1 {metrics['video_acc1']:.1f}%)")
        log.info("test (selected, epoch %d): %s", sel_epoch, accuracy_line(metrics, len(classes)))
    return results


def acc5_informative(num_classes: int) -> bool:
    """Whether acc@5 says anything: with 5 classes or fewer it is always 100, so it is not printed."""
    return num_classes > 5


def accuracy_line(metrics: dict, num_classes: int) -> str:
    """``video acc@1 … | clip acc@1 … | mean-class …`` (acc@5 only with more than 5 classes, where it
    can be below 100)."""
    acc5 = f" acc@5 {metrics['video_acc5']:.2f}" if acc5_informative(num_classes) else ""
    return (f"video acc@1 {metrics['video_acc1']:.2f}{acc5} | clip acc@1 {metrics['clip_acc1']:.2f} | "
            f"mean-class {metrics['mean_class_acc']:.2f}")


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, overrides: list[str] | None = None,
                        allow_unsafe_pickle: bool = False) -> dict:
    """``sdtl evaluate``: test a fine-tuned checkpoint with the protocol recorded in it."""
    from sdtl.engine.rundir import remove_if_only_bookkeeping
    from sdtl.engine.runlock import rank0_lock

    out_dir = Path(out_dir)
    _refuse_existing_results(out_dir)
    created = not out_dir.exists()
    try:
        with rank0_lock(out_dir, "evaluate"):
            return _evaluate_checkpoint(checkpoint, out_dir, overrides, allow_unsafe_pickle)
    except UserError:
        if created and out_dir.is_dir():
            remove_if_only_bookkeeping(out_dir)  # bad input leaves no folder behind
        raise


def _refuse_existing_results(out_dir: Path) -> None:
    # evaluate writes these two names; never over a file it did not write in this call.
    taken = [name for name in ("results.json", "confusion.png") if (out_dir / name).exists()]
    if taken:
        raise UserError(f"{out_dir}: already holds {' and '.join(taken)}; choose another output folder")


def checkpoint_config(payload: dict, overrides: list[str] | None = None):
    """The config stored in a fine-tune checkpoint, with ``overrides`` (``key=value``) applied and validated."""
    base = payload.get("config") or {}
    merged = cfgmod._merge(base, cfgmod.parse_overrides(overrides))
    cfg = cfgmod.absolute_paths(cfgmod.config_from_dict(merged, "finetune"))  # override paths as typed here
    cfgmod.validate_ranges(cfg)
    return cfg


def check_checkpoint_data(what: str, payload: dict, cfg, classes, info) -> None:
    """Refuse a dataset whose classes differ from the checkpoint's; warn about a different decoder."""
    if list(classes) != list(payload.get("class_names", classes)):
        raise ConfigError("data.root", f"the classes of the test list of {cfg.data.root} differ from those of {what}",
                          "evaluate on the dataset it was trained on")
    trained_with, evaluating_with = payload.get("decoder"), decoder_identity(cfg.data.backend)
    if trained_with and trained_with != evaluating_with and info.is_main:
        log.warning("the checkpoint was trained on frames decoded by %s, this evaluation decodes with %s: "
                    "pixels can differ by 1-2 levels between decoders; to match, set the config key data.backend=%s",
                    trained_with, evaluating_with, trained_with.split()[0])


def _evaluate_checkpoint(checkpoint, out_dir: Path, overrides, allow_unsafe_pickle: bool) -> dict:
    from sdtl.data.corrupt import check_failures
    from sdtl.models.checkpoints import build_model_from_checkpoint

    _refuse_existing_results(out_dir)  # written by a process that held the lock before us
    model, payload = build_model_from_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    cfg = checkpoint_config(payload, overrides)
    info = dist_utils.setup(cfg.run.device)
    try:
        configure_determinism(cfg.run.deterministic, cfg.run.threads)
        _, _, test_ds, classes = build_datasets(cfg, need_train=False)
        check_checkpoint_data(f"the checkpoint {checkpoint}", payload, cfg, classes, info)
        model.to(info.device)
        eval_bs = cfg.eval.batch_size or cfg.data.batch_size
        loader = make_eval_loader(test_ds, eval_bs, info, cfg.data.workers)
        t0 = time.perf_counter()
        out = evaluate(model, loader, len(classes), info, eval_bs, amp_dtype(cfg.optim.amp, info.device),
                       desc="test" if cfg.run.progress else None)
        elapsed = time.perf_counter() - t0
        if not info.is_main:
            return {}
        skipped = check_failures(out.failed, skip=cfg.eval.skip_corrupt)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: v for k, v in out.metrics.items() if k != "per_class_acc"}
        results = {**metrics,
                   "protocol": protocol(cfg, "test", str(Path(checkpoint).resolve()), payload.get("epoch"),
                                        "given checkpoint"),
                   "per_class_acc": dict(zip(classes, out.metrics["per_class_acc"])),
                   "num_test_videos": out.num_videos, "num_test_clips": out.num_clips,
                   "skipped_corrupt": skipped or 0, "eval_time_s": elapsed}
        write_json(out_dir / "results.json", results)
        plot_confusion(out.confusion, list(classes), out_dir / "confusion.png",
                       f"video-level confusion (acc@1 {metrics['video_acc1']:.1f}%)")
        return results
    finally:
        dist_utils.teardown()
