"""What every sdtl regularizer offers the training loop, and the frozen-copy helpers they share.

A regularizer is an ``nn.Module`` built on the student encoder (and, where it needs one, the head).
Any PyTorch loop can use it the same way::

    reg = L2SP(model.encoder, model.head, weight=0.01)        # or SelfDistillation, DELTA, BSS ...
    for epoch in range(epochs):
        reg.epoch_start()                                       # SD: snapshot the teacher
        for clips, labels in loader:
            features = model.encoder(clips)
            loss = F.cross_entropy(model.head(features), labels) + reg(clips, features)
            ...backward, optimizer step...
            reg.step_end()                                      # EMA teacher: average the student in

``reg(clips, features)`` returns ``weight × penalty``. Loops that care about peak memory split it in
two, as :mod:`sdtl.engine.finetune` does: ``ctx = reg.prepare(clips)`` *before* the student forward
(a teacher's transient activations are then freed before the student's are saved), and
``reg.loss(ctx, features)`` after it.

State a resumed run needs (a fixed reference, an averaged teacher, attention weights) comes from
:meth:`checkpoint_state` and goes back with :meth:`load_checkpoint_state`; at an epoch boundary the
epoch-snapshot teacher of plain SD needs none (it *is* the model), but a checkpoint written in the
middle of an epoch (``checkpoint_state(mid_epoch=True)``) holds it and its step counter. A loop that
resumes mid-epoch does not call :meth:`epoch_start` for the resumed epoch (``resumed_mid_epoch``
says a loaded state was such a one).

The registry (:mod:`sdtl.regularizers.registry`) builds a regularizer from a config with
:meth:`Regularizer.from_options`; the keyword constructors validate through the same options
dataclass (:mod:`sdtl.regularizers.options`), so every check is written once.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn


class Regularizer(nn.Module):
    """Base class: the loop-facing protocol with do-nothing defaults."""

    #: metric name of the penalty (``train_<part>`` in metrics.jsonl)
    part: str = "reg"
    #: True when the penalty already contains an L2 on the new weights and the optimizer's weight
    #: decay (which pulls towards 0, against the pre-trained point) must be off (L2-SP, DELTA)
    replaces_weight_decay: bool = False
    #: what ``weight`` is called in the method's paper (named in errors)
    weight_symbol: str = "weight"
    #: training clips :meth:`start` wants once, before the first step of a fresh run (0: none)
    start_clips: int = 0
    #: True after :meth:`load_checkpoint_state` restored a mid-epoch state, until the next :meth:`epoch_start`
    resumed_mid_epoch: bool = False

    def __init__(self, weight: float) -> None:
        super().__init__()
        if not (weight >= 0):  # also rejects NaN
            raise ValueError(f"{type(self).__name__} weight ({self.weight_symbol}) must be >= 0, got {weight}")
        self.weight = float(weight)

    @classmethod
    def from_options(cls, encoder: nn.Module, head: nn.Module | None, weight: float, options) -> Regularizer:
        """Build from a config: ``weight`` and the method's (already validated) options dataclass.

        Default: the options' fields are the constructor's keyword arguments; classes whose
        constructor differs (needs the head, renames a key) override this.
        """
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.init}
        return cls(encoder, weight=weight, **fields)

    def epoch_start(self) -> None:
        """Called before the first batch of every epoch (not for an epoch resumed mid-way)."""
        self.resumed_mid_epoch = False

    def step_end(self) -> None:
        """Called after every optimizer step."""

    def prepare(self, clips: torch.Tensor):
        """Whatever must be computed from ``clips`` before the student's forward (default: nothing)."""
        return None

    def loss(self, ctx, student_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, clips: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        return self.loss(self.prepare(clips), student_features)

    def start(self, clips: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int,
              seed: int) -> str | None:
        """One-off set-up of a fresh run from ``start_clips`` training clips (not called on resume, where
        :meth:`load_checkpoint_state` restores its result); returns a line for the log."""
        return None

    def checkpoint_state(self, mid_epoch: bool = False) -> dict | None:
        """Tensors a resumed run needs to continue bit-exactly (None: nothing).

        ``mid_epoch``: the checkpoint is written after some optimizer step inside an epoch, and the
        run resumes without calling :meth:`epoch_start` for that epoch.
        """
        return None

    def load_checkpoint_state(self, state: dict | None) -> None:
        if state is not None:
            raise ValueError(f"{type(self).__name__} keeps no checkpoint state, got {sorted(state)[:3]}")


def frozen_copy(module: nn.Module, batch_statistics: bool) -> nn.Module:
    """A deep copy that shares no storage, needs no gradient and stays in eval mode.

    ``batch_statistics``: its BatchNorms normalise with the statistics of the batch they see (and
    update nothing) instead of their running buffers; see :class:`SelfDistillation` ``teacher_bn``.
    """
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    teacher.eval()
    if batch_statistics:
        use_batch_statistics(teacher)
    return teacher


def use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm normalise with batch statistics while the module stays in eval mode.

    PyTorch's BatchNorm uses batch statistics when it has no running buffers; in eval mode it then
    also has nothing to update. Eval mode keeps everything else (dropout) deterministic.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name (a BatchNorm without running buffers contributes none)."""
    return dict([*module.named_parameters(), *module.named_buffers()])


@torch.no_grad()
def copy_into(teacher: nn.Module, student: nn.Module) -> None:
    """Copy the student's parameters and buffers into the teacher's own storage (no new allocation).

    Only tensors the teacher has are copied: with batch statistics its BatchNorms have no running
    buffers. (``load_state_dict`` can't be used for that: BatchNorm re-inserts
    ``num_batches_tracked`` and then rejects it as unexpected.)
    """
    source = tensors_of(student)
    for name, tensor in tensors_of(teacher).items():
        tensor.copy_(source[name])


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tensors_of(module).items()}


@torch.no_grad()
def load_state_into(module: nn.Module, state: dict, what: str) -> None:
    own = tensors_of(module)
    if own.keys() != state.keys():
        missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        raise ValueError(f"{what} state does not match the encoder: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in own.items():
        tensor.copy_(state[name])
