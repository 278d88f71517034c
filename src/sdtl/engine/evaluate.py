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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sdtl.atomic import atomic_savefig, atomic_write_text
from sdtl.engine.distributed import DistInfo, all_gather_objects


@dataclass
class EvalOutput:
    metrics: dict
    confusion: list[list[int]]
    failed: list = field(default_factory=list)
    num_videos: int = 0
    num_clips: int = 0


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
        persistent_workers=workers > 0)


@torch.no_grad()
def evaluate(model, loader, num_classes: int, info: DistInfo, clips_per_forward: int = 16,
             amp_dtype: torch.dtype | None = None, desc: str | None = None) -> EvalOutput:
    """Run ``model`` over a test-mode loader and compute all metrics (gathered over ranks).

    ``desc``: show a progress bar with ETA (rank 0) under that name, e.g. "validation", "test".
    """
    from sdtl.engine.training import progress

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
    for batch in loader:
        bar.update(1)
        failed.extend(batch.get("failed", []))
        videos = batch["video"]
        if videos.shape[0] == 0:
            continue
        logits_parts = []
        for start in range(0, videos.shape[0], clips_per_forward):
            chunk = videos[start:start + clips_per_forward].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits_parts.append(model(chunk).float().cpu())
        logits = torch.cat(logits_parts)
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
