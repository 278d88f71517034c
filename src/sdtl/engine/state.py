"""One checkpoint state for every task: built here, read here, saved atomically.

A training checkpoint (``OUT/checkpoints/last.pt``, ``best.pt``) has one layout whatever the task::

    sdtl_format   "finetune" | "pretrain"      the task's kind (what --resume and loaders check)
    version       2
    arch, arch_options, config
    epoch         completed epochs
    step_in_epoch optimizer steps already taken in epoch ``epoch + 1`` (0 at an epoch boundary)
    <weights>     the task's own weight entries ("model" for fine-tuning; "encoder" and "head" for
                  pre-training: the keys every reader of sdtl checkpoints already knows)
    <meta>        the task's descriptive entries (class names, decoder, pretext task ...)
    optimizer, scheduler, scaler, rng, history, best
    task_state    the task's extra state: a regularizer's teacher or reference, counters
    callback_state  the call-outs' state, by name (the forgetting probe's previous-epoch features)
    loop_state    mid-epoch only: the epoch's meter sums and corrupt-video counts, the batch size,
                  processes and steps per epoch the position refers to (None at a boundary)
    ranks         every rank's own RNG, epoch state and task rank state (rank 0's rng and loop_state
                  are the entries above)

A checkpoint can be written after any optimizer step. Mid-epoch it also holds what is *not* the
model at that moment (a self-distillation teacher snapshotted at the epoch start, the epoch's loss
sums), so a run resumed from it continues exactly where it stopped: the data order of the epoch is
a pure function of (seed, epoch), and the position in it is ``step_in_epoch``.

Version-1 checkpoints (written before this layout) are read through :func:`read_checkpoint`, which
moves their top-level ``regularizer_state`` into ``task_state`` and ``probe_prev_features`` into
``callback_state``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdtl.engine import config as cfgmod
from sdtl.engine.runtime import capture_rng
from sdtl.models.checkpoints import save_checkpoint

CHECKPOINT_VERSION = 2


@dataclass
class TrainState:
    """Where a run is: the counters and records a checkpoint carries besides the tensors."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimizer steps taken in epoch ``epoch + 1``
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)

    @property
    def mid_epoch(self) -> bool:
        return self.step_in_epoch > 0


def build_checkpoint(cfg, task, state: TrainState, optimizer=None, scheduler=None, scaler=None,
                     callback_state: dict | None = None, ranks: list[dict] | None = None) -> dict:
    """The one checkpoint payload. Without an optimizer: the weights-only form (``encoder.pt``).

    ``ranks``: every rank's :func:`rank_entry` (gathered); rank 0's RNG and epoch state are also the
    top-level ``rng`` and ``loop_state`` (the same objects: saved once)."""
    payload = {
        "sdtl_format": task.kind, "version": CHECKPOINT_VERSION,
        "arch": cfg.model.arch, "arch_options": task.arch_options(),
        **task.meta(),
        "config": cfgmod.to_dict(cfg), "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
        **task.weights(),
        "history": state.history, "best": state.best,
    }
    if optimizer is not None:
        ranks = ranks or [rank_entry(task, None)]
        payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       scaler=scaler.state_dict() if scaler is not None else None, rng=ranks[0]["rng"],
                       task_state=task.state_dict(mid_epoch=state.mid_epoch), callback_state=callback_state or {},
                       loop_state=ranks[0]["loop"], ranks=ranks)
    return payload


def rank_entry(task, loop_state: dict | None) -> dict:
    """What one rank stores of its own: its RNG, its epoch state (mid-epoch) and the task's rank state."""
    return {"rng": capture_rng(), "loop": loop_state, "task": task.rank_state()}


def own_rank_entry(payload: dict | None, info) -> dict | None:
    """This rank's entry of a checkpoint; None for one written by another number of processes (or
    before per-rank entries existed)."""
    ranks = (payload or {}).get("ranks") or []
    return ranks[info.rank] if len(ranks) == info.world_size else None


def read_checkpoint(payload: dict) -> tuple[TrainState, dict]:
    """``(TrainState, payload)`` of a training checkpoint of any version, in today's layout."""
    payload = dict(payload)
    if payload.get("version", 1) < 2:
        if payload.get("sdtl_format") == "finetune":
            payload["task_state"] = {"regularizer": payload.pop("regularizer_state", None)}
            payload["callback_state"] = {"forgetting": {"prev_features": payload.pop("probe_prev_features", None)}}
        payload.setdefault("task_state", None)
        payload.setdefault("callback_state", {})
        payload.setdefault("loop_state", None)
        payload["version"] = CHECKPOINT_VERSION  # converted: reading it again changes nothing
    state = TrainState(epoch=int(payload["epoch"]), step_in_epoch=int(payload.get("step_in_epoch") or 0),
                       history=list(payload.get("history") or []), best=dict(payload.get("best") or {}))
    return state, payload


def save(payload: dict, path: Path) -> Path:
    """Write a checkpoint atomically (a crash leaves the old file or the new one, never half of one)."""
    return save_checkpoint(payload, path)
