"""Building a fine-tuning run from its config: the datasets (train / validation / test, from lists
only), the classifier with its pre-trained encoder, the probe clips and the regularizer.
"""
from __future__ import annotations

import logging
import time

import torch

from sdtl.errors import UserError
from sdtl.models.classifier import model_options
from sdtl.regularizers import DELTA, Regularizer, build_regularizer

log = logging.getLogger("sdtl.finetune")


def build_datasets(cfg, need_train: bool = True):
    """(train, val, test) datasets and the class names, from lists only (no decoding)."""
    from sdtl.data.datasets import VideoClipDataset, list_records, stratified_split

    d = cfg.data
    if not d.root:
        raise UserError("config key data.root: empty; point it at the dataset folder, e.g. "
                        "--set data.root=/data/UCF101 (for the demo data: `sdtl synth --out DIR` first)")
    common = dict(clip_len=d.clip_len, stride=d.stride, size=d.size, backend=d.backend, seed=cfg.run.seed)
    test_records, classes = list_records(d.dataset, d.root, split=d.split, subset="test",
                                         lists_dir=d.lists_dir, on_missing=d.on_missing)
    test = VideoClipDataset(test_records, classes, mode="test", num_clips=cfg.eval.num_clips,
                            crops=cfg.eval.crops, skip_corrupt=True, **common)
    if not need_train:
        return None, None, test, classes
    records, train_classes = list_records(d.dataset, d.root, split=d.split, subset="train",
                                          lists_dir=d.lists_dir, on_missing=d.on_missing)
    if list(train_classes) != list(classes):
        raise UserError(f"data.root {d.root}: train and test lists disagree on the classes; check the "
                        f"split lists")
    if d.val_fraction > 0:
        train_records, val_records = stratified_split(records, fraction=d.val_fraction, seed=cfg.run.seed)
    else:
        train_records, val_records = records, []
    train = VideoClipDataset(train_records, classes, mode="train", skip_corrupt=True,
                             crop_area=tuple(d.crop_area), **common)
    val = (VideoClipDataset(val_records, classes, mode="test", num_clips=cfg.eval.val_clips, crops=1,
                            skip_corrupt=True, **common) if val_records else None)
    return train, val, test, classes


def build_classifier(cfg, num_classes: int, load_pretrained: bool = True):
    from sdtl.models import build_model
    from sdtl.models.checkpoints import load_encoder_weights

    model = build_model(cfg.model.arch, num_classes, **model_options(cfg))
    report = None
    if load_pretrained and cfg.model.pretrained:
        report = load_encoder_weights(model.encoder, cfg.model.pretrained, cfg.model.arch,
                                      allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    return model, report


def _probe_clips(cfg, train_ds, classes, count: int | None = None, salt: int = 7919):
    """A fixed batch of centre clips from training videos (the same for every epoch and resume) and
    their labels: ``(clips [N, C, T, H, W], labels [N])``."""
    from sdtl.data.datasets import VideoClipDataset

    g = torch.Generator().manual_seed(cfg.run.seed + salt)
    order = torch.randperm(len(train_ds.records), generator=g).tolist()
    chosen = [train_ds.records[i] for i in order[: cfg.eval.probe_videos if count is None else count]]
    ds = VideoClipDataset(chosen, classes, mode="test", num_clips=1, crops=1, clip_len=cfg.data.clip_len,
                          stride=cfg.data.stride, size=cfg.data.size, backend=cfg.data.backend,
                          seed=cfg.run.seed, skip_corrupt=True)
    items = [ds[i] for i in range(len(ds))]
    items = [it for it in items if it["video"].shape[0] > 0]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return (torch.stack([it["video"][0] for it in items]),
            torch.as_tensor([int(it["label"]) for it in items], dtype=torch.long))


def build_run_regularizer(cfg, model, train_ds, classes, state, info) -> Regularizer | None:
    """The configured regularizer on the model as loaded; on resume, its state from the checkpoint.

    DELTA's channel attention is computed here once (fresh runs) and stored in checkpoints.
    """
    r = cfg.regularizer
    try:
        reg = build_regularizer(r, model.encoder, model.head)
    except ValueError as exc:
        raise UserError(f"config section regularizer: {exc}") from None
    if reg is None:
        return None
    reg.to(info.device)
    if state is not None:
        try:
            reg.load_checkpoint_state(state.get("regularizer_state"))
        except ValueError as exc:
            raise UserError(f"--resume: cannot restore the {r.name} regularizer ({exc}); resume with the "
                            f"run's own config") from None
    elif isinstance(reg, DELTA) and r.attention == "channel":
        t0 = time.perf_counter()
        clips, labels = _probe_clips(cfg, train_ds, classes, count=r.attention_samples, salt=104729)
        reg.compute_attention(clips, labels, len(classes), batch_size=cfg.data.batch_size, seed=cfg.run.seed)
        if info.is_main:
            log.info("DELTA channel attention from %d clips over %s in %.1f s", len(clips), reg.layers,
                     time.perf_counter() - t0)
    return reg


def describe_method(cfg) -> str:
    """One line naming the method of a run: regularizer (or plain), LP-FT, layer-wise decay."""
    r, o = cfg.regularizer, cfg.optim
    if r.name == "none" or r.weight == 0:
        out = "plain fine-tuning (no regularizer)"
    elif r.name == "sd":
        every = f", teacher refreshed every {r.snapshot_every} steps" if r.snapshot_every else ""
        out = f"self-distillation λ={r.weight:g} ({r.reduction}, teacher BN {r.teacher_bn}{every})"
    elif r.name == "fixed_teacher":
        out = f"distillation from the fixed pre-trained encoder λ={r.weight:g} ({r.reduction}, teacher BN {r.teacher_bn})"
    elif r.name == "ema_sd":
        out = f"self-distillation from an EMA teacher λ={r.weight:g} (decay {r.ema_decay:g}, {r.reduction})"
    elif r.name == "l2sp":
        out = f"L2-SP α={r.weight:g} β={r.head_weight:g}"
    elif r.name == "delta":
        out = f"DELTA α={r.weight:g} β={r.head_weight:g} (attention {r.attention})"
    else:
        out = f"BSS η={r.weight:g} k={r.k}"
    if o.lp_epochs:
        out += f" | LP-FT: head alone for {o.lp_epochs} epoch(s)"
    if o.layer_decay < 1:
        out += f" | layer-wise lr decay {o.layer_decay:g}"
    return out
