"""Self-distillation from an exponential moving average (EMA) of the student.

An alternative to the paper's epoch snapshot: after every optimizer step the teacher moves a little
towards the student, ``θ' ← a·θ' + (1 − a)·θ`` (Mean Teacher, Tarvainen & Valpola, NeurIPS 2017,
arXiv:1703.01780). The penalty is SD's, ``λ · ‖f_θ(x) − f_θ'(x)‖²`` on encoder features. Its memory
is about ``1/(1 − a)`` steps (a = 0.999: ~1000 steps, about one UCF101 epoch at batch 8).

Choices the papers leave open, as made here:

* the teacher starts as the pre-trained encoder (Mean Teacher starts from the student's random
  init and ramps ``a`` up from 0 with ``min(1 − 1/(t+1), a)``; here the point is to remember the
  pre-trained encoder, so ``a`` is constant from the first step);
* what is averaged: every parameter, and the running BatchNorm statistics when ``teacher_bn="eval"``
  (with the default ``"batch"`` the teacher has no running statistics to average);
* distance on features, not softmax outputs (the encoder has no output layer shared with the
  teacher), with the same reduction as SD.

The averaged teacher cannot be recomputed from the model, so it is stored in checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn

from sdtl.regularizers.base import tensors_of
from sdtl.regularizers.options.ema import EMAOptions
from sdtl.regularizers.self_distillation import Reduction, SelfDistillation, TeacherBN


class EMASelfDistillation(SelfDistillation):
    """SD with an EMA teacher (``decay`` per optimizer step)."""

    part = "ema_sd"
    stores_teacher = True

    def __init__(self, encoder: nn.Module, weight: float = 1.0, decay: float = 0.999, reduction: Reduction = "mean",
                 teacher_bn: TeacherBN = "batch") -> None:
        EMAOptions(ema_decay=decay)  # the check of decay (the base class checks the rest)
        super().__init__(encoder, weight=weight, reduction=reduction, teacher_bn=teacher_bn)
        self.decay = float(decay)
        self.snapshot()

    @classmethod
    def from_options(cls, encoder: nn.Module, head: nn.Module | None, weight: float,
                     options: EMAOptions) -> EMASelfDistillation:
        return cls(encoder, weight=weight, decay=options.ema_decay, reduction=options.reduction,
                   teacher_bn=options.teacher_bn)

    def epoch_start(self) -> None:  # the teacher follows the student step by step instead
        pass

    @torch.no_grad()
    def step_end(self) -> None:
        student = tensors_of(self.__dict__["student"])
        for name, t in tensors_of(self.teacher).items():
            if t.is_floating_point():
                t.lerp_(student[name].to(t.dtype), 1.0 - self.decay)  # a·t + (1 − a)·s
            else:
                t.copy_(student[name])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", decay={self.decay}"
