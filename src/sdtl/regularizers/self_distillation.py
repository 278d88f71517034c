"""Self-distillation from the previous epoch's encoder (the paper's Algorithm 1).

At the start of every epoch t the encoder is copied and frozen as a teacher ``f'`` (at epoch 1 the
copy is the pre-trained encoder). Each batch then adds ``λ · L_SD`` to the cross-entropy, with
``L_SD = ‖f_θt(x) − f'(x)‖²`` on the *same* augmented clips ``x``. The teacher pulls the student
towards what the encoder knew one epoch ago, so knowledge from pre-training fades slowly instead
of being overwritten in the first epochs of fine-tuning.

The class is a drop-in for any PyTorch loop::

    sd = SelfDistillation(model.encoder, weight=1.0, reduction="mean", teacher_bn="batch")
    for epoch in range(epochs):
        sd.epoch_start()                                # teacher <- frozen copy of the encoder
        for clips, labels in loader:
            features = model.encoder(clips)
            loss = F.cross_entropy(model.head(features), labels) + sd(clips, features)
            ...
            sd.step_end()                               # only does something with snapshot_every > 0

``snapshot_every=N`` (config ``regularizer.snapshot_every``) also refreshes the teacher after every
N optimizer steps within an epoch (an ablation between the epoch snapshot and an EMA teacher; the
paper refreshes once per epoch). The count restarts at each epoch, so an epoch boundary still
snapshots and a run resumed at an epoch boundary needs no teacher state; a checkpoint written
mid-epoch (``checkpoint_state(mid_epoch=True)``) holds the teacher and the count. Relatives with
other teachers:
:class:`~sdtl.regularizers.fixed_teacher.FixedTeacherDistillation` (the pre-trained encoder, never
refreshed) and :class:`~sdtl.regularizers.ema.EMASelfDistillation` (an average of the student).

The engine (:mod:`sdtl.engine.finetune`) uses exactly this object; nothing else in sdtl knows how
the penalty is computed.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sdtl.regularizers.base import (
    Regularizer,
    copy_into,
    frozen_copy,
    load_state_into,
    state_of,
)
from sdtl.regularizers.options.self_distillation import SDOptions

Reduction = Literal["mean", "sum"]
TeacherBN = Literal["eval", "batch"]


class SelfDistillation(Regularizer):
    """Feature-level self-distillation towards a frozen snapshot of ``encoder``.

    Args:
        encoder: the student encoder; it must map clips ``[B, C, T, H, W]`` to features ``[B, D]``
            (any shape works as long as student and teacher agree).
        weight: λ, the multiplier of the penalty. Must be ≥ 0. With λ = 0 prefer not building this
            object at all (the engine does so): a snapshot costs a copy of the encoder.
        reduction: how ``‖f(x) − f'(x)‖²`` is reduced over the batch.

            * ``"mean"`` (default): mean over batch *and* feature elements, i.e. the MSE. On this scale
              the paper's λ grid 0.1 … 1000 is sensible (with 512-d features a summed distance would
              make λ = 100 swamp the cross-entropy).
            * ``"sum"``: squared L2 distance per sample, summed over feature elements, then averaged
              over the batch.
        teacher_bn: which BatchNorm statistics the teacher uses (the paper does not say).

            * ``"batch"`` (default): the statistics of the current batch, like the student in
              training mode. No buffer is updated. Right after a snapshot the teacher computes exactly
              the student's function, so the penalty is exactly 0 and measures only how far the
              student's *weights* have moved since the snapshot.
            * ``"eval"``: the teacher's frozen running statistics, as in ordinary inference. The
              penalty is then not zero even right after a snapshot (the student normalises with batch
              statistics), and with a large λ it pulls the student's training-mode features towards
              inference-mode ones. Measured in sdtl's tests: with λ = 100 and small batches or small
              inputs (few values per BatchNorm channel), "eval" diverged within two epochs where
              "batch" stayed stable — hence the default.

    The teacher is a deep copy (no parameter or buffer is shared with the student), has
    ``requires_grad=False`` everywhere, and runs under :func:`torch.inference_mode`, so it keeps no
    activations for backward: its only memory cost is one copy of the encoder's weights.
    """

    part = "sd"
    weight_symbol = "lambda"
    #: subclasses whose teacher is not the model at an epoch boundary keep it in checkpoints
    stores_teacher = False

    def __init__(self, encoder: nn.Module, weight: float = 1.0, reduction: Reduction = "mean",
                 teacher_bn: TeacherBN = "batch", snapshot_every: int = 0) -> None:
        super().__init__(weight)
        SDOptions(reduction=reduction, teacher_bn=teacher_bn, snapshot_every=snapshot_every)  # the checks
        # Stored outside the module tree: the student belongs to the model, not to the regularizer,
        # and must not appear twice in state dicts or parameter lists.
        self.__dict__["student"] = encoder
        self.reduction = reduction
        self.teacher_bn = teacher_bn
        self.snapshot_every = int(snapshot_every)
        self._steps = 0  # optimizer steps since the epoch's snapshot (snapshot_every counts them)
        self.teacher: nn.Module | None = None

    def epoch_start(self) -> None:
        super().epoch_start()
        self._steps = 0
        self.snapshot()

    def step_end(self) -> None:
        self._steps += 1
        if self.snapshot_every and self._steps % self.snapshot_every == 0:
            self.snapshot()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Make the teacher a frozen copy of the encoder as it is now (call at each epoch start)."""
        student = self.__dict__["student"]
        if self.teacher is None:
            self.teacher = frozen_copy(student, batch_statistics=self.teacher_bn == "batch")
        else:
            copy_into(self.teacher, student)

    def teacher_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Features of ``clips`` under the teacher (no graph, no buffer updates)."""
        if self.teacher is None:
            raise RuntimeError("SelfDistillation: call snapshot() before the first batch of an epoch")
        with torch.inference_mode():
            return self.teacher(clips)

    def prepare(self, clips: torch.Tensor) -> torch.Tensor:
        return self.teacher_features(clips)

    def loss(self, ctx: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        """``λ · L_SD`` for a batch whose student features are ``student_features``."""
        return self.penalty(ctx, student_features)

    def penalty(self, teacher_features: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        """``λ · L_SD`` from precomputed teacher features.

        Training loops that care about peak memory compute ``teacher_features(clips)`` *before* the
        student forward, so the teacher's transient activations never coexist with the student's
        saved ones; :mod:`sdtl.engine.finetune` does this.
        """
        # Inference tensors cannot enter autograd; a clone is an ordinary constant tensor.
        target = teacher_features.clone() if teacher_features.is_inference() else teacher_features
        diff = student_features.float() - target.float()
        if self.reduction == "mean":
            distance = diff.pow(2).mean()
        else:
            distance = diff.pow(2).flatten(1).sum(dim=1).mean()
        return self.weight * distance

    # Mid-epoch the teacher is part of the training state; at an epoch boundary the next teacher is
    # the model itself (epoch_start snapshots it).
    def teacher_state_dict(self) -> dict | None:
        return None if self.teacher is None else state_of(self.teacher)

    def load_teacher_state_dict(self, state: dict | None) -> None:
        if state is None:
            self.teacher = None
            return
        if self.teacher is None:
            self.snapshot()
        load_state_into(self.teacher, state, "teacher")

    def checkpoint_state(self, mid_epoch: bool = False) -> dict | None:
        if self.stores_teacher:
            return {"teacher": self.teacher_state_dict()}
        if not mid_epoch:
            return None
        return {"teacher": self.teacher_state_dict(), "steps": self._steps}

    def load_checkpoint_state(self, state: dict | None) -> None:
        if self.stores_teacher:
            if not state or "teacher" not in state:
                raise ValueError(f"{self.part}: the checkpoint holds no teacher; it was not written by a {self.part} run")
            self.load_teacher_state_dict(state["teacher"])
            return
        if state is None:  # an epoch boundary: epoch_start snapshots the (restored) model
            self.resumed_mid_epoch = False
            return
        if "teacher" not in state or "steps" not in state:
            raise ValueError(f"{self.part}: expected no state (epoch boundary) or a mid-epoch teacher and step "
                             f"count, got {sorted(state)[:3]}")
        self.load_teacher_state_dict(state["teacher"])
        self._steps = int(state["steps"])
        self.resumed_mid_epoch = True

    def extra_repr(self) -> str:
        every = f", snapshot_every={self.snapshot_every}" if self.snapshot_every else ""
        return f"weight={self.weight}, reduction={self.reduction!r}, teacher_bn={self.teacher_bn!r}{every}"

