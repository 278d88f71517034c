"""Call-outs of the training loop (:class:`sdtl.engine.loop.Loop`).

A callback sees the loop after every optimizer step (``on_step_end``) and after every epoch
(``on_epoch_end``, with the epoch's record, to which it may add metrics). The loop calls them in the
order it was given; fine-tuning uses::

    Validation → ForgettingDiagnostics → Selection → RunLogger → Checkpoints → Tracking → EpochLine

(``Tracking``: MLflow / W&B, :mod:`sdtl.engine.trackers`; after the checkpoint, so that a tracker never
holds an epoch that a resume trains again.)

A callback with state a resumed run needs returns it from :meth:`Callback.state_dict` (it is stored
in the checkpoint under ``callback_state[name]``). A tuner that prunes trials or a tracker that
mirrors the metrics is one more callback: the loop does not change.
"""
from __future__ import annotations

import logging
import time

from sdtl.engine import state as state_mod
from sdtl.engine.evaluate import evaluate

log = logging.getLogger("sdtl.finetune")


class Callback:
    #: key of this callback's state in the checkpoint's ``callback_state``
    name: str = ""

    def on_step_end(self, loop, epoch: int, step: int) -> None:
        """After each optimizer step (``loop.state.step_in_epoch == step``)."""

    def on_epoch_end(self, loop, record: dict) -> None:
        """After each epoch (``loop.state.epoch`` is the finished epoch); may add to ``record``."""

    def state_dict(self) -> dict | None:
        return None


class Validation(Callback):
    """Multi-clip validation every ``eval.every`` epochs and at the last: ``val_*`` metrics."""

    def __init__(self, loader, num_classes: int, batch_size: int) -> None:
        self.loader, self.num_classes, self.batch_size = loader, num_classes, batch_size

    def on_epoch_end(self, loop, record: dict) -> None:
        cfg, epoch = loop.cfg, record["epoch"]
        if self.loader is None or not (epoch % cfg.eval.every == 0 or epoch == cfg.optim.epochs):
            return
        val = evaluate(loop.task.model, self.loader, self.num_classes, loop.info, self.batch_size, loop.dtype,
                       desc=f"validation {epoch}" if cfg.run.progress else None)
        record.update({f"val_{k}": v for k, v in val.metrics.items() if k != "per_class_acc"})


class ForgettingDiagnostics(Callback):
    """Feature / parameter drift from the starting encoder and the retention probe (``feat_drift`` ...)."""

    name = "forgetting"

    def __init__(self, probe) -> None:
        self.probe = probe

    def on_epoch_end(self, loop, record: dict) -> None:
        record.update(self.probe.measure(loop.task.model.encoder, loop.info.device))

    def state_dict(self) -> dict:
        return {"prev_features": self.probe.prev_features}


def better(select: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of metric ``select`` beats ``best`` (lower is better for a loss; ties keep the first)."""
    if best is None:
        return True
    return value < best if select == "val_loss" else value > best


class Selection(Callback):
    """Model selection on validation (``eval.select``; ``last`` picks the last epoch): ``best_epoch``."""

    def on_epoch_end(self, loop, record: dict) -> None:
        select, best = loop.cfg.eval.select, loop.state.best
        value = record.get(select) if select != "last" else record["epoch"]
        if value is not None and better(select, value, best.get("value")):
            loop.state.best = {"metric": select, "value": value, "epoch": record["epoch"]}
            loop.improved = True
        record["best_epoch"] = loop.state.best.get("epoch")


class RunLogger(Callback):
    """``metrics.jsonl``, TensorBoard and ``curves.png`` (:class:`sdtl.engine.reporting.RunLog`)."""

    def __init__(self, run_log) -> None:
        self.run_log = run_log

    def on_epoch_end(self, loop, record: dict) -> None:
        self.run_log.log_epoch(record)


class Checkpoints(Callback):
    """``last.pt`` at every epoch end (and ``best.pt`` when selection improved), and mid-epoch every
    ``run.checkpoint_every_steps`` optimizer steps or ``run.checkpoint_every_minutes`` minutes. Every
    write keeps the previous ``last.pt`` as ``prev.pt`` and a checksum beside each file
    (:func:`sdtl.engine.state.save`)."""

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0, keep_best: bool = True) -> None:
        self.every_steps, self.every_minutes, self.keep_best = every_steps, every_minutes, keep_best
        self._saved = time.monotonic()

    def on_step_end(self, loop, epoch: int, step: int) -> None:
        if step == len(loop.loader):
            return  # the epoch end writes one
        global_step = (epoch - 1) * len(loop.loader) + step
        due = (self.every_steps and global_step % self.every_steps == 0) or \
              (self.every_minutes and time.monotonic() - self._saved >= 60 * self.every_minutes)
        if due:  # the loop agrees over ranks, then every rank takes part in the write
            loop.checkpoint_due = True
            self._saved = time.monotonic()

    def on_epoch_end(self, loop, record: dict) -> None:
        loop.save_last()
        self._saved = time.monotonic()
        if self.keep_best and loop.improved and loop.info.is_main:
            state_mod.keep_best(loop.last_path)


class EpochLine(Callback):
    """One log line per epoch (what a redirected log gets instead of progress bars), with an ETA."""

    def __init__(self, keys, logger=log, prefix: str = "epoch") -> None:
        self.keys, self.logger, self.prefix = keys, logger, prefix

    def on_epoch_end(self, loop, record: dict) -> None:
        if not loop.info.is_main:
            return
        epochs = loop.cfg.optim.epochs
        keys = self.keys() if callable(self.keys) else self.keys
        parts = [f"{k}={record[k]:.4g}" for k in keys if isinstance(record.get(k), (int, float))]
        eta = (time.perf_counter() - loop.run_clock) / loop.epochs_this_process * (epochs - record["epoch"])
        parts.append(f"eta={int(eta // 60)}m{int(eta % 60):02d}s")  # the final test is not included
        self.logger.info("%s %d/%d %s", self.prefix, record["epoch"], epochs, " ".join(parts))
