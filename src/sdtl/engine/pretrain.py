"""Self-supervised pre-training of an encoder on unlabelled videos (``sdtl pretrain``).

:class:`PretextTask` runs a pretext task of :mod:`sdtl.pretext` (today playback-speed prediction,
the "Pace" baseline the paper cites and one half of RSPNet's objective) on the same training loop as
fine-tuning (:mod:`sdtl.engine.loop`): the same AMP, DDP, checkpoints (one layout,
:mod:`sdtl.engine.state`), mid-epoch checkpoints, stop requests and exact resume. Adding a pretext
task means adding it to :data:`sdtl.pretext.PRETEXT_TASKS` (and the config's ``task.name`` choices).

The result is ``OUT/checkpoints/encoder.pt`` (an ``sdtl-pretrain`` checkpoint without training state)
that ``sdtl finetune --set model.pretrained=OUT/checkpoints/encoder.pt`` loads, and
``OUT/retention_probe.pt`` for fine-tuning's ``eval.retention``; ``last.pt`` holds the full training
state for ``--resume``.
"""
from __future__ import annotations

import logging
from pathlib import Path


from sdtl.data.videos import find_videos
from sdtl.engine import config as cfgmod
from sdtl.engine import distributed as dist_utils
from sdtl.engine import state as state_mod
from sdtl.engine.build import use_grad_checkpointing
from sdtl.engine.callbacks import Checkpoints, EpochLine, RunLogger
from sdtl.engine.diagnostics import make_retention_probe
from sdtl.engine.loop import Loop, prepare_training
from sdtl.engine.reporting import RunLog
from sdtl.engine.rundir import run_in_process_group, start_run
from sdtl.engine.runtime import prepare_model, seed_everything
from sdtl.engine.task import Task
from sdtl.models.classifier import build_encoder, model_options
from sdtl.pretext import PRETEXT_TASKS, PretextModel
from sdtl.pretext.dataset import PretextClipDataset

log = logging.getLogger("sdtl.pretrain")


class PretextTask(Task):
    """A pretext task of :mod:`sdtl.pretext` (``sample`` + ``loss``) on an encoder + linear head."""

    kind = "pretrain"

    def __init__(self, cfg, pretext, model: PretextModel) -> None:
        self.cfg, self.pretext, self.model = cfg, pretext, model
        self.correct = self.seen = 0

    def epoch_start(self, epoch: int) -> None:
        self.correct = self.seen = 0

    def losses(self, net, batch: dict, epoch: int) -> dict:
        logits = net(batch["video"])
        target = batch["label"]
        self.correct += int((logits.argmax(1) == target).sum())
        self.seen += len(target)
        return {"loss": self.pretext.loss(logits, target)}

    def logged_lr(self, optimizer) -> float:
        return optimizer.param_groups[0]["lr"]  # the encoder's, as pre-training has always logged it

    def epoch_metrics(self, info) -> dict:
        _, correct, seen = dist_utils.all_reduce_sum(info, [0.0, self.correct, self.seen])
        return {"train_acc": 100.0 * correct / max(1, seen)}

    def arch_options(self) -> dict:
        return {k: v for k, v in model_options(self.cfg).items() if k != "dropout"}

    def meta(self) -> dict:
        return {"task": self.cfg.task.name, "task_options": {"strides": list(self.cfg.task.strides)}}

    def weights(self) -> dict:
        return {"encoder": self.model.encoder.state_dict(), "head": self.model.head.state_dict()}

    def load_weights(self, payload: dict) -> None:
        self.model.encoder.load_state_dict(payload["encoder"])
        self.model.head.load_state_dict(payload["head"])

    def rank_state(self) -> dict:
        return {"correct": self.correct, "seen": self.seen}

    def load_rank_state(self, state: dict | None) -> None:
        if state:
            self.correct, self.seen = int(state["correct"]), int(state["seen"])


def run_pretrain(cfg: cfgmod.PretrainConfig, out_dir: str | Path, resume: str | None = None) -> Path | None:
    """Pre-train an encoder; returns the path of the encoder checkpoint (rank 0)."""
    return run_in_process_group(cfg, _run, out_dir, resume)


def _run(cfg, out_dir: Path, resume, info) -> Path | None:
    resume_path, payload = start_run(cfg, out_dir, resume, info, "pretrain")
    pretext = PRETEXT_TASKS[cfg.task.name](cfg.task.strides, cfg.data.clip_len)
    paths = find_videos(cfg.data.root, cfg.data.list_file)
    seed_everything(cfg.run.seed)
    encoder = build_encoder(cfg.model.arch, **{k: v for k, v in model_options(cfg).items() if k != "dropout"})
    use_grad_checkpointing(cfg, encoder)
    model = PretextModel(encoder, pretext.num_outputs)
    channels_last = prepare_model(model, cfg, info.device)
    seed_everything(cfg.run.seed + info.rank)
    task = PretextTask(cfg, pretext, model)
    ds = PretextClipDataset(paths, pretext, cfg.data.size, cfg.data.backend, cfg.run.seed, tuple(cfg.data.crop_area),
                           norm=(tuple(cfg.data.mean), tuple(cfg.data.std)))
    parts = prepare_training(cfg, info, task, out_dir, resume_path, payload, ds, log)
    state = parts["state"]
    if info.is_main:
        log.info("sdtl pretrain → %s | task %s %s | %d videos under %s | arch %s %s | %d process(es) on %s",
                 out_dir.resolve(), cfg.task.name, cfg.task.strides, len(ds), cfg.data.root, cfg.model.arch,
                 model_options(cfg), info.world_size, info.device)
    run_log = RunLog(out_dir, info.is_main, cfg.run.tensorboard, state.history)
    state.history = run_log.history
    callbacks = [RunLogger(run_log),
                 Checkpoints(cfg.run.checkpoint_every_steps, cfg.run.checkpoint_every_minutes, keep_best=False),
                 EpochLine(["train_loss", "train_acc", "clips_per_s"], log, prefix="pretrain epoch")]
    loop = Loop(cfg, info, task, parts["net"], parts["optimizer"], parts["scheduler"], parts["scaler"],
                parts["loader"], parts["sampler"], ds, parts["tracker"], out_dir, state, callbacks,
                resumed=payload, channels_last=channels_last, title="pretrain")
    try:
        loop.fit()
    finally:
        run_log.close()
    if not info.is_main:
        return None
    encoder_path = out_dir / "checkpoints" / "encoder.pt"
    state_mod.save(state_mod.build_checkpoint(cfg, task, state), encoder_path)
    write_retention_probe(encoder_path, paths, cfg, out_dir / "retention_probe.pt")
    return encoder_path


def write_retention_probe(encoder_path: Path, videos: list[Path], cfg, path: Path) -> Path:
    """Pretext clips of the pre-training videos + the frozen pretext head, for fine-tuning's
    ``eval.retention`` (how much of the pretext skill survives fine-tuning)."""
    probe = make_retention_probe(encoder_path, videos, cfg.data.size, cfg.data.backend, tuple(cfg.data.crop_area),
                                 seed=cfg.run.seed)
    probe.save(path)
    log.info("retention probe (%d pretext clips, frozen pretext head) -> %s; fine-tune with "
             "--set eval.retention=%s", len(probe.clips), path, path)
    return path
