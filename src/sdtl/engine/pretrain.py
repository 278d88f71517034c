"""Self-supervised pre-training of an encoder on unlabelled videos (``sdtl pretrain``).

Two tasks run on the same training loop as fine-tuning (:mod:`sdtl.engine.loop`): the same AMP, DDP,
checkpoints (one layout, :mod:`sdtl.engine.state`), mid-epoch checkpoints, stop requests and exact
resume.

* :class:`PretextTask` (``task.name: speed``) runs a single-clip pretext task of :mod:`sdtl.pretext`:
  playback-speed prediction, the "Pace" baseline the paper cites.
* :class:`RSPNetTask` (``task.name: rspnet``) runs RSPNet (:mod:`sdtl.pretext.rspnet`): two clips per
  video, a momentum key network and a queue. DDP wraps the query network only (encoder + both heads);
  the key network, the queue and its pointer are task state, in every checkpoint.

Each task is declared once in :data:`sdtl.pretext.registry.PRETEXT` (its options dataclass checks and
describes it; the config's ``task`` section, its keys and ``task.name`` choices are derived from it);
:data:`TASK_BUILDERS` says what the loop runs for it.

The result is ``OUT/checkpoints/encoder.pt`` (an ``sdtl-pretrain`` checkpoint without training state:
the encoder and the task's heads) that ``sdtl finetune --set model.pretrained=OUT/checkpoints/encoder.pt``
loads (the encoder; heads ignored), and for the speed task ``OUT/retention_probe.pt`` for fine-tuning's
``eval.retention`` (RSPNet has no classifier head to freeze, so no probe); ``last.pt`` holds the full
training state for ``--resume``. Pre-training keeps no "best" checkpoint: ``encoder.pt`` is the last epoch's.
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
from sdtl.engine.trackers import Tracking, check_installed, tensorboard_enabled
from sdtl.errors import ConfigError, UserError
from sdtl.models.classifier import build_encoder, model_options
from sdtl.pretext import PRETEXT_TASKS, PretextModel
from sdtl.pretext.dataset import PretextClipDataset, RSPNetClipDataset
from sdtl.pretext.registry import options_of
from sdtl.pretext.rspnet import SPEEDS, RSPNet, RSPNetModel

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

    line_keys = ("train_loss", "train_acc", "clips_per_s")  # the epoch line
    resume_note: str | None = None  # what a resume changed, said once at the start

    def describe(self) -> str:
        return options_of(self.cfg.task).describe()

    def after_training(self, encoder_path: Path, paths: list[Path], out_dir: Path) -> None:
        write_retention_probe(encoder_path, paths, self.cfg, out_dir / "retention_probe.pt")

    def load_rank_state(self, state: dict | None) -> None:
        if state:
            self.correct, self.seen = int(state["correct"]), int(state["seen"])


class RSPNetTask(PretextTask):
    """RSPNet (:class:`sdtl.pretext.rspnet.RSPNet`) on the loop: a batch's ``video`` is
    ``[B, 2, 3, 2T, S, S]`` (query clip, key clip); the losses are ``avid`` and ``rsp``.

    The checkpoint's weights are the query network's ``encoder`` and ``head`` (both heads), as every
    pre-training checkpoint's; the task state holds the key network, the queue and its pointer; each
    rank's state holds its accuracy counters and its key network's BatchNorm buffers."""

    def __init__(self, cfg, rspnet: RSPNet) -> None:
        self.cfg, self.rspnet, self.model = cfg, rspnet, rspnet.model
        self.avid_correct = self.rsp_correct = self.seen = 0
        self.resume_note: str | None = None  # set when a resume re-fitted the queue

    line_keys = ("train_loss", "train_avid", "train_rsp", "train_avid_acc", "train_rsp_acc", "clips_per_s")

    def epoch_start(self, epoch: int) -> None:
        self.avid_correct = self.rsp_correct = self.seen = 0

    def describe(self) -> str:
        return options_of(self.cfg.task).describe(queue=int(self.rspnet.queue.shape[0]), clip_len=self.cfg.data.clip_len)

    def after_training(self, encoder_path: Path, paths: list[Path], out_dir: Path) -> None:
        log.info("no retention probe for task.name=rspnet (the probe freezes the speed task's classifier "
                 "head; RSPNet has none): fine-tune without eval.retention")

    def train_mode(self, epoch: int) -> None:
        self.model.train()
        self.rspnet.key_model.train()  # batch statistics in the key network too, as the reference

    def losses(self, net, batch: dict, epoch: int) -> dict:
        video = batch["video"]
        out = self.rspnet.step(net, video[:, 0], video[:, 1])
        self.avid_correct += int(out["avid_correct"])
        self.rsp_correct += int(out["rsp_correct"])
        self.seen += video.shape[0]
        return {"loss": out["loss"], "avid": out["avid"], "rsp": out["rsp"]}

    def epoch_metrics(self, info) -> dict:
        _, avid, rsp, seen = dist_utils.all_reduce_sum(info, [0.0, self.avid_correct, self.rsp_correct, self.seen])
        return {"train_avid_acc": 100.0 * avid / max(1, seen), "train_rsp_acc": 100.0 * rsp / max(1, seen)}

    def meta(self) -> dict:
        t = self.cfg.task
        return {"task": "rspnet", "task_options": {
            "speeds": list(SPEEDS), "queue_size": int(self.rspnet.queue.shape[0]), "key_momentum": t.key_momentum,
            "temperature": t.temperature, "embed_dim": t.embed_dim, "margin": t.margin,
            "avid_weight": t.avid_weight, "rsp_weight": t.rsp_weight}}

    def state_dict(self, mid_epoch: bool) -> dict:
        return {"rspnet": self.rspnet.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if not state or "rspnet" not in state:
            raise UserError("«resume»: the checkpoint has no RSPNet state (key network, queue); resume an "
                            "`sdtl pretrain` run of task.name=rspnet with its own config")
        self.resume_note = self.rspnet.load_state_dict(state["rspnet"])

    def rank_state(self) -> dict:
        return {"avid_correct": self.avid_correct, "rsp_correct": self.rsp_correct, "seen": self.seen,
                "key_buffers": self.rspnet.rank_buffers()}

    def load_rank_state(self, state: dict | None) -> None:
        if state:
            self.avid_correct, self.rsp_correct = int(state["avid_correct"]), int(state["rsp_correct"])
            self.seen = int(state["seen"])
            self.rspnet.load_rank_buffers(state["key_buffers"])


def run_pretrain(cfg: cfgmod.PretrainConfig, out_dir: str | Path, resume: str | None = None,
                 callbacks: tuple = ()) -> Path | None:
    """Pre-train an encoder; returns the path of the encoder checkpoint (rank 0).

    ``callbacks``: more call-outs of the loop after the run's own at each epoch end, as in
    :func:`sdtl.engine.finetune.run_finetune`."""
    import functools

    return run_in_process_group(cfg, functools.partial(_run, extra_callbacks=tuple(callbacks)), out_dir, resume)


def _run(cfg, out_dir: Path, resume, info, extra_callbacks: tuple = ()) -> Path | None:
    check_installed(cfg)  # run.trackers naming mlflow / wandb without the package: refused before any work
    resume_path, payload = start_run(cfg, out_dir, resume, info, "pretrain")
    paths = find_videos(cfg.data.root, cfg.data.list_file)
    norm = (tuple(cfg.data.mean), tuple(cfg.data.std))
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    encoder = build_encoder(cfg.model.arch, **{k: v for k, v in model_options(cfg).items() if k != "dropout"})
    use_grad_checkpointing(cfg, encoder)
    make_task = TASK_BUILDERS[cfg.task.name]
    task, ds, channels_last = make_task(cfg, encoder, paths, info, norm)
    parts = prepare_training(cfg, info, task, out_dir, resume_path, payload, ds, log)
    state = parts["state"]
    if info.is_main:
        log.info("sdtl pretrain → %s | task %s | %d videos under %s | arch %s %s | %d process(es) on %s",
                 out_dir.resolve(), task.describe(), len(ds), cfg.data.root, cfg.model.arch, model_options(cfg),
                 info.world_size, info.device)
        if task.resume_note:
            log.warning("resume: %s", task.resume_note)
    run_log = RunLog(out_dir, info.is_main, tensorboard_enabled(cfg), state.history)
    state.history = run_log.history
    tracking = Tracking.open(cfg, out_dir, info, state.history, "pretrain")  # mlflow / wandb (rank 0)
    callbacks = [RunLogger(run_log),
                 Checkpoints(cfg.run.checkpoint_every_steps, cfg.run.checkpoint_every_minutes, keep_best=False),
                 tracking, EpochLine(list(task.line_keys), log, prefix="pretrain epoch"), *extra_callbacks]
    loop = Loop(cfg, info, task, parts["net"], parts["optimizer"], parts["scheduler"], parts["scaler"],
                parts["loader"], parts["sampler"], ds, parts["tracker"], out_dir, state, callbacks,
                resumed=payload, channels_last=channels_last, title="pretrain")
    with tracking.session():  # the tracker runs end with curves.png, or KILLED / FAILED
        try:
            loop.fit()
        finally:
            run_log.close()
        if not info.is_main:
            return None
        encoder_path = out_dir / "checkpoints" / "encoder.pt"
        state_mod.save(state_mod.build_checkpoint(cfg, task, state), encoder_path)
        task.after_training(encoder_path, paths, out_dir)
        return encoder_path


def _pretext_task(cfg, encoder, paths, info, norm):
    """A single-clip pretext task of :data:`PRETEXT_TASKS` (a linear head on the encoder) and its dataset."""
    pretext = PRETEXT_TASKS[cfg.task.name](cfg.task.strides, cfg.data.clip_len)
    model = PretextModel(encoder, pretext.num_outputs)
    channels_last = prepare_model(model, cfg, info.device)
    seed_everything(cfg.run.seed + info.rank)
    ds = PretextClipDataset(paths, pretext, cfg.data.size, cfg.data.backend, cfg.run.seed,
                            tuple(cfg.data.crop_area), norm=norm)
    return PretextTask(cfg, pretext, model), ds, channels_last


def _rspnet_task(cfg, encoder, paths, info, norm):
    """RSPNet's query network (on the device), its objective state (key network, queue) and dataset."""
    t = cfg.task
    model = RSPNetModel(encoder, t.embed_dim)
    channels_last = prepare_model(model, cfg, info.device)
    global_batch = cfg.data.batch_size * info.world_size
    try:
        rspnet = RSPNet(model, t.queue_size, global_batch, t.key_momentum, t.temperature, t.margin,
                        t.avid_weight, t.rsp_weight, seed=cfg.run.seed, channels_last=channels_last)
    except ValueError as exc:
        raise ConfigError("task.queue_size", str(exc), f"set it to at least {global_batch}") from None
    seed_everything(cfg.run.seed + info.rank)
    ds = RSPNetClipDataset(paths, cfg.data.clip_len, cfg.data.size, cfg.data.backend, cfg.run.seed,
                           tuple(cfg.data.crop_area), norm=norm)
    queue = rspnet.queue.shape[0]
    if info.is_main and queue >= len(ds):
        log.warning("task.queue_size: the queue holds %d keys and the pool has %d videos, so a query often meets "
                    "an older key of its own video among its negatives; a queue well below the pool size "
                    "(e.g. %d) avoids that", queue, len(ds), max(global_batch, len(ds) // 4 // global_batch * global_batch))
    return RSPNetTask(cfg, rspnet), ds, channels_last


#: ``task.name`` → what the training loop runs for it: the task, its dataset, channels_last (one line
#: per pretext task of :data:`sdtl.pretext.registry.PRETEXT`; a test keeps the two equal)
TASK_BUILDERS = {"speed": _pretext_task, "rspnet": _rspnet_task}


def write_retention_probe(encoder_path: Path, videos: list[Path], cfg, path: Path) -> Path:
    """Pretext clips of the pre-training videos + the frozen pretext head, for fine-tuning's
    ``eval.retention`` (how much of the pretext skill survives fine-tuning)."""
    probe = make_retention_probe(encoder_path, videos, cfg.data.size, cfg.data.backend, tuple(cfg.data.crop_area),
                                 seed=cfg.run.seed)
    probe.save(path)
    log.info("retention probe (%d pretext clips, frozen pretext head) -> %s; fine-tune with "
             "the config key eval.retention=%s", len(probe.clips), path, path)
    return path
