"""Pieces every benchmark script shares: peak memory, device sync, and one training step in the engine's order.

Imported by the scripts next to it (``python benchmarks/X.py`` puts this folder on ``sys.path``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on Linux
CPU the resident-set high-water mark (``VmHWM``) above the resident set at the reset, which needs
glibc to return freed tensor buffers to the OS: :func:`reexec_for_cpu_peaks` restarts the script
with ``MALLOC_MMAP_THRESHOLD_=65536`` once.
"""
from __future__ import annotations

import os
import re
import sys

import torch
import torch.nn.functional as F

from sdtl.engine.optim import optimizer_step


def rss_peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def reexec_for_cpu_peaks() -> None:
    """Restart this script once with ``MALLOC_MMAP_THRESHOLD_=65536`` (Linux), so the RSS shows a step's peak."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory measurement; returns the baseline to subtract (0 on CUDA: absolute peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current resident set
        fh.write("5")
    return rss_peak_kib() * 1024


def peak_bytes(device: torch.device, base: int) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return rss_peak_kib() * 1024 - base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, reg, opt, clips, labels, scaler=None, dtype=None) -> None:
    """One step as :mod:`sdtl.engine.finetune` runs it: the regularizer's teacher/reference forward
    (``reg.prepare``) before the student's, CE + ``reg.loss``, backward (loss-scaled when a scaler is
    given) and optimizer step by the engine's :func:`~sdtl.engine.optim.optimizer_step`, ``reg.step_end``.
    ``reg=None``: plain fine-tuning."""
    with torch.autocast(clips.device.type, dtype=dtype, enabled=dtype is not None):
        ctx = reg.prepare(clips) if reg is not None else None
        logits, feats = model.forward_features(clips)
        loss = F.cross_entropy(logits.float(), labels)
        if reg is not None:
            loss = loss + reg.loss(ctx, feats)
    # the engine's own step (zero_grad, scaled backward, step, scale update); a disabled scaler is a plain step
    optimizer_step(loss, opt, scaler if scaler is not None else torch.amp.GradScaler(enabled=False), None, None)
    if reg is not None:
        reg.step_end()
