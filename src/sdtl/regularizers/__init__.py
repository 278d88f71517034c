"""Regularizers that keep a fine-tuned encoder close to what it knew (the self-distillation family).

Each is a drop-in ``nn.Module`` with the protocol of :class:`~sdtl.regularizers.base.Regularizer`;
:func:`build_regularizer` builds the one a config names (``regularizer.name``).
"""
from __future__ import annotations

from sdtl.regularizers.base import Regularizer
from sdtl.regularizers.bss import BSS
from sdtl.regularizers.delta import DELTA
from sdtl.regularizers.ema import EMASelfDistillation
from sdtl.regularizers.fixed_teacher import FixedTeacherDistillation
from sdtl.regularizers.l2sp import L2SP
from sdtl.regularizers.self_distillation import SelfDistillation

__all__ = ["BSS", "DELTA", "EMASelfDistillation", "FixedTeacherDistillation", "L2SP", "Regularizer",
           "SelfDistillation", "build_regularizer"]


def build_regularizer(reg_cfg, encoder, head) -> Regularizer | None:
    """The regularizer of ``reg_cfg`` (a :class:`~sdtl.engine.config.RegularizerConfig`) on this
    encoder and head, or None for plain fine-tuning (``name: none`` or ``weight: 0``).

    Built when fine-tuning starts, so every frozen reference is the encoder as loaded (pre-trained).
    """
    r = reg_cfg
    if r.name == "none" or r.weight == 0:
        return None
    if r.name == "sd":
        return SelfDistillation(encoder, weight=r.weight, reduction=r.reduction, teacher_bn=r.teacher_bn,
                                snapshot_every=r.snapshot_every)
    if r.name == "fixed_teacher":
        return FixedTeacherDistillation(encoder, weight=r.weight, reduction=r.reduction, teacher_bn=r.teacher_bn)
    if r.name == "ema_sd":
        return EMASelfDistillation(encoder, weight=r.weight, decay=r.ema_decay, reduction=r.reduction,
                                   teacher_bn=r.teacher_bn)
    if r.name == "l2sp":
        return L2SP(encoder, head, weight=r.weight, head_weight=r.head_weight)
    if r.name == "delta":
        return DELTA(encoder, head, weight=r.weight, head_weight=r.head_weight, layers=r.layers or None,
                     teacher_bn=r.teacher_bn)
    if r.name == "bss":
        return BSS(encoder, weight=r.weight, k=r.k)
    raise ValueError(f"unknown regularizer {r.name!r}")
