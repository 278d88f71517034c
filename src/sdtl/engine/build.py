"""Building a fine-tuning run from its config: the datasets (train / validation / test, from lists
only), the classifier with its pre-trained encoder, the probe clips and the regularizer.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from sdtl.engine import config as cfgmod
from sdtl.errors import CheckpointError, ConfigError, DataError
from sdtl.models.classifier import model_options
from sdtl.regularizers import registry
from sdtl.regularizers.base import Regularizer

log = logging.getLogger("sdtl.finetune")


def build_datasets(cfg, need_train: bool = True):
    """(train, val, test) datasets and the class names, from lists only (no decoding)."""
    from sdtl.data.datasets import VideoClipDataset, list_records, stratified_split

    cfgmod.resolve_input(cfg)  # the encoder's clip size and statistics where the config leaves them unset
    d = cfg.data
    if not d.root:
        raise ConfigError("data.root", "empty", "point it at the dataset folder, e.g. data.root=/data/UCF101 "
                          "(for the demo data, write one with `sdtl synth` first)")
    root = Path(d.root).expanduser()
    if not root.is_dir():
        raise ConfigError("data.root", f"{d.root} {'is not a folder' if root.exists() else 'does not exist'}",
                          "point it at the dataset folder (the one holding the class folders)")
    common = dict(clip_len=d.clip_len, stride=d.stride, size=d.size, backend=d.backend, seed=cfg.run.seed,
                  norm=(tuple(d.mean), tuple(d.std)))
    test_records, classes = list_records(d.dataset, d.root, split=d.split, subset="test",
                                         lists_dir=d.lists_dir, on_missing=d.on_missing)
    test = VideoClipDataset(test_records, classes, mode="test", num_clips=cfg.eval.num_clips,
                            crops=cfg.eval.crops, skip_corrupt=True, **common)
    if not need_train:
        return None, None, test, classes
    records, train_classes = list_records(d.dataset, d.root, split=d.split, subset="train",
                                          lists_dir=d.lists_dir, on_missing=d.on_missing)
    if list(train_classes) != list(classes):
        raise DataError(f"{d.root}: the train and test lists disagree on the classes; check the split lists",
                        path=d.root)
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
    use_grad_checkpointing(cfg, model.encoder)
    report = None
    if load_pretrained and cfg.model.pretrained:
        report = load_encoder_weights(model.encoder, cfg.model.pretrained, cfg.model.arch,
                                      allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    return model, report


def use_grad_checkpointing(cfg, encoder) -> None:
    """``model.grad_checkpointing``: activation checkpointing per transformer block (the encoder's
    ``set_grad_checkpointing``, as timm's); it acts only in training forwards with gradients, so a frozen
    teacher (no autograd) never pays for it."""
    if not cfg.model.grad_checkpointing:
        return
    if not hasattr(encoder, "set_grad_checkpointing"):
        raise ConfigError("model.grad_checkpointing", f"model.arch={cfg.model.arch} has no transformer blocks to "
                          "checkpoint", "set it to false (only the transformer encoders support it)")
    encoder.set_grad_checkpointing(True)


def probe_clips(cfg, train_ds, classes, count: int | None = None, salt: int = 7919):
    """A fixed batch of centre clips from training videos (the same for every epoch and resume) and
    their labels: ``(clips [N, C, T, H, W], labels [N])``."""
    from sdtl.data.datasets import VideoClipDataset

    g = torch.Generator().manual_seed(cfg.run.seed + salt)
    order = torch.randperm(len(train_ds.records), generator=g).tolist()
    chosen = [train_ds.records[i] for i in order[: cfg.eval.probe_videos if count is None else count]]
    ds = VideoClipDataset(chosen, classes, mode="test", num_clips=1, crops=1, clip_len=cfg.data.clip_len,
                          stride=cfg.data.stride, size=cfg.data.size, backend=cfg.data.backend,
                          seed=cfg.run.seed, skip_corrupt=True, norm=(tuple(cfg.data.mean), tuple(cfg.data.std)))
    items = [ds[i] for i in range(len(ds))]
    items = [it for it in items if it["video"].shape[0] > 0]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return (torch.stack([it["video"][0] for it in items]),
            torch.as_tensor([int(it["label"]) for it in items], dtype=torch.long))


def build_run_regularizer(cfg, model, train_ds, classes, task_state, info) -> Regularizer | None:
    """The configured regularizer on the model as loaded; on resume (``task_state``: the checkpoint's
    task state, None for a fresh run), its state from the checkpoint.

    A fresh run gives a regularizer that asks for them (``reg.start_clips``; DELTA's channel
    attention) that many training clips once, before the first step; its result is in checkpoints.
    """
    r = cfg.regularizer
    try:
        reg = registry.build_regularizer(r, model.encoder, model.head)
    except ValueError as exc:
        from sdtl.engine.config import config_error_from

        raise config_error_from(exc, "regularizer") from exc
    if reg is None:
        return None
    reg.to(info.device)
    if task_state is not None:
        try:
            reg.load_checkpoint_state(task_state.get("regularizer"))
        except ValueError as exc:
            raise CheckpointError(f"the checkpoint resumed from cannot restore the {r.name} regularizer ({exc}); "
                                  f"resume with the run's own config") from exc
    elif reg.start_clips:
        t0 = time.perf_counter()
        clips, labels = probe_clips(cfg, train_ds, classes, count=reg.start_clips, salt=104729)
        done = reg.start(clips, labels, len(classes), batch_size=cfg.data.batch_size, seed=cfg.run.seed)
        if info.is_main and done:
            log.info("%s in %.1f s", done, time.perf_counter() - t0)
    return reg


def describe_method(cfg) -> str:
    """One line naming the method of a run: regularizer (or plain), LP-FT, layer-wise decay."""
    o = cfg.optim
    out = registry.describe(cfg.regularizer)
    if o.lp_epochs:
        out += f" | LP-FT: head alone for {o.lp_epochs} epoch(s)"
    if o.layer_decay < 1:
        out += f" | layer-wise lr decay {o.layer_decay:g}"
    return out
