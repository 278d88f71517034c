"""Optimizer, learning-rate schedule, loss scaling and the optimizer step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sdtl.errors import ConfigError


def build_optimizer(optim_cfg, encoder: nn.Module, head: nn.Module | None,
                    weight_decay: float | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW over the encoder (grouped by depth with layer-wise lr decay) and the head.

    The encoder's spec (:mod:`sdtl.models.spec`) says how its parameters group into depths
    (``depth_of``: stem / embeddings 0, then one id per CNN stage or per transformer block) and which get
    no weight decay (``no_weight_decay``: a transformer's norms, biases, position embeddings and class
    tokens; nothing for the CNNs). Layer-wise decay (BEiT / VideoMAE, ``optim.layer_decay`` = d < 1):
    depth i of L gets ``lr · d^(L+1−i)``; parameters of depth None (VideoMAE's ``fc_norm``) the full
    ``lr``, the head ``lr`` × ``head_lr_mult``.
    ``weight_decay`` overrides the config's (regularizers that replace weight decay pass 0).
    ``fused``: one fused kernel for the whole step (CUDA; see :func:`use_fused`).
    """
    from sdtl.models.registry import spec_of_encoder

    spec = spec_of_encoder(encoder)
    wd = optim_cfg.weight_decay if weight_decay is None else weight_decay
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    decay = optim_cfg.layer_decay < 1
    buckets: dict[tuple[int | None, bool], list] = {}
    for name, p in named:
        buckets.setdefault((spec.depth_of(name) if decay else 0, spec.no_weight_decay(name, p)), []).append(p)
    deepest = max((depth for depth, _ in buckets if depth is not None), default=0)
    groups = []
    for depth, no_decay in sorted(buckets, key=lambda k: (math.inf if k[0] is None else k[0], k[1])):
        scale = optim_cfg.layer_decay ** (deepest + 1 - depth) if decay and depth is not None else 1.0
        name = ("encoder" if not decay else "encoder.with_head" if depth is None else f"encoder.stage{depth}")
        groups.append({"params": buckets[(depth, no_decay)], "lr": optim_cfg.lr * scale,
                       "weight_decay": 0.0 if no_decay else wd, "name": name + (".no_decay" if no_decay else "")})
    if head is not None:
        groups.append({"params": [p for p in head.parameters() if p.requires_grad],
                       "lr": optim_cfg.lr * optim_cfg.head_lr_mult, "weight_decay": wd, "name": "head"})
    extra = {"fused": True} if fused else {}
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=wd, **extra)
    return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                           weight_decay=wd, nesterov=optim_cfg.nesterov, **extra)


def lr_factor(optim_cfg, epoch_index: int) -> float:
    """Learning-rate multiplier for the 0-based epoch ``epoch_index`` (constant within an epoch).

    Cosine (RSPNet): from 1 at the first epoch after warm-up to ``min_lr_ratio`` at the last.
    Multistep: ×gamma at each milestone (1-based epoch numbers, as recipes write them).
    Warm-up: linear from 1/(W+1) over the first W epochs.
    LP-FT (``lp_epochs`` = K > 0): the first K epochs (head only) run at the full lr; warm-up and
    schedule then run over the remaining epochs, as if fine-tuning started at epoch K + 1.
    """
    lp = getattr(optim_cfg, "lp_epochs", 0)
    if epoch_index < lp:
        return 1.0
    epoch_index -= lp
    w = optim_cfg.warmup_epochs
    if epoch_index < w:
        return (epoch_index + 1) / (w + 1)
    if optim_cfg.schedule == "constant":
        return 1.0
    if optim_cfg.schedule == "multistep":
        passed = sum(1 for m in optim_cfg.milestones if epoch_index + 1 > m)
        return optim_cfg.gamma ** passed
    span = max(1, optim_cfg.epochs - lp - w - 1)
    t = min(1.0, (epoch_index - w) / span)
    lo = optim_cfg.min_lr_ratio
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optim_cfg, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(optim_cfg, e))


def optimizer_step(loss: torch.Tensor, optimizer, scaler, params, grad_clip: float | None, before_step=None) -> None:
    """Backward (loss-scaled for fp16), optional hook (e.g. averaging gradients), clip, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if before_step is not None:
        before_step()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def build_fast_optimizer(cfg, encoder, head, device, weight_decay: float | None = None):
    """:func:`build_optimizer` with ``optim.fused`` resolved; a fused step this torch/device lacks is a clear error."""
    fused = use_fused(cfg.optim, device)
    try:
        return build_optimizer(cfg.optim, encoder, head, weight_decay=weight_decay, fused=fused)
    except (RuntimeError, TypeError, ValueError) as exc:
        if not fused:
            raise
        if cfg.optim.fused == "auto":  # an older torch: the default falls back to the foreach step
            import logging

            logging.getLogger("sdtl").warning("optim.fused=auto: no fused %s step in torch %s on %s (%s); using "
                                              "the foreach step", cfg.optim.name, torch.__version__, device,
                                              str(exc).splitlines()[0])
            return build_optimizer(cfg.optim, encoder, head, weight_decay=weight_decay, fused=False)
        raise ConfigError("optim.fused", f"this torch ({torch.__version__}) cannot run a fused {cfg.optim.name} "
                          f"step on {device} ({(str(exc).splitlines() or [''])[0]})", "set optim.fused=off") from exc


def restore_scaler(scaler, saved: dict | None, logger) -> None:
    """Load a checkpoint's loss-scaler state when both sides scale; a resume that switches fp16 loss
    scaling on or off (``optim.amp`` changed, or ``auto`` on another card) starts from a fresh scale."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)
    elif bool(saved) != scaler.is_enabled():
        logger.warning("resuming with fp16 loss scaling %s (the checkpoint was written with it %s); %s",
                       "on" if scaler.is_enabled() else "off", "on" if saved else "off",
                       "starting from a fresh scale" if scaler.is_enabled() else "its scale is not used")


def make_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only (bf16 has fp32's range); its state is saved in every checkpoint."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def use_fused(optim_cfg, device: torch.device) -> bool:
    """``optim.fused``: auto = the fused (single-kernel) optimizer step on CUDA."""
    return optim_cfg.fused == "on" or (optim_cfg.fused == "auto" and device.type == "cuda")
