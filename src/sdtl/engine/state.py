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

On disk (:func:`save`): every checkpoint a run writes gets ``NAME.sha256`` beside it (one
``sha256sum`` line, written atomically after the checkpoint; the old one is removed just before the
checkpoint's rename, so a file is never paired with another file's checksum). Before a new
``last.pt`` is written the one it replaces becomes ``prev.pt`` (with its checksum; a hard link where
the filesystem has them, so it costs no copy): the run keeps its last two checkpoints, and a resume
whose ``last.pt`` turns out truncated or corrupted falls back to ``prev.pt``
(:func:`sdtl.engine.rundir.start_run`). A ``last.pt`` that no longer matches its checksum is never
made ``prev.pt``: it is set aside as ``last.pt.corrupt``. ``best.pt`` is a copy of ``last.pt`` with
its checksum (:func:`keep_best`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sdtl.engine import config as cfgmod
from sdtl.engine.runtime import capture_rng
from sdtl.models.checkpoints import checkpoint_problem, checksum_path, copy_checkpoint, save_checkpoint

CHECKPOINT_VERSION = 2
LAST, PREV, BEST = "last.pt", "prev.pt", "best.pt"  # OUT/checkpoints/: the newest, the one before, the selected
CORRUPT_SUFFIX = ".corrupt"

log = logging.getLogger("sdtl.checkpoints")


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
    """Write a checkpoint atomically (a crash leaves the old file or the new one, never half of one),
    with its checksum file. A run's ``last.pt`` first keeps the one it replaces as ``prev.pt``.

    A full disk raises :class:`~sdtl.errors.NoSpaceError` naming ``path``; the old file is intact.
    """
    path = Path(path)
    if path.name == LAST:
        keep_previous(path)
    return save_checkpoint(payload, path, checksum=True)


def keep_previous(last: Path) -> Path | None:
    """``prev.pt`` := ``last.pt`` (with its checksum), before ``last.pt`` is replaced.

    A ``last.pt`` that does not match its checksum must not replace a good ``prev.pt``: it is set
    aside (``last.pt.corrupt``) instead, with a warning. Returns ``prev.pt`` when it was updated.
    """
    last = Path(last)
    if not last.is_file():
        return None
    problem = checkpoint_problem(last, trust_own_writes=True)
    if problem is not None:
        set_aside(last, problem)
        return None
    return copy_checkpoint(last, last.with_name(PREV))


def keep_best(last: Path) -> Path:
    """``best.pt`` := ``last.pt`` (with its checksum)."""
    return copy_checkpoint(last, Path(last).with_name(BEST))


def set_aside(path: Path, reason: str) -> Path:
    """Move a run's unusable checkpoint out of the way (``NAME.corrupt``, replacing an older one) so that
    nothing takes it for a good one; its checksum file goes with it. Says so in the log."""
    path = Path(path)
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, aside)
    sidecar = checksum_path(path)
    if sidecar.exists():
        os.replace(sidecar, checksum_path(aside))
    log.warning("%s: %s; kept as %s for inspection (sdtl will not read it)", path, reason, aside.name)
    return aside


def describe_position(payload: dict) -> str:
    """``"the end of epoch 3"`` / ``"epoch 4, step 2 (3 epochs completed)"``: where a checkpoint stands."""
    epoch, step = int(payload.get("epoch") or 0), int(payload.get("step_in_epoch") or 0)
    if step:
        return f"epoch {epoch + 1}, step {step} ({epoch} epoch(s) completed)"
    return f"the end of epoch {epoch}" if epoch else "the start (no epoch completed)"
