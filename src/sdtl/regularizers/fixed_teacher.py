"""Distillation towards the *pre-trained* encoder, never refreshed (the "no snapshot refresh" ablation).

Same penalty as :class:`~sdtl.regularizers.self_distillation.SelfDistillation`,
``λ · ‖f_θ(x) − f_θ⁰(x)‖²`` on the same augmented clips, but the teacher is the encoder fine-tuning
started from, for every epoch. It is the feature-level, target-data form of Learning without
Forgetting (Li & Hoiem, ECCV 2016, arXiv:1606.09282), which distils the old network's *outputs* with
a temperature; here there is no old task head, so the encoder's features are matched directly, with
the same reduction and teacher BatchNorm mode as SD (``regularizer.reduction``,
``regularizer.teacher_bn``). Choices the papers leave open, as made here:

* the teacher's features are computed on the current augmented clip every step (LwF records one
  output per sample once; recording would freeze one augmentation per video);
* the teacher is the model's encoder at construction time, i.e. exactly the loaded pre-trained
  weights (or the random init when fine-tuning from scratch).

The teacher is stored in checkpoints (:meth:`checkpoint_state`), so a resumed run distils towards
the same weights even if the pre-trained file has changed since.
"""
from __future__ import annotations

from torch import nn

from sdtl.regularizers.self_distillation import Reduction, SelfDistillation, TeacherBN


class FixedTeacherDistillation(SelfDistillation):
    """SD whose teacher is frozen once, at construction (the pre-trained encoder)."""

    part = "fixed_teacher"
    stores_teacher = True

    def __init__(self, encoder: nn.Module, weight: float = 1.0, reduction: Reduction = "mean",
                 teacher_bn: TeacherBN = "batch") -> None:
        super().__init__(encoder, weight=weight, reduction=reduction, teacher_bn=teacher_bn)
        self.snapshot()

    def epoch_start(self) -> None:  # never refreshed
        pass

    def step_end(self) -> None:
        pass
