"""Optimizer, learning-rate schedule, loss scaling and the optimizer step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sdtl.errors import ConfigError


def stage_of(param_name: str) -> int:
    """Depth id of an encoder parameter for layer-wise lr decay: stem 0, stages 1..4.

    sdtl's encoders name their stages by number (C3D ``conv1``/``bn1`` ... ``conv5b``, the R(2+1)D-10
    ``conv1`` ... ``conv5``: stage = number − 1) or as torchvision (``stem``, ``layer1`` ... ``layer4``).
    One id per stage, not per block: with one id per block a deep CNN's first layers all but freeze.
    """
    import re

    top = param_name.split(".")[0]
    if top == "stem":
        return 0
    m = re.fullmatch(r"layer(\d)", top) or re.fullmatch(r"(?:conv|bn)(\d)[a-z]?", top)
    if m is None:
        raise ConfigError("optim.layer_decay", f"cannot tell which stage encoder parameter {param_name!r} belongs "
                          f"to; layer-wise decay supports sdtl's C3D / R(2+1)D and torchvision's VideoResNet "
                          f"encoders", "set optim.layer_decay=1")
    number = int(m.group(1))
    return number if top.startswith("layer") else number - 1


def build_optimizer(optim_cfg, encoder: nn.Module, head: nn.Module | None,
                    weight_decay: float | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW over the encoder (one group, or one per stage with layer-wise lr decay) and the head.

    Layer-wise decay (BEiT / VideoMAE, ``optim.layer_decay`` = d < 1): stage i of L gets
    ``lr · d^(L+1−i)``, the stem ``lr · d^(L+1)``, the head ``lr`` (× ``head_lr_mult``).
    ``weight_decay`` overrides the config's (regularizers that replace weight decay pass 0).
    ``fused``: one fused kernel for the whole step (CUDA; see :func:`use_fused`).
    """
    wd = optim_cfg.weight_decay if weight_decay is None else weight_decay
    params = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    if optim_cfg.layer_decay < 1:
        stages: dict[int, list] = {}
        for name, p in params:
            stages.setdefault(stage_of(name), []).append(p)
        depth = max(stages)
        groups = [{"params": stages[i], "lr": optim_cfg.lr * optim_cfg.layer_decay ** (depth + 1 - i),
                   "name": f"encoder.stage{i}"} for i in sorted(stages)]
    else:
        groups = [{"params": [p for _, p in params], "lr": optim_cfg.lr, "name": "encoder"}]
    if head is not None:
        groups.append({"params": [p for p in head.parameters() if p.requires_grad],
                       "lr": optim_cfg.lr * optim_cfg.head_lr_mult, "name": "head"})
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
