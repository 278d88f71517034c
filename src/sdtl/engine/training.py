"""Pieces shared by every training loop in sdtl (fine-tuning and pre-training).

Optimizer and learning-rate schedule, seeding and determinism, RNG state capture for exact resume,
the run-directory rules (never overwrite a run silently), and the per-epoch progress meter.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdtl.engine.runlock import LOCK_NAME, RunLock
from sdtl.errors import RunFailed, UserError


# ------------------------------------------------------------------------------- run directory
# What sdtl writes into a run folder before its config.yaml: none of it makes a folder a run.
BOOKKEEPING = frozenset({LOCK_NAME, "train.log", "video_index.jsonl"})


def resolve_resume(out_dir: Path, resume: str | None, is_main: bool = True) -> Path | None:
    """Decide which checkpoint to resume from, refusing to touch an existing run unasked.

    ``resume=None``: ``out_dir`` must not hold a run (or anything else). ``"auto"``: resume from
    ``out_dir/checkpoints/last.pt`` when it exists, else start fresh. A path: that checkpoint.
    With a resume, ``out_dir`` must be new, empty, or a run folder (it has config.yaml or last.pt).
    """
    last = out_dir / "checkpoints" / "last.pt"
    # Only rank 0 judges the folder: by the time another rank looks, rank 0 may have written in it.
    content = sorted(p.name for p in out_dir.iterdir() if p.name not in BOOKKEEPING) \
        if is_main and out_dir.is_dir() else []
    if resume is None:
        if content:
            what = "a run" if (out_dir / "config.yaml").exists() or last.exists() else "files"
            raise UserError(f"--out {out_dir}: already holds {what}; pass --resume auto to continue it, "
                            f"or choose a new --out directory")
        return None
    if content and not (out_dir / "config.yaml").exists() and not last.exists():
        # --resume continues a run; it must not write config.yaml, metrics.jsonl, results.json ...
        # over the files of a folder that holds none.
        raise UserError(f"--out {out_dir}: holds files but no sdtl run ({', '.join(content[:3])}"
                        f"{', ...' if len(content) > 3 else ''}); --resume continues a run in its own "
                        f"folder: choose a new --out directory")
    if resume == "auto":
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"--resume {resume}: no such checkpoint file; pass --resume auto or a path "
                        f"to a last.pt / best.pt written by sdtl")
    return path


def start_run(cfg, out_dir: Path, resume: str | None, info, kind: str) -> tuple[Path | None, dict | None]:
    """Checks shared by every run before any work: determinism, AMP, and which checkpoint to resume."""
    from sdtl.models.checkpoints import safe_load

    configure_determinism(cfg.run.deterministic, cfg.run.threads, cfg.run.cudnn_benchmark)
    amp_dtype(cfg.optim.amp, info.device)  # fail early: bf16 on a card without it
    resume_path = resolve_resume(out_dir, resume, info.is_main)
    state = safe_load(resume_path) if resume_path else None
    if state is not None and state.get("sdtl_format") != kind:
        raise UserError(f"--resume {resume_path}: not an sdtl {kind} checkpoint (format "
                        f"{state.get('sdtl_format')!r}); pass checkpoints/last.pt of a {kind} run")
    return resume_path, state


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``["optim.epochs: 30 -> 100", ...]`` for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_changes(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def check_same_config(run_dir: Path, cfg, purpose: str) -> None:
    """Refuse to reuse a run folder whose stored config is not what ``purpose`` would run.

    ``sdtl demo`` / ``sweep`` / ``compare`` reuse finished runs and resume unfinished ones; a folder
    made with other settings must never be mixed into their tables or continued with a new config.
    """
    import yaml

    from sdtl.engine import config as cfgmod

    stored_path = run_dir / "config.yaml"
    if not stored_path.exists():
        return
    stored = yaml.safe_load(stored_path.read_text()) or {}
    kind = stored.pop("kind", "finetune")
    try:  # through the loader, so keys added to sdtl since the run was made compare at their defaults
        stored = cfgmod.to_dict(cfgmod.config_from_dict(stored, kind=kind))
    except UserError:
        pass  # a config this sdtl cannot read differs anyway: compared raw below
    changes = config_changes(stored, cfgmod.to_dict(cfg))
    if changes:
        raise UserError(f"{run_dir}: this run was made with other settings ({'; '.join(changes[:4])}"
                        f"{' …' if len(changes) > 4 else ''}); its results cannot be reused for {purpose}. "
                        f"Nothing was changed: use a new --out")


def record_config_changes(cfg, state: dict, out_dir: Path, resume_path, info, logger) -> list[str]:
    """A resumed run's config is its identity: say how this resume changes it, and keep the record.

    Each change is warned and appended to ``OUT/config_changes.jsonl`` (one line per resume that
    changed something), so config.yaml never changes silently.
    """
    import json

    from sdtl.engine import config as cfgmod

    changed = config_changes(state.get("config") or {}, cfgmod.to_dict(cfg))
    if changed and info.is_main:
        logger.warning("resuming %s with a config that differs from the checkpoint's: %s", resume_path,
                       "; ".join(changed))
        with open(out_dir / "config_changes.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"resumed_from": str(Path(resume_path).resolve()), "epoch": state.get("epoch"),
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changed}) + "\n")
    return changed


def run_in_process_group(cfg, body, out_dir, resume):
    """Validate, join the torchrun process group (if any), run ``body(cfg, out_dir, resume, info)``."""
    from sdtl.engine import config as cfgmod
    from sdtl.engine import distributed as dist_utils

    cfgmod.validate_ranges(cfg)
    info = dist_utils.setup(cfg.run.device)
    try:
        if not info.is_main:  # rank 0 holds the run directory for the whole process group
            return body(cfg, Path(out_dir), resume, info)
        if not (Path(out_dir) / LOCK_NAME).exists():
            # Refuse a foreign folder before writing a lock file into it. A folder that has one is
            # judged under the lock (in start_run): "in use by PID ..." is the answer that matters then.
            resolve_resume(Path(out_dir), resume)
        created = not Path(out_dir).exists()
        try:
            with RunLock(out_dir, kind_of(cfg)), console_log_to(Path(out_dir) / "train.log"):
                return body(cfg, Path(out_dir), resume, info)
        except UserError:
            if created:
                _remove_if_only_bookkeeping(Path(out_dir))  # bad input writes nothing
            raise
    finally:
        dist_utils.teardown()


def _remove_if_only_bookkeeping(out_dir: Path) -> None:
    """Remove a run folder this process created if it holds nothing but the lock and bookkeeping."""
    names = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    if names <= BOOKKEEPING:
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
        out_dir.rmdir()


@contextlib.contextmanager
def console_log_to(path: Path):
    """Copy everything sdtl logs (the console's epoch lines, warnings, the final test) into ``path``,
    appended, so a resumed run's log continues the first one's."""
    import logging

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("sdtl")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def kind_of(cfg) -> str:
    return "pretrain" if hasattr(cfg, "task") else "finetune"


def make_train_loader(dataset, data_cfg, info, seed: int):
    """Shuffled, sharded (DDP) training loader; every rank gets a distinct part of each epoch.

    Workers persist across epochs (no re-fork and re-import every epoch) and prefetch
    ``data.prefetch_factor`` batches each; the sampler hands them ``(epoch, index)`` pairs, so each
    epoch still draws its own clips and crops. Batches land in pinned memory on CUDA, for
    ``non_blocking`` copies.
    """
    from sdtl.data.datasets import EpochSampler, collate_clips

    sampler = EpochSampler(torch.utils.data.DistributedSampler(dataset, num_replicas=info.world_size,
                                                               rank=info.rank, shuffle=True, seed=seed))
    workers = data_cfg.workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=data_cfg.batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=collate_clips,
                                         drop_last=True, pin_memory=info.device.type == "cuda",
                                         persistent_workers=workers > 0,
                                         prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None)
    if len(loader) == 0:
        raise UserError(f"config key data.batch_size: {data_cfg.batch_size} x {info.world_size} process(es) is "
                        f"larger than the {len(dataset)} training videos; lower data.batch_size")
    return sampler, loader


# -------------------------------------------------------------------------- seeding, determinism
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool, threads: int, cudnn_benchmark: bool = False) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    # cuDNN autotuning picks the fastest conv algorithm per input shape (fixed shapes here); it is
    # nondeterministic, so deterministic runs never use it.
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark) and not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def capture_rng() -> dict:
    """Every RNG the loop draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py_internal, py_version, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- optimiser, schedule
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
        raise UserError(f"config key optim.layer_decay: cannot tell which stage encoder parameter {param_name!r} "
                        f"belongs to; layer-wise decay supports sdtl's C3D / R(2+1)D and torchvision's VideoResNet "
                        f"encoders; set optim.layer_decay=1")
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


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``optim.amp`` on ``device`` (None = full fp32).

    ``auto``: bf16 on a CUDA card that supports it, fp16 (with a GradScaler) on one that does not,
    fp32 on CPU. An explicit ``bf16`` or ``fp16`` also runs on CPU (CPU autocast; slow, but it lets a
    mixed-precision config be checked without a GPU).
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if amp == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
        if amp == "bf16" and not bf16_ok:
            raise UserError(f"config key optim.amp: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                            f"set --set optim.amp=fp16 (with loss scaling) or optim.amp=auto")
    return torch.bfloat16 if amp == "bf16" else torch.float16


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


def prepare_model(model: nn.Module, cfg, device: torch.device) -> bool:
    """Move ``model`` to ``device`` in the configured memory format; returns whether it is channels-last.

    Done before any regularizer copies the encoder, so a teacher has the student's format (and runs
    under the same autocast as the student: same precision).
    """
    channels_last = use_channels_last(cfg.run, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return channels_last


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
        raise UserError(f"config key optim.fused: this torch ({torch.__version__}) cannot run a fused "
                        f"{cfg.optim.name} step on {device} ({str(exc).splitlines()[0]}); set --set optim.fused=off") from None


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


def use_channels_last(run_cfg, device: torch.device) -> bool:
    """``run.channels_last``: auto = on for CUDA (cuDNN's fast 3-D conv layout), off on CPU."""
    return run_cfg.channels_last == "on" or (run_cfg.channels_last == "auto" and device.type == "cuda")


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last and x.dim() == 5 else x


def runtime_settings(cfg, device: torch.device, optimizer=None) -> dict:
    """What the ``auto`` options resolved to on this device (written to config.yaml as ``runtime``)."""
    dtype = amp_dtype(cfg.optim.amp, device)
    deterministic = cfg.run.deterministic
    return {"device": str(device), "torch": str(torch.__version__),
            "amp": {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
            "grad_scaler": dtype == torch.float16,
            "channels_last": use_channels_last(cfg.run, device),
            "cudnn_benchmark": device.type == "cuda" and cfg.run.cudnn_benchmark and not deterministic,
            "fused_optimizer": bool(optimizer.defaults.get("fused")) if optimizer is not None else use_fused(cfg.optim, device),
            "compile": cfg.run.compile and cfg.run.compile_backend}


def use_fused(optim_cfg, device: torch.device) -> bool:
    """``optim.fused``: auto = the fused (single-kernel) optimizer step on CUDA."""
    return optim_cfg.fused == "on" or (optim_cfg.fused == "auto" and device.type == "cuda")


def maybe_compile(module: nn.Module, run_cfg, logger) -> nn.Module:
    """``run.compile``: wrap ``module`` in ``torch.compile``; a failure names the option instead of a trace."""
    if not run_cfg.compile:
        return module
    try:
        compiled = torch.compile(module, backend=run_cfg.compile_backend)
    except Exception as exc:  # an unknown backend fails here
        raise UserError(f"config key run.compile: torch.compile(backend={run_cfg.compile_backend!r}) failed "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        f"set --set run.compile=false") from None
    logger.info("run.compile: the model is compiled with backend %r on its first batches "
                "(the first step of each new input shape takes longer)", run_cfg.compile_backend)
    return _FirstCallGuard(compiled, run_cfg.compile_backend)


class _FirstCallGuard(nn.Module):
    """Turns an exception from compilation (which happens on the first call) into a UserError."""

    def __init__(self, compiled: nn.Module, backend: str) -> None:
        super().__init__()
        self.compiled = compiled
        self.backend = backend
        self.checked = False

    def forward(self, *args, **kwargs):
        if self.checked:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:
            raise UserError(f"config key run.compile: compiling the model failed with backend {self.backend!r} "
                            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}); set "
                            f"--set run.compile=false") from None
        self.checked = True
        return out


def check_finite(parts: dict[str, torch.Tensor], epoch: int, step: int, last_good: str) -> None:
    """Stop on a NaN/Inf loss, naming the step and the loss part (the last checkpoint is kept)."""
    for name, value in parts.items():
        if not torch.isfinite(value).all():
            raise RunFailed(f"loss part '{name}' became {float(value.detach())} at epoch {epoch}, step {step}; "
                            f"training stopped. The last good checkpoint is {last_good}. Lower optim.lr, "
                            f"enable optim.grad_clip, or lower regularizer.weight, then resume from it")


# ------------------------------------------------------------------------------------ progress
class EpochMeter:
    """Running sums for one epoch: loss parts, clips/s, and the share of time spent waiting for data."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.clips = 0
        self.data_time = 0.0
        self.start = time.perf_counter()
        self._mark = self.start

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data_time += now - self._mark
        self._mark = now

    def step_done(self, parts: dict[str, float], clips: int) -> None:
        self.steps += 1
        self.clips += clips
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self._mark = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.sums.items()}

    def summary(self) -> dict[str, float]:
        el = max(self.elapsed, 1e-9)
        return {"clips_per_s": self.clips / el, "data_wait": self.data_time / el, "epoch_time_s": el}

    def postfix(self, lr: float) -> dict[str, str]:
        m = self.means()
        s = self.summary()
        out = {k: f"{v:.4g}" for k, v in m.items()}
        out.update(lr=f"{lr:.3g}", clips_s=f"{s['clips_per_s']:.1f}", wait=f"{100 * s['data_wait']:.0f}%")
        return out


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)
