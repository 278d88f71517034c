"""Seeding and determinism, RNG capture for exact resume, precision and memory format, compile,
the NaN check, the train loader and the per-epoch meter and progress display.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import torch
from torch import nn

from sdtl.engine.optim import use_fused
from sdtl.errors import ConfigError, RunFailed

#: the signals that ask a run to stop after its current step (:class:`sdtl.engine.loop.StopRequest`);
#: SIGUSR2 is submitit's default preemption signal (sdtl's Slurm jobs are told to use SIGUSR1)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
                     if hasattr(signal, name))


def _threads() -> int:
    """Threads of this process (the kernel's count, native threads included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: stop signals are the main process's to answer.

    Slurm (scancel, preemption, time limits) and a terminal's Ctrl-C signal every process of the job,
    workers included. torch's workers die on a SIGTERM that their parent did not send, and the main
    process then fails with "DataLoader worker ... is killed by signal" instead of finishing its step
    and writing its state. Here a worker ignores SIGINT, SIGUSR1 and SIGUSR2, and a SIGTERM from
    anyone but its parent; a SIGTERM from its parent (torch's and multiprocessing's shutdown) still
    ends it at once, as torch's own handler does. Seeds are not touched.

    SIGTERM is told apart by its sender: it is blocked in the worker and a thread takes it with
    ``sigwaitinfo``. That needs the block in every thread, so it is done only in a worker that has
    one thread so far: a forked one (the default start method on Linux). A worker started by spawn or
    forkserver already runs a second thread, and there torch's handler stays (a group SIGTERM then
    fails the run as before, but nothing can hang); so it does where ``sigwaitinfo`` is missing.
    """
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")) or _threads() != 1:
        return
    parent = os.getppid()

    def answer_sigterm() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == parent or os.getppid() != parent:  # the parent's shutdown, or no parent left
                os._exit(0)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from now on inherit it
    threading.Thread(target=answer_sigterm, name="sdtl-sigterm", daemon=True).start()


def make_train_loader(dataset, data_cfg, info, seed: int):
    """Shuffled, sharded (DDP) training loader; every rank gets a distinct part of each epoch.

    Workers persist across epochs (no re-fork and re-import every epoch) and prefetch
    ``data.prefetch_factor`` batches each; the sampler hands them ``(epoch, index)`` pairs, so each
    epoch still draws its own clips and crops, and it can start an epoch part-way (resume). Batches
    land in pinned memory on CUDA, for ``non_blocking`` copies. The loader draws its workers' seeds
    from its own generator, never from the global RNG that dropout uses: how many iterators a process
    made (a resumed one makes new ones; persistent workers make one) cannot shift the training's
    random stream.
    """
    from sdtl.data.datasets import EpochSampler, collate_clips

    sampler = EpochSampler(torch.utils.data.DistributedSampler(dataset, num_replicas=info.world_size,
                                                               rank=info.rank, shuffle=True, seed=seed))
    workers = data_cfg.workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=data_cfg.batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=collate_clips,
                                         drop_last=True, pin_memory=info.device.type == "cuda",
                                         persistent_workers=workers > 0,
                                         prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
                                         worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise ConfigError("data.batch_size", f"{data_cfg.batch_size} x {info.world_size} process(es) is larger "
                          f"than the {len(dataset)} training videos", "lower data.batch_size")
    return sampler, loader


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
            raise ConfigError("optim.amp", f"bf16 is not supported by {torch.cuda.get_device_name(device)}",
                              "set optim.amp=fp16 (with loss scaling) or optim.amp=auto")
    return torch.bfloat16 if amp == "bf16" else torch.float16


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


def maybe_compile(module: nn.Module, run_cfg, logger) -> nn.Module:
    """``run.compile``: wrap ``module`` in ``torch.compile``; a compilation failure names the option
    (:class:`~sdtl.errors.ConfigError` with the compiler's exception as its cause)."""
    if not run_cfg.compile:
        return module
    try:
        compiled = torch.compile(module, backend=run_cfg.compile_backend)
    except Exception as exc:  # an unknown backend fails here
        raise ConfigError("run.compile_backend", f"torch.compile(backend={run_cfg.compile_backend!r}) failed "
                          f"({_first_line(exc)})", "set run.compile=false or another run.compile_backend") from exc
    logger.info("run.compile: the model is compiled with backend %r on its first batches "
                "(the first step of each new input shape takes longer)", run_cfg.compile_backend)
    return _FirstCallGuard(compiled, run_cfg.compile_backend)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).splitlines() or [""])[0][:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _compile_error_types() -> tuple[type, ...]:
    """The exceptions of torch's compiler stack (dynamo tracing, the backend, inductor's code
    generation and C++/Triton compilers), as this torch names them."""
    import importlib

    names = {"torch._dynamo.exc": ("TorchDynamoException", "TritonUnavailableError"),
             "torch._inductor.exc": ("InductorError", "CppCompileError", "CppWrapperCodegenError",
                                     "InvalidCxxCompiler", "OperatorIssue", "SubgraphLoweringException")}
    found = []
    for module, attrs in names.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, a) for a in attrs if isinstance(getattr(mod, a, None), type)]
    return tuple(found)


