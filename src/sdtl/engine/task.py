"""What a task is to the training loop (:mod:`sdtl.engine.loop`).

A task owns its trainable parts and whatever else it needs to turn a batch into losses (a teacher,
a queue, a regularizer); the loop owns everything else (AMP, the optimizer, scheduler and scaler
steps, DDP, compile, progress, logging, RNG, checkpoints, resume and stop requests). Fine-tuning
(:class:`sdtl.engine.finetune.ClassificationTask`) and pre-training with a pretext task
(:class:`sdtl.engine.pretrain.PretextTask`: playback speed; :class:`sdtl.engine.pretrain.RSPNetTask`:
RSPNet's two clips, momentum key network and queue) are the tasks today.
"""
from __future__ import annotations

import torch
from torch import nn


class Task:
    """The loop-facing protocol, with do-nothing defaults.

    ``model`` holds every trainable parameter: the optimizer steps it and checkpoints store it.
    """

    #: the checkpoint's ``sdtl_format`` (what ``--resume`` accepts for this task)
    kind: str = ""
    model: nn.Module

    def ddp_module(self) -> nn.Module:
        """What DistributedDataParallel wraps: the trainable forward, never a frozen teacher."""
        return self.model

    def epoch_start(self, epoch: int) -> None:
        """Before the first batch of epoch ``epoch`` (not called when resuming inside it)."""

    def train_mode(self, epoch: int) -> None:
        """Put the modules in the right mode for this epoch's steps."""
        self.model.train()

    def losses(self, net: nn.Module, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        """``{"loss": total, <part>: value, ...}`` of one batch (``net`` is the DDP/compiled wrapper).

        The parts (everything but ``"loss"``) are logged as ``train_<part>`` and checked for NaN.
        """
        raise NotImplementedError

    def logged_lr(self, optimizer) -> float:
        """The epoch's ``lr`` in metrics.jsonl: the base lr (layer-wise decay lowers the other groups)."""
        return max(g["lr"] for g in optimizer.param_groups)

    def before_step(self, epoch: int):
        """A callable run between backward and the optimizer step (e.g. averaging gradients), or None."""
        return None

    def step_end(self) -> None:
        """After every optimizer step."""

    def epoch_metrics(self, info) -> dict[str, float]:
        """Task-specific train metrics of the finished epoch (reduced over ranks)."""
        return {}

    # ---- checkpoint entries (see sdtl.engine.state)
    def arch_options(self) -> dict:
        return {}

    def meta(self) -> dict:
        """Descriptive checkpoint entries (class names, the pretext task ...)."""
        return {}

    def weights(self) -> dict:
        """The checkpoint's weight entries."""
        raise NotImplementedError

    def load_weights(self, payload: dict) -> None:
        raise NotImplementedError

    def state_dict(self, mid_epoch: bool) -> dict | None:
        """Extra state a resumed run needs, the same on every rank (a teacher, a reference);
        ``mid_epoch``: written inside an epoch."""
        return None

    def rank_state(self) -> dict | None:
        """This rank's own running state inside an epoch (e.g. its accuracy counters); each rank's is
        stored and comes back to it on resume."""
        return None

    def load_rank_state(self, state: dict | None) -> None:
        """Restore :meth:`rank_state`'s output."""

    def load_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`state_dict`'s output."""
