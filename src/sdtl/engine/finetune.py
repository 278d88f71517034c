"""Fine-tuning with self-distillation (the paper's Algorithm 1), end to end.

The story of a run (``sdtl finetune --config RECIPE --out DIR``):

1. Everything the user gave is checked before anything is written: config keys and values, the
   dataset lists and files, the architecture and the pre-trained checkpoint (:mod:`sdtl.engine.build`).
2. The training list is split into train and a stratified validation part (``data.val_fraction``);
   model selection uses validation only — never the test list.
3. :class:`ClassificationTask` runs on the one training loop (:mod:`sdtl.engine.loop`). Each epoch
   ``t``: with the paper's regularizer (``regularizer.name: sd``, λ > 0) the regularizer's
   ``epoch_start`` freezes a copy of the encoder as the teacher (at epoch 1, the pre-trained
   encoder); every batch minimises ``CE(g(f(x)), y) + λ·‖f(x) − f'(x)‖²`` on the same augmented
   clips, the teacher's forward first (its activations are freed before the student's are saved).
   With λ = 0 no teacher exists. Other regularizers (:mod:`sdtl.regularizers`) plug into the same
   calls. LP-FT epochs (``optim.lp_epochs``) train the head alone on the frozen encoder first.
4. After each epoch the call-outs (:mod:`sdtl.engine.callbacks`): validation, forgetting
   diagnostics, selection, ``metrics.jsonl`` / TensorBoard / ``curves.png``, the checkpoint
   (``checkpoints/last.pt``; ``best.pt`` when validation improves) and the epoch line.
5. At the end, the selected (best) and the last checkpoints are both tested with the multi-clip
   protocol; ``results.json`` and ``confusion.png`` are written (:func:`sdtl.engine.evaluate.final_test`).

Checkpoints (:mod:`sdtl.engine.state`) can also be written inside epochs (``run.checkpoint_every_steps``,
``run.checkpoint_every_minutes``, and always on SIGINT / SIGTERM / SIGUSR1, which stop the run with
exit status 75). With ``run.deterministic`` on CPU, a run killed at any moment and resumed
(``--resume auto``) ends bit-identical to an uninterrupted one, because every random choice of the
data pipeline is seeded by (seed, epoch, sample index) and the checkpoint holds the position in the
epoch, the RNG, the epoch's meter and the regularizer's mid-epoch state (an SD teacher).

The same code runs under ``torchrun --nproc_per_node=N`` (DDP, one teacher per rank, rank 0 writes).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdtl.data.corrupt import check_failures
from sdtl.data.video_io import decoder_identity
from sdtl.engine import config as cfgmod
from sdtl.engine import distributed as dist_utils
from sdtl.engine.build import build_classifier, build_datasets, build_run_regularizer, describe_method, probe_clips
from sdtl.engine.callbacks import (Checkpoints, EpochLine, ForgettingDiagnostics, RunLogger, Selection,
                                   Validation)
from sdtl.engine.diagnostics import ForgettingProbe, RetentionProbe
from sdtl.engine.evaluate import final_test, make_eval_loader
from sdtl.engine.loop import Loop, prepare_training
from sdtl.engine.reporting import RunLog
from sdtl.engine.rundir import run_in_process_group, start_run
from sdtl.engine.runtime import prepare_model, seed_everything
from sdtl.engine.task import Task
from sdtl.engine.trackers import Tracking, check_installed, tensorboard_enabled
from sdtl.models.classifier import FeaturesAndLogits, model_options
from sdtl.regularizers.registry import metric_parts

log = logging.getLogger("sdtl.finetune")


class ClassificationTask(Task):
    """Cross-entropy on labelled clips plus the configured regularizer (none, SD, ... BSS); LP-FT.

    In an LP-FT linear-probe epoch (``epoch <= optim.lp_epochs``) the encoder runs frozen (eval mode,
    no gradient), only the head learns (outside DDP: its gradients are averaged by hand), and no
    regularizer applies.
    """

    kind = "finetune"

    def __init__(self, cfg, model, reg, classes, info) -> None:
        self.cfg, self.model, self.reg, self.classes, self.info = cfg, model, reg, list(classes), info

    def _linear_probe(self, epoch: int) -> bool:
        return epoch <= self.cfg.optim.lp_epochs

    def ddp_module(self) -> nn.Module:
        return FeaturesAndLogits(self.model)  # one DDP-visible forward returns logits and features

    def epoch_start(self, epoch: int) -> None:
        if self.reg is not None:
            self.reg.epoch_start()

    def train_mode(self, epoch: int) -> None:
        self.model.train()
        if self._linear_probe(epoch):
            self.model.encoder.eval()  # frozen: BatchNorm statistics do not move either
        self._epoch = epoch

    def losses(self, net, batch: dict, epoch: int) -> dict:
        clips, labels = batch["video"], batch["label"]
        model, linear_probe = self.model, self._linear_probe(epoch)
        reg = None if linear_probe else self.reg
        # Teacher first: its transient activations are freed before the student's are saved,
        # so self-distillation adds no activation memory to the step's peak.
        ctx = reg.prepare(clips) if reg is not None else None
        if linear_probe:
            with torch.no_grad():
                features = model.encoder(clips)
            logits = model.head(model.dropout(features))
        else:
            logits, features = net(clips)
        parts = {"ce": F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.optim.label_smoothing)}
        if reg is not None:
            parts[reg.part] = reg.loss(ctx, features)
        return {"loss": sum(parts.values()), **parts}

    def before_step(self, epoch: int):
        if self._linear_probe(epoch) and self.info.enabled:
            return lambda: dist_utils.average_gradients(self.info, self.model.head.parameters())
        return None

    def step_end(self) -> None:
        if self.reg is not None and not self._linear_probe(self._epoch):
            self.reg.step_end()

    def arch_options(self) -> dict:
        return model_options(self.cfg)

    def meta(self) -> dict:
        return {"num_classes": len(self.classes), "class_names": self.classes,
                # SD's next teacher at an epoch boundary is a snapshot of "model"; mid-epoch it is stored.
                "teacher": {"source": "model", "weight": self.cfg.regularizer.weight},
                "decoder": decoder_identity(self.cfg.data.backend)}

    def weights(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_weights(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])

    def state_dict(self, mid_epoch: bool) -> dict:
        return {"regularizer": self.reg.checkpoint_state(mid_epoch=mid_epoch) if self.reg is not None else None}

    # The regularizer's state is restored where it is built (build_run_regularizer), before DELTA
    # would otherwise compute its attention anew.


def epoch_line_keys() -> list[str]:
    """What the epoch line prints (every registered regularizer's loss part included)."""
    return ["train_loss", "train_ce", *metric_parts(), "val_video_acc1", "feat_drift", "retention_acc",
            "clips_per_s", "data_wait"]


def run_finetune(cfg: cfgmod.FinetuneConfig, out_dir: str | Path, resume: str | None = None,
                 callbacks: tuple = ()) -> dict | None:
    """Run a whole fine-tuning job; returns the results dict on rank 0 (None on other ranks).

    ``callbacks``: more call-outs of the loop, called after the run's own at each epoch end (the epoch's
    record, log line and checkpoint are written by then), e.g. a tuner's pruning; an exception they
    raise stops the run there and propagates."""
    import functools

    return run_in_process_group(cfg, functools.partial(_run, extra_callbacks=tuple(callbacks)), out_dir, resume)


def _run(cfg, out_dir: Path, resume, info, extra_callbacks: tuple = ()) -> dict | None:
    check_installed(cfg)  # run.trackers naming mlflow / wandb without the package: refused before any work
    resume_path, payload = start_run(cfg, out_dir, resume, info, "finetune")
    seed_everything(cfg.run.seed)
    train_ds, val_ds, test_ds, classes = build_datasets(cfg)
    model, load_report = build_classifier(cfg, len(classes), load_pretrained=payload is None)
    channels_last = prepare_model(model, cfg, info.device)
    seed_everything(cfg.run.seed + info.rank)
    reg = build_run_regularizer(cfg, model, train_ds, classes,
                                None if payload is None else (payload["task_state"] or {}), info)
    replaces_weight_decay = reg is not None and reg.replaces_weight_decay
    if replaces_weight_decay and cfg.optim.weight_decay and info.is_main:
        log.info("optimizer weight decay off (was %g): the %s penalty regularizes the weights instead",
                 cfg.optim.weight_decay, cfg.regularizer.name)
    task = ClassificationTask(cfg, model, reg, classes, info)
    if payload is not None:
        trained_with = payload.get("decoder")
        if info.is_main and trained_with and trained_with != decoder_identity(cfg.data.backend):
            log.warning("resuming %s: its epochs were trained on frames decoded by %s, this run decodes with %s; "
                        "to match, set the config key data.backend=%s", resume_path, trained_with,
                        decoder_identity(cfg.data.backend), trained_with.split()[0])
    parts = prepare_training(cfg, info, task, out_dir, resume_path, payload, train_ds, log,
                             weight_decay=0.0 if replaces_weight_decay else None,
                             decoder=decoder_identity(cfg.data.backend))
    for ds in (val_ds, test_ds):
        if ds is not None:
            ds.probe_cache = train_ds.probe_cache
    state = parts["state"]
    if payload is None:
        state.best = {"metric": cfg.eval.select, "value": None, "epoch": None}

    probe, initial = _forgetting_probe(cfg, model, train_ds, classes, out_dir, info, payload)
    eval_bs = cfg.eval.batch_size or cfg.data.batch_size
    val_loader = make_eval_loader(val_ds, eval_bs, info, cfg.data.workers) if val_ds is not None else None
    run_log = RunLog(out_dir, info.is_main, tensorboard_enabled(cfg), state.history)
    state.history = run_log.history  # one list: the log appends, checkpoints store it
    if initial is not None:
        run_log.log_epoch(initial)
    if info.is_main:
        _describe_start(cfg, out_dir, train_ds, val_ds, test_ds, classes, load_report, resume_path, info)
    tracking = Tracking.open(cfg, out_dir, info, state.history, "finetune")  # mlflow / wandb (rank 0)
    callbacks = [Validation(val_loader, len(classes), eval_bs),
                 *([ForgettingDiagnostics(probe)] if probe is not None else []),
                 Selection(), RunLogger(run_log),
                 Checkpoints(cfg.run.checkpoint_every_steps, cfg.run.checkpoint_every_minutes), tracking,
                 EpochLine(epoch_line_keys), *extra_callbacks]
    loop = Loop(cfg, info, task, parts["net"], parts["optimizer"], parts["scheduler"], parts["scaler"],
                parts["loader"], parts["sampler"], train_ds, parts["tracker"], out_dir, state, callbacks,
                resumed=payload, channels_last=channels_last)
    with tracking.session():  # the tracker runs end with the plots and results.json, or KILLED / FAILED
        try:
            loop.fit()
        finally:
            run_log.close()

        if payload is not None and state.epoch >= cfg.optim.epochs and loop.epochs_this_process == 0 and info.is_main:
            log.info("training already finished at epoch %d; running the final test only", state.epoch)
        counts = {"num_train_videos": len(train_ds), "num_val_videos": len(val_ds) if val_ds is not None else 0}
        return _final_test(cfg, model, test_ds, classes, out_dir, info, state.best, counts)


def _final_test(cfg, model, test_ds, classes, out_dir, info, best, counts) -> dict | None:
    results = final_test(cfg, model, test_ds, classes, out_dir, info, best, counts)
    if info.is_main and results is not None:
        check_failures(results.pop("_failed"), skip=cfg.eval.skip_corrupt)
    return results if info.is_main else None


def _forgetting_probe(cfg, model, train_ds, classes, out_dir: Path, info, payload):
    """The forgetting probe (reference features of the encoder fine-tuning starts from, + retention
    probe) and, for a fresh run, its epoch-0 record (drift 0; retention = the pre-trained skill)."""
    probe_path = out_dir / "probe.pt"
    retention = RetentionProbe.load(cfg.eval.retention) if cfg.eval.retention else None
    if not (cfg.eval.probe_videos > 0 or retention is not None):
        return None, None
    if payload is not None:
        if not probe_path.exists():
            return None, None
        prev = (payload["callback_state"].get("forgetting") or {}).get("prev_features")
        return ForgettingProbe.load(probe_path, prev, retention), None
    clips = probe_clips(cfg, train_ds, classes)[0] if cfg.eval.probe_videos > 0 else torch.empty(0)
    probe = ForgettingProbe.build(model.encoder, clips, info.device, retention)
    if info.is_main:
        probe.save(probe_path)
    return probe, {"epoch": 0, **probe.measure(model.encoder, info.device, advance=False)}


def _describe_start(cfg, out_dir, train_ds, val_ds, test_ds, classes, load_report, resume_path, info) -> None:
    method = describe_method(cfg)
    init = cfg.model.pretrained or "random init (from scratch)"
    log.info("sdtl finetune → %s | %s | %s at %s, %d classes: %d train / %d val / %d test videos | arch %s %s | "
             "init: %s%s | %d process(es) on %s%s",
             Path(out_dir).resolve(), method, cfg.data.dataset, cfg.data.root, len(classes), len(train_ds),
             len(val_ds) if val_ds else 0, len(test_ds), cfg.model.arch, model_options(cfg), init,
             f" ({load_report})" if load_report is not None else "", info.world_size, info.device,
             f" | resumed from {resume_path}" if resume_path else "")
