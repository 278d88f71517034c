"""Self-distillation from the previous epoch's encoder (the paper's Algorithm 1).

At the start of every epoch t the encoder is copied and frozen as a teacher ``f'`` (at epoch 1 the
copy is the pre-trained encoder). Each batch then adds ``λ · L_SD`` to the cross-entropy, with
``L_SD = ‖f_θt(x) − f'(x)‖²`` on the *same* augmented clips ``x``. The teacher pulls the student
towards what the encoder knew one epoch ago, so knowledge from pre-training fades slowly instead
of being overwritten in the first epochs of fine-tuning.

The class is a drop-in for any PyTorch loop::

    sd = SelfDistillation(model.encoder, weight=100.0, reduction="mean", teacher_bn="batch")
    for epoch in range(epochs):
        sd.snapshot()                                   # teacher <- frozen copy of the encoder
        for clips, labels in loader:
            features = model.encoder(clips)
            loss = F.cross_entropy(model.head(features), labels) + sd(clips, features)
            ...

The engine (:mod:`sdtl.engine.finetune`) uses exactly this object; nothing else in sdtl knows how
the penalty is computed.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

Reduction = Literal["mean", "sum"]
TeacherBN = Literal["eval", "batch"]


class SelfDistillation(nn.Module):
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

    def __init__(self, encoder: nn.Module, weight: float = 1.0, reduction: Reduction = "mean",
                 teacher_bn: TeacherBN = "batch") -> None:
        super().__init__()
        if not (weight >= 0):  # also rejects NaN
            raise ValueError(f"SelfDistillation weight (lambda) must be >= 0, got {weight}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"SelfDistillation reduction must be 'mean' or 'sum', got {reduction!r}")
        if teacher_bn not in ("eval", "batch"):
            raise ValueError(f"SelfDistillation teacher_bn must be 'eval' or 'batch', got {teacher_bn!r}")
        # Stored outside the module tree: the student belongs to the model, not to the regularizer,
        # and must not appear twice in state dicts or parameter lists.
        self.__dict__["student"] = encoder
        self.weight = float(weight)
        self.reduction = reduction
        self.teacher_bn = teacher_bn
        self.teacher: nn.Module | None = None

    @torch.no_grad()
    def snapshot(self) -> None:
        """Make the teacher a frozen copy of the encoder as it is now (call at each epoch start)."""
        student = self.__dict__["student"]
        if self.teacher is None:
            teacher = copy.deepcopy(student)
            teacher.requires_grad_(False)
            teacher.eval()
            if self.teacher_bn == "batch":
                _use_batch_statistics(teacher)
            self.teacher = teacher
        else:
            _copy_into(self.teacher, student)

    def teacher_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Features of ``clips`` under the teacher (no graph, no buffer updates)."""
        if self.teacher is None:
            raise RuntimeError("SelfDistillation: call snapshot() before the first batch of an epoch")
        with torch.inference_mode():
            return self.teacher(clips)

    def forward(self, clips: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        """Return ``λ · L_SD`` for a batch whose student features are ``student_features``."""
        return self.penalty(self.teacher_features(clips), student_features)

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

    # For loops that checkpoint mid-epoch: the teacher is then part of the training state.
    # (sdtl's engine checkpoints at epoch boundaries, where the next teacher is the model itself.)
    def teacher_state_dict(self) -> dict | None:
        if self.teacher is None:
            return None
        return {name: t.detach().clone() for name, t in [*self.teacher.named_parameters(),
                                                          *self.teacher.named_buffers()]}

    @torch.no_grad()
    def load_teacher_state_dict(self, state: dict | None) -> None:
        if state is None:
            self.teacher = None
            return
        if self.teacher is None:
            self.snapshot()
        own = dict([*self.teacher.named_parameters(), *self.teacher.named_buffers()])
        if own.keys() != state.keys():
            missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
            raise ValueError(f"teacher state does not match the encoder: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, tensor in own.items():
            tensor.copy_(state[name])

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reduction={self.reduction!r}, teacher_bn={self.teacher_bn!r}"


def _use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm normalise with batch statistics while the module stays in eval mode.

    PyTorch's BatchNorm uses batch statistics when it has no running buffers; in eval mode it then
    also has nothing to update. Eval mode keeps everything else (dropout) deterministic.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


@torch.no_grad()
def _copy_into(teacher: nn.Module, student: nn.Module) -> None:
    """Copy the student's parameters and buffers into the teacher's own storage (no new allocation).

    Only tensors the teacher has are copied: with ``teacher_bn="batch"`` its BatchNorms have no
    running buffers. (``load_state_dict`` can't be used for that: BatchNorm re-inserts
    ``num_batches_tracked`` and then rejects it as unexpected.)
    """
    source = dict(student.named_parameters())
    source.update(student.named_buffers())
    for name, tensor in [*teacher.named_parameters(), *teacher.named_buffers()]:
        tensor.copy_(source[name])
