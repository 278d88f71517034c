"""The one training loop: every task (fine-tuning with any regularizer, LP-FT, pretext pre-training)
runs on :class:`Loop`.

The task (:class:`sdtl.engine.task.Task`) turns a batch into losses and owns its extra state; the
loop owns the rest:

* each step: move the batch to the device (memory format), autocast, ``task.losses``, the NaN check
  (agreed over ranks), backward / clip / optimizer and scaler step (:func:`~sdtl.engine.optim.optimizer_step`),
  ``task.step_end``, the meter and the progress display;
* each epoch: the task's ``epoch_start``, the corrupt-video share, the scheduler step, then the
  call-outs (:mod:`sdtl.engine.callbacks`): validation, forgetting probes, selection, the run log,
  checkpoints and the epoch line, in the order given. A later tuner or tracker adds a callback;
* checkpoints (:mod:`sdtl.engine.state`) after any optimizer step: every ``run.checkpoint_every_steps``
  steps or ``run.checkpoint_every_minutes`` minutes, and on a stop request;
* stop requests: SIGINT, SIGTERM and SIGUSR1 set a flag that the loop reads after each optimizer
  step (and at each epoch end); it then writes the checkpoint state and raises
  :class:`~sdtl.errors.RunInterrupted` (exit status 75), so a cluster job can be requeued and resumed;
* resume: the task's weights and state, optimizer, scheduler, scaler, the epoch's position, meter
  sums and RNG come back from one checkpoint; on CPU with ``run.deterministic`` a run resumed from
  any step ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from sdtl.data.corrupt import CorruptVideoTracker
from sdtl.data.video_io import ProbeCache
from sdtl.engine import config as cfgmod
from sdtl.engine import distributed as dist_utils
from sdtl.engine import state as state_mod
from sdtl.engine.optim import build_fast_optimizer, build_scheduler, make_scaler, optimizer_step, restore_scaler
from sdtl.engine.rundir import record_config_changes
from sdtl.engine.runtime import (STOP_SIGNALS, EpochMeter, amp_dtype, check_finite, make_train_loader,
                                 maybe_compile, progress, restore_rng, runtime_settings, seed_everything,
                                 to_memory_format)
from sdtl.errors import RunInterrupted, UserError

log = logging.getLogger("sdtl.loop")


class StopRequest:
    """SIGINT / SIGTERM / SIGUSR1 / SIGUSR2 → a flag (installed for the duration of a ``with`` block).

    A second SIGINT while the first is pending interrupts at once (KeyboardInterrupt), as usual.
    Outside the main thread (where Python cannot install handlers) nothing is installed.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(s, handler)
        self._previous.clear()

    def requested(self, info, checkpoint_due: bool = False) -> tuple[bool, bool]:
        """``(stop, checkpoint)``, agreed by every rank in one reduction: any rank asked to stop, any
        rank's checkpoint is due (a time-based one is decided by one clock). All ranks then stop or
        write at the same step (a checkpoint gathers every rank's state)."""
        flags = [self.signum is not None, checkpoint_due]
        if info.enabled:
            t = torch.tensor([float(f) for f in flags], device=info.device)
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
            flags = [bool(v) for v in t.tolist()]
        return flags[0], flags[1]

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request on another rank"