def _not_compile_error_types() -> tuple[type, ...]:
    """Dynamo exceptions that report the model's own failure while it was traced, not the
    compiler's: an op that fails on fake tensors (a shape mismatch: ``TorchRuntimeError``) or an
    exception the model raised (``ObservedException``)."""
    import torch._dynamo.exc as dynamo_exc

    return tuple(t for t in (getattr(dynamo_exc, "TorchRuntimeError", None),
                             getattr(dynamo_exc, "ObservedException", None)) if isinstance(t, type))


def is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by the first call of a compiled module, is the compiler failing, not
    the model: a CUDA out-of-memory, a shape error or a data error is what it is, compiled or not."""
    if not isinstance(exc, _compile_error_types()) or isinstance(exc, _not_compile_error_types()):
        return False
    seen, cause = set(), exc  # an out-of-memory inside the backend (autotuning) is still out of memory
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, torch.OutOfMemoryError):
            return False
        seen.add(id(cause))
        cause = cause.__cause__ or getattr(cause, "inner_exception", None) or cause.__context__
    return True


class _FirstCallGuard(nn.Module):
    """Turns a compilation failure (compilation happens on the first call) into a
    :class:`~sdtl.errors.ConfigError` for ``run.compile``; any other exception of that call (out of
    memory, a shape error, bad data) propagates unchanged."""

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
            if not is_compile_failure(exc):
                raise
            inner = getattr(exc, "inner_exception", None)  # BackendCompilerFailed: what the backend raised
            detail = f"{type(exc).__name__}: {_first_line(inner)}" if inner is not None else _first_line(exc)
            raise ConfigError("run.compile", f"compiling the model failed with backend {self.backend!r} "
                              f"({detail})", "set run.compile=false") from exc
        self.checked = True
        return out


def check_finite(parts: dict[str, torch.Tensor], epoch: int, step: int, last_good: str) -> None:
    """Stop on a NaN/Inf loss, naming the step and the loss part (the last checkpoint is kept)."""
    for name, value in parts.items():
        if not torch.isfinite(value).all():
            raise RunFailed(f"loss part '{name}' became {float(value.detach())} at epoch {epoch}, step {step}; "
                            f"training stopped. The last good checkpoint is {last_good}. Lower optim.lr, "
                            f"enable optim.grad_clip, or lower regularizer.weight, then resume from it")


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


def progress(total: int, desc: str, enabled: bool, initial: int = 0):
    """A progress bar on a terminal; none when stderr is redirected (a log gets the epoch lines instead)."""
    import sys

    from tqdm import tqdm

    enabled = enabled and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True, initial=initial)
