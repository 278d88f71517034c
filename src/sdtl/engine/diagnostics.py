"""Forgetting diagnostics: how far the encoder has moved from where fine-tuning started, and how
much of its pre-trained skill is left.

Self-distillation exists to slow forgetting, so sdtl measures forgetting every epoch on fixed probe
clips (REFERENCE §7). Two probes:

:class:`ForgettingProbe` (``OUT/probe.pt``) — fixed centre clips of training videos:

* ``feat_drift``: ``mean‖f_t − f_0‖² / mean‖f_0‖²``, relative feature drift from the *initial*
  (pre-trained) encoder; exactly 0 before the first step;
* ``epoch_drift``: the same from the previous epoch's encoder (the self-distillation teacher);
* ``feat_cos``: mean cosine similarity of ``f_t`` and ``f_0``; ``feat_cka``: their linear CKA;
* ``param_drift``: ``‖θ_t − θ_0‖ / ‖θ_0‖`` over the encoder's parameters.

:class:`RetentionProbe` (``eval.retention`` → a ``retention_probe.pt`` written by ``sdtl pretrain``
or ``sdtl demo``) — clips of the *pre-training* data with their pretext labels (e.g. the playback
speed) and the pretext head as pre-training left it, frozen:

* ``retention_acc``: accuracy of that frozen head on the current encoder's features, i.e. how much
  of the pre-trained skill the encoder still has. At the start it is the pretext accuracy; a
  random-init encoder scores about chance.

**BatchNorm.** Every probe forward normalises with the *probe batch's own statistics* (BatchNorm in
training mode, its running buffers saved and restored, so nothing about the model changes). Eval mode
would use running statistics, which lag fast-moving weights by orders of magnitude early in
fine-tuning (and are meaningless for a random-init encoder): measured drifts of 1e5-1e20 that said
nothing about the weights. With batch statistics on both sides of every comparison the numbers are
finite, comparable across methods, and 0 exactly when the weights have not moved. The probe clips are
always encoded in the same fixed chunks, so the batch statistics are reproducible.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

PROBE_CHUNK = 16  # clips per probe forward; fixed so batch statistics are reproducible


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment between two feature matrices ``[N, D1]``, ``[N, D2]``."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (x.T @ y).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm) if norm > 0 else float("nan")


def relative_drift(f: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.double().pow(2).sum(1).mean()
    return float((f.double() - ref.double()).pow(2).sum(1).mean() / denom) if denom > 0 else float("nan")


@contextlib.contextmanager
def batch_statistics(module: nn.Module):
    """Run ``module`` with BatchNorm normalising by batch statistics, leaving no trace.

    Everything else is in eval mode (no dropout); BatchNorm layers are switched to training mode and
    their running buffers are restored afterwards, so the model is bit-identical before and after.
    """
    was_training = module.training
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    module.eval()
    for m in bns:
        m.train()
    try:
        yield module
    finally:
        for m, buffers in zip(bns, saved):
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        module.train(was_training)


@torch.no_grad()
def encode(encoder: nn.Module, clips: torch.Tensor, device: torch.device, chunk: int = PROBE_CHUNK) -> torch.Tensor:
    """Features ``[N, D]`` of probe clips, with batch-statistics BatchNorm (see module docstring)."""
    if len(clips) == 0:
        return torch.empty(0)
    with batch_statistics(encoder):
        out = [encoder(clips[i:i + chunk].to(device)).float().cpu() for i in range(0, len(clips), chunk)]
    return torch.cat(out)


class RetentionProbe:
    """Pretext clips + labels + the frozen pretext head: how much pre-trained skill is left."""

    FORMAT = "sdtl-retention-probe"

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor, head_state: dict, task: str,
                 task_options: dict, source: str = "") -> None:
        self.clips, self.labels = clips, labels.long()
        self.head_state, self.task, self.task_options, self.source = head_state, task, task_options, source
        weight = head_state["weight"]
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        self.head.load_state_dict(head_state)
        self.head.requires_grad_(False)

    @property
    def chance(self) -> float:
        return 100.0 / self.head.out_features

    @torch.no_grad()
    def accuracy(self, encoder: nn.Module, device: torch.device) -> float:
        feats = encode(encoder, self.clips, device)
        if feats.shape[1] != self.head.in_features:
            raise ValueError(f"retention probe head expects {self.head.in_features}-d features, "
                             f"the encoder gives {feats.shape[1]}")
        pred = self.head(feats).argmax(1)
        return 100.0 * float((pred == self.labels).float().mean())

    def save(self, path: Path) -> None:
        from sdtl.models.checkpoints import save_checkpoint

        save_checkpoint({"sdtl_format": self.FORMAT, "version": 1, "clips": self.clips, "labels": self.labels,
                         "head": self.head_state, "task": self.task, "task_options": self.task_options,
                         "source": self.source}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "RetentionProbe":
        from sdtl.errors import ConfigError

        path = Path(path)
        if not path.is_file():
            raise ConfigError("eval.retention", f"{path} not found", "give a retention_probe.pt written by "
                              "`sdtl pretrain` (in its run folder), or leave eval.retention empty")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise ConfigError("eval.retention", f"{path} is not readable ({(str(exc).splitlines() or [''])[0]})",
                              "regenerate it with `sdtl pretrain` or leave eval.retention empty") from exc
        if not isinstance(obj, dict) or obj.get("sdtl_format") != cls.FORMAT:
            raise ConfigError("eval.retention", f"{path} is not a retention probe written by sdtl",
                              "give the retention_probe.pt of an `sdtl pretrain` run")
        return cls(obj["clips"], obj["labels"], obj["head"], obj["task"], obj["task_options"], obj.get("source", ""))


def make_retention_probe(pretrain_checkpoint: str | Path, videos: list[Path], size: int, backend: str,
                         crop_area: tuple[float, float], clips_per_class: int = 16, seed: int = 0) -> RetentionProbe:
    """Build the retention probe of an ``sdtl pretrain`` checkpoint from pre-training videos.

    Pretext clips are drawn deterministically (seeded) from ``videos`` until every pretext class has
    ``clips_per_class`` clips, with the pre-training augmentation; the head is the checkpoint's.
    """
    from sdtl.data.datasets import ClipDataset
    from sdtl.pretext import PRETEXT_TASKS
    from sdtl.pretext.dataset import PretextSampler

    ckpt = torch.load(pretrain_checkpoint, map_location="cpu", weights_only=True)
    task_name, strides = ckpt["task"], ckpt["task_options"]["strides"]
    data_cfg = ckpt.get("config", {}).get("data", {})
    clip_len = int(data_cfg.get("clip_len", 16))
    norm = (tuple(data_cfg["mean"]), tuple(data_cfg["std"])) if data_cfg.get("mean") else None  # pre-1.x: ImageNet
    task = PRETEXT_TASKS[task_name](strides, clip_len)
    ds = ClipDataset(list(videos), PretextSampler(task, size, crop_area, norm), backend=backend, seed=seed + 104729)
    per_class: dict[int, list[torch.Tensor]] = {k: [] for k in range(task.num_outputs)}
    draws = ((draw, i) for draw in range(64) for i in range(len(ds)))  # a new seeded draw per round
    for draw, i in draws:
        if all(len(b) >= clips_per_class for b in per_class.values()):
            break
        ds.set_epoch(draw)
        item = ds[i]
        if len(per_class[item["label"]]) < clips_per_class:
            per_class[item["label"]].append(item["video"])
    # Interleave the classes: every probe chunk then holds all of them, as a training batch does.
    # Sorted by class, a chunk's batch statistics would normalise the class difference away (a
    # pre-trained encoder measured 23% instead of its 78% pretext accuracy that way).
    order = [(k, j) for j in range(clips_per_class) for k in sorted(per_class)]
    clips = [per_class[k][j] for k, j in order]
    labels = torch.tensor([k for k, _ in order])
    return RetentionProbe(torch.stack(clips), labels, ckpt["head"], task_name, {"strides": list(strides)},
                          source=str(pretrain_checkpoint))


class ForgettingProbe:
    def __init__(self, clips: torch.Tensor, ref_features: torch.Tensor, ref_params: dict[str, torch.Tensor],
                 prev_features: torch.Tensor | None = None, retention: RetentionProbe | None = None) -> None:
        self.clips = clips
        self.ref_features = ref_features
        self.ref_params = ref_params
        self.prev_features = prev_features if prev_features is not None else ref_features
        self.retention = retention

    @classmethod
    def build(cls, encoder: nn.Module, clips: torch.Tensor, device: torch.device,
              retention: RetentionProbe | None = None) -> "ForgettingProbe":
        feats = encode(encoder, clips, device)
        params = {k: v.detach().cpu().clone() for k, v in encoder.named_parameters()}
        return cls(clips, feats, params, retention=retention)

    def save(self, path: Path) -> None:
        from sdtl.models.checkpoints import save_checkpoint

        save_checkpoint({"clips": self.clips, "ref_features": self.ref_features, "ref_params": self.ref_params,
                         "chunk": PROBE_CHUNK, "bn": "batch"}, Path(path))

    @classmethod
    def load(cls, path: Path, prev_features: torch.Tensor | None = None,
             retention: RetentionProbe | None = None) -> "ForgettingProbe":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return cls(obj["clips"], obj["ref_features"], obj["ref_params"], prev_features, retention)

    def measure(self, encoder: nn.Module, device: torch.device, advance: bool = True) -> dict:
        """The diagnostics of ``encoder`` now; ``advance`` makes these features the next epoch's anchor."""
        feats = encode(encoder, self.clips, device) if len(self.clips) else torch.empty(0)
        out: dict[str, float] = {}
        if len(self.clips):
            cos = torch.nn.functional.cosine_similarity(feats.double(), self.ref_features.double(), dim=1).mean()
            out.update({
                "feat_drift": relative_drift(feats, self.ref_features),
                "feat_cos": float(cos),
                "feat_cka": linear_cka(self.ref_features, feats),
                "epoch_drift": relative_drift(feats, self.prev_features),
            })
        num = den = 0.0
        for name, p in encoder.named_parameters():
            p0 = self.ref_params[name]
            num += float((p.detach().cpu().double() - p0.double()).pow(2).sum())
            den += float(p0.double().pow(2).sum())
        out["param_drift"] = (num ** 0.5) / (den ** 0.5) if den > 0 else float("nan")
        if self.retention is not None:
            out["retention_acc"] = self.retention.accuracy(encoder, device)
        if advance and len(self.clips):
            self.prev_features = feats
        return out