class Loop:
    """One training run's loop state and steps. Build it, then :meth:`fit`."""

    def __init__(self, cfg, info, task, net, optimizer, scheduler, scaler, loader, sampler, dataset, tracker,
                 out_dir: Path, state: state_mod.TrainState, callbacks: list, resumed: dict | None = None,
                 channels_last: bool = False, title: str = "epoch") -> None:
        self.cfg, self.info, self.task, self.net = cfg, info, task, net
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.loader, self.sampler, self.dataset, self.tracker = loader, sampler, dataset, tracker
        self.out_dir, self.state, self.callbacks = Path(out_dir), state, list(callbacks)
        self.resumed = resumed  # the checkpoint payload this run resumed from (None: fresh)
        self.channels_last, self.title = channels_last, title
        self.dtype = amp_dtype(cfg.optim.amp, info.device)
        self.last_path = self.out_dir / "checkpoints" / "last.pt"
        self.meter = EpochMeter()
        self.improved = False  # set by selection at an epoch end; read by the checkpoint callback
        self.checkpoint_due = False  # set by the checkpoint callback after a step
        self.stop = StopRequest()
        self.run_clock = time.perf_counter()
        self.epochs_this_process = 0

    # ----------------------------------------------------------------------------- the run
    def fit(self) -> None:
        if self.resumed is not None:
            self._restore_rng()
        with self.stop:
            for epoch in range(self.state.epoch + 1, self.cfg.optim.epochs + 1):
                record = self.train_epoch(epoch)
                self.end_epoch(epoch, record)
                if self.stop.requested(self.info)[0]:
                    self._stopped(epoch, None)

    def _restore_rng(self) -> None:
        """Every rank's RNG as the checkpoint left it (checkpoints store each rank's).

        Data loaders draw from their own generators (:func:`sdtl.engine.runtime.make_train_loader`), so
        the global stream (dropout) continues exactly where the checkpoint was written. A checkpoint
        from another number of processes (or an old one) gives rank 0's state and a derived seed to
        the others."""
        own = state_mod.own_rank_entry(self.resumed, self.info)
        restore_rng(own["rng"] if own else self.resumed["rng"])
        if self.info.rank and not own:
            seed_everything(self.cfg.run.seed + self.info.rank + 1000003 * self.state.epoch + self.state.step_in_epoch)

    def train_epoch(self, epoch: int) -> dict:
        """The optimizer steps of one epoch (from ``state.step_in_epoch`` when resuming inside it)."""
        cfg, info, task = self.cfg, self.info, self.task
        start = self.state.step_in_epoch
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if start:
            self._check_same_layout(len(self.loader))
            self.sampler.skip(start * cfg.data.batch_size)
            own = state_mod.own_rank_entry(self.resumed, self.info)
            self._load_loop_state((own or {}).get("loop") or self.resumed.get("loop_state") or {})
        else:
            task.epoch_start(epoch)
            self.tracker.reset_epoch()
            self.meter = EpochMeter()
        task.train_mode(epoch)
        lr = task.logged_lr(self.optimizer)
        bar = progress(len(self.loader), f"{self.title} {epoch}/{cfg.optim.epochs}", info.is_main and cfg.run.progress,
                       initial=start)
        for step, batch in enumerate(self.loader, start=start + 1):
            self.train_step(epoch, step, batch)
            bar.update(1)
            if step % 5 == 0 or step == len(self.loader):
                bar.set_postfix(self.meter.postfix(lr), refresh=False)
            self.state.step_in_epoch = step
            self.checkpoint_due = False
            for cb in self.callbacks:
                cb.on_step_end(self, epoch, step)  # the checkpoint callback sets checkpoint_due
            stop, due = self.stop.requested(info, self.checkpoint_due)
            if due or stop:
                self.save_last()
            if stop:
                bar.close()
                self._stopped(epoch, step)
        bar.close()
        return self._epoch_record(epoch, lr)

    def train_step(self, epoch: int, step: int, batch: dict) -> None:
        info, task = self.info, self.task
        self.meter.data_ready()
        self.tracker.update(batch.get("failed", []), num_samples=len(batch["label"]))
        batch["video"] = to_memory_format(batch["video"].to(info.device, non_blocking=True), self.channels_last)
        batch["label"] = torch.as_tensor(batch["label"]).to(info.device, non_blocking=True)
        with torch.autocast(info.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            losses = task.losses(self.net, batch, epoch)
        loss = losses["loss"]
        parts = {k: v for k, v in losses.items() if k != "loss"} or {"loss": loss}
        if info.enabled:  # a NaN on one rank must stop every rank at the same step, not hang the others
            flag = torch.tensor([float(torch.isfinite(loss).all())], device=info.device)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
            if flag.item() < 1:
                parts = {**parts, "loss (on another rank)": torch.tensor(float("nan"))}
        check_finite(parts, epoch, step, str(self.last_path) if self.last_path.exists() else "none yet")
        optimizer_step(loss, self.optimizer, self.scaler, task.model.parameters(), self.cfg.optim.grad_clip,
                       before_step=task.before_step(epoch))
        task.step_end()
        values = {k: v.item() for k, v in losses.items()}
        self.meter.step_done(values, batch["video"].shape[0] * info.world_size)

    def _epoch_record(self, epoch: int, lr: float) -> dict:
        info = self.info
        means = self.meter.means()
        means = dict(zip(means, dist_utils.all_reduce_sum(info, list(means.values()))))
        record = {"epoch": epoch, **{f"train_{k}": v / info.world_size for k, v in means.items()}}
        record.update(self.task.epoch_metrics(info))
        record.update(self.meter.summary())
        record.update(lr=lr, steps=self.meter.steps, world_size=info.world_size,
                      corrupt_skipped=self.tracker.epoch_count)
        return record

    def end_epoch(self, epoch: int, record: dict) -> None:
        self.tracker.check(force=True)  # judge the corrupt share on small datasets too
        self.scheduler.step()
        self.state.epoch, self.state.step_in_epoch = epoch, 0
        self.epochs_this_process += 1
        self.improved = False
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)
        dist_utils.barrier(self.info)

    # ------------------------------------------------------------------------ checkpoints
    def save_last(self) -> None:
        """Write ``last.pt``: every rank calls it (each rank's own RNG, epoch state and task rank state
        are gathered: a few small tensors, never the model), rank 0 writes."""
        own = state_mod.rank_entry(self.task, self._loop_state() if self.state.mid_epoch else None)
        ranks = dist_utils.all_gather_objects(self.info, own)
        if self.info.is_main:
            callback_state = {cb.name: s for cb in self.callbacks if (s := cb.state_dict()) is not None}
            payload = state_mod.build_checkpoint(self.cfg, self.task, self.state, self.optimizer, self.scheduler,
                                                 self.scaler, callback_state, ranks)
            self.last_path.parent.mkdir(parents=True, exist_ok=True)
            state_mod.save(payload, self.last_path)

    def _check_same_layout(self, steps_per_epoch: int) -> None:
        """A mid-epoch position means something only with the batch size and processes that wrote it."""
        saved = self.resumed.get("loop_state") or {}
        now = {"batch_size": self.cfg.data.batch_size, "world_size": self.info.world_size,
               "steps_per_epoch": steps_per_epoch}
        was = {k: saved.get(k, v) for k, v in now.items()}
        if was != now:
            raise UserError(f"resume {self.last_path}: it was written inside epoch {self.state.epoch + 1} with "
                            f"{was}, this run has {now}; resume it with the same data.batch_size and number of "
                            f"processes (at least until that epoch ends)")

    def _loop_state(self) -> dict:
        m, t = self.meter, self.tracker
        return {"batch_size": self.cfg.data.batch_size, "world_size": self.info.world_size,
                "steps_per_epoch": len(self.loader),
                "meter": {"sums": dict(m.sums), "steps": m.steps, "clips": m.clips, "data_time": m.data_time,
                          "elapsed": m.elapsed},
                "tracker": {"total_failures": t.total_failures, "total_samples": t.total_samples,
                            "epoch_count": t.epoch_count}}

    def _load_loop_state(self, loop_state: dict) -> None:
        meter = EpochMeter()
        saved = loop_state.get("meter") or {}
        meter.sums, meter.steps = dict(saved.get("sums", {})), int(saved.get("steps", 0))
        meter.clips, meter.data_time = int(saved.get("clips", 0)), float(saved.get("data_time", 0.0))
        meter.start -= float(saved.get("elapsed", 0.0))
        self.meter = meter
        for key, value in (loop_state.get("tracker") or {}).items():
            setattr(self.tracker, key, value)

    def _stopped(self, epoch: int, step: int | None) -> None:
        """A stop request: the state is written (mid-epoch, or the epoch end's); stop."""
        dist_utils.barrier(self.info)
        where = f"epoch {epoch}, step {step} of {len(self.loader)}" if step is not None else f"the end of epoch {epoch}"
        raise RunInterrupted(f"training stopped by {self.stop.name} at {where}; its state is in {self.last_path}",
                             checkpoint=self.last_path, signum=self.stop.signum)


# ------------------------------------------------------------------------------ assembly
def prepare_training(cfg, info, task, out_dir: Path, resume_path, payload: dict | None, dataset, logger,
                     weight_decay: float | None = None, decoder: str | None = None) -> dict:
    """Everything the loop needs besides the task, built the same way for every task.

    The optimizer, scheduler and loss scaler; on resume their state, the task's weights and state and
    the :class:`~sdtl.engine.state.TrainState`; ``config.yaml``; the video index shared by every
    loader of the run; the DDP / compiled module; the train loader and the corrupt-video tracker.
    """
    optimizer = build_fast_optimizer(cfg, task.model.encoder, task.model.head, info.device, weight_decay=weight_decay)
    scheduler = build_scheduler(cfg.optim, optimizer)
    scaler = make_scaler(amp_dtype(cfg.optim.amp, info.device), info.device)
    state = state_mod.TrainState()
    if payload is not None:
        state = restore_training(cfg, info, task, optimizer, scheduler, scaler, payload, resume_path, out_dir, logger)
    # Everything that can refuse the config (the loader: a batch larger than the data; compile) comes
    # before the first file of the run is written, so bad input leaves no run folder behind.
    net = task.ddp_module()
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    net = maybe_compile(net, cfg.run, logger)
    sampler, loader = make_train_loader(dataset, cfg.data, info, cfg.run.seed)
    if info.is_main:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        rt = runtime_settings(cfg, info.device, optimizer)
        cfgmod.dump_config(cfg, out_dir / "config.yaml", task.kind, decoder, rt)
        logger.info("runtime on %s: precision %s%s, channels_last %s, cuDNN autotune %s, fused optimizer %s, "
                    "compile %s", rt["device"], rt["amp"], " + loss scaling" if rt["grad_scaler"] else "",
                    rt["channels_last"], rt["cudnn_benchmark"], rt["fused_optimizer"], rt["compile"] or "off")
    dist_utils.barrier(info)
    dataset.probe_cache = ProbeCache(out_dir / "video_index.jsonl")  # each video probed once per run, by any worker
    tracker = CorruptVideoTracker(out_dir / "quarantine.txt" if info.is_main else None,
                                  max_fraction=cfg.data.max_corrupt_fraction)
    return {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "state": state, "net": net,
            "sampler": sampler, "loader": loader, "tracker": tracker}


def restore_training(cfg, info, task, optimizer, scheduler, scaler, payload: dict, resume_path, out_dir: Path,
                     logger) -> state_mod.TrainState:
    """Load a checkpoint (any version) into the task, optimizer, scheduler and scaler."""
    state, payload = state_mod.read_checkpoint(payload)
    try:
        task.load_weights(payload)
    except RuntimeError as exc:
        raise UserError(f"«resume={resume_path}»: its weights do not fit the configured model "
                        f"({cfg.model.arch}, {task.arch_options()}); resume with the run's own config.yaml "
                        f"(on the command line: leave --config out) [{str(exc).splitlines()[0]}]") from None
    record_config_changes(cfg, payload, out_dir, resume_path, info, logger)  # a refused resume changed nothing
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    restore_scaler(scaler, payload.get("scaler"), logger)
    task.load_state_dict(payload.get("task_state"))
    task.load_rank_state((state_mod.own_rank_entry(payload, info) or {}).get("task"))
    return state
