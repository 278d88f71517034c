"""The error hierarchy: the library raises typed errors that name config keys (never CLI flags); only
the CLI renders them as one line with a ``--set`` hint, and ``--debug`` / ``SDTL_DEBUG=1`` print the
traceback with its cause. A failure in a compiled model's first call is reported as what it is."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sdtl.cli import main, render_error
from sdtl.engine import config as cfgmod
from sdtl.engine.runtime import _FirstCallGuard, is_compile_failure, maybe_compile
from sdtl.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    RunFailed,
    RunInterrupted,
    SdtlError,
    UserError,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("SDTL_DEBUG", None)

# regularizer.k belongs to bss; on the tiny recipe (sd) it is refused with a problem and a hint
K_LINE = ("sdtl: error: config key regularizer.k: used only by regularizer.name=bss, not 'sd'; remove it, "
          "or set regularizer.name to one of those (set it with --set regularizer.k=VALUE)")


def _finetune(tmp_path, *sets: str) -> list[str]:
    args = ["finetune", "--config", "synthetic_tiny", "--out", str(tmp_path / "run")]
    for item in sets:
        args += ["--set", item]
    return args


# ------------------------------------------------------------------------------------ the library
def test_library_callers_get_a_config_error_with_its_key():
    cfg = cfgmod.load_config("synthetic_tiny", ["optim.lr=-1"])
    with pytest.raises(ConfigError) as err:
        cfgmod.validate_ranges(cfg)
    assert err.value.key == "optim.lr" and err.value.problem == "must be > 0 (got -1.0)"
    assert str(err.value) == "config key optim.lr: must be > 0 (got -1.0)"
    assert isinstance(err.value, UserError) and err.value.exit_code == 2


@pytest.mark.parametrize("overrides, key, text", [
    (["optim.lrr=0.1"], "optim.lrr", "config key optim.lrr: unknown key; valid keys here are: "),
    (["optim.lr=fast"], "optim.lr", "config key optim.lr: expected float, got str 'fast'"),
    (["eval.crops=2"], "eval.crops", "config key eval.crops: must be 1 or 3 (got 2)"),
    (["optim.amp=bf17"], "optim.amp", "config key optim.amp: 'bf17' is not one of auto, off, bf16, fp16"),
    (["regularizer.k=2"], "regularizer.k", "config key regularizer.k: used only by regularizer.name=bss"),
    (["optim=1", "optim.lr=2"], "optim", "config key optim: set both as a value and as a section"),
])
def test_config_errors_name_the_key_and_no_flag(overrides, key, text):
    with pytest.raises(ConfigError) as err:
        cfgmod.validate_ranges(cfgmod.load_config("synthetic_tiny", overrides))
    assert err.value.key == key and str(err.value).startswith(text)
    assert "--" not in str(err.value)  # the library never speaks of command-line flags


def test_a_regularizer_option_error_keeps_its_cause():
    cfg = cfgmod.load_config("synthetic_tiny", ["regularizer.name=bss", "regularizer.k=0"])
    with pytest.raises(ConfigError) as err:
        cfgmod.validate_ranges(cfg)
    assert err.value.key == "regularizer.k" and str(err.value) == "config key regularizer.k: must be >= 1 (got 0)"
    assert isinstance(err.value.__cause__, ValueError)


def test_data_and_checkpoint_errors_carry_the_path(tmp_path):
    from sdtl.data.datasets import list_records
    from sdtl.engine.build import build_datasets
    from sdtl.models.checkpoints import safe_load

    with pytest.raises(DataError) as err:
        list_records("folder", tmp_path / "nowhere")
    assert err.value.path == tmp_path / "nowhere" and "data.root" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(CheckpointError) as err:
        safe_load(tmp_path / "missing.pt")
    assert err.value.path == tmp_path / "missing.pt"
    # a run's data.root that is not there is the config key's problem
    with pytest.raises(ConfigError) as err:
        build_datasets(cfgmod.load_config("synthetic_tiny", [f"data.root={tmp_path / 'nowhere'}"]))
    assert err.value.key == "data.root" and "does not exist" in err.value.problem and "--set" not in str(err.value)


def test_is_config_key():
    assert cfgmod.is_config_key("optim.lr") and cfgmod.is_config_key("regularizer.k")
    assert cfgmod.is_config_key("task.strides") and cfgmod.is_config_key("optim.milestones[1]")
    assert not cfgmod.is_config_key("optim.lrr") and not cfgmod.is_config_key("optim")
    assert not cfgmod.is_config_key("regularizer") and not cfgmod.is_config_key("regularizer.k.x")


# ---------------------------------------------------------------------------------- the CLI line
def test_render_error():
    assert (render_error(ConfigError("optim.lr", "must be > 0 (got -1)", "lower the learning rate"), "R")
            == "sdtl: error: config key optim.lr: must be > 0 (got -1); lower the learning rate "
               "(set it with --set optim.lr=VALUE)")
    assert (render_error(ConfigError("optim.milestones[1]", "expected int, got str 'x'"), "R")
            == "sdtl: error: config key optim.milestones[1]: expected int, got str 'x' "
               "(set it with --set optim.milestones=VALUE)")
    # no such key: the hint says how keys are set, not to set the misspelt one
    line = render_error(ConfigError("optim.lrr", "unknown key", "valid keys here are: lr"), "R")
    assert line.endswith("valid keys here are: lr (config keys are set with --set SECTION.KEY=VALUE)")
    assert render_error(DataError("d: bad", path="d"), "R") == "sdtl: error: d: bad"
    assert render_error(CheckpointError("c.pt: bad", path="c.pt"), "R") == "sdtl: error: c.pt: bad"
    assert render_error(RunFailed("loss became nan"), "R") == "sdtl: run failed: loss became nan"
    assert render_error(RunInterrupted("stopped at step 3"), "resume with X") == "sdtl: stopped at step 3 (resume with X)"


def test_cli_prints_one_line_with_the_set_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SDTL_DEBUG", raising=False)
    assert main(_finetune(tmp_path, "regularizer.k=2")) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [K_LINE]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback_with_its_cause(tmp_path, capsys, monkeypatch, how):
    monkeypatch.delenv("SDTL_DEBUG", raising=False)
    args = _finetune(tmp_path, "regularizer.name=bss", "regularizer.k=0")
    if how == "flag":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("SDTL_DEBUG", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "ValueError: regularizer.k: must be >= 1 (got 0)" in err  # the cause
    assert "The above exception was the direct cause of the following exception" in err
    assert err.splitlines()[-1] == ("sdtl: error: config key regularizer.k: must be >= 1 (got 0) "
                                    "(set it with --set regularizer.k=VALUE)")


def test_cli_subprocess_debug_and_plain(tmp_path):
    cmd = [sys.executable, "-m", "sdtl"]
    base = ["finetune", "--config", "synthetic_tiny", "--set", "optim.lr=-1", "--out", str(tmp_path / "x")]
    plain = subprocess.run([*cmd, *base], env=ENV, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr.splitlines() == [("sdtl: error: config key optim.lr: must be > 0 (got -1.0) "
                                          "(set it with --set optim.lr=VALUE)")]
    debug = subprocess.run([*cmd, "--debug", *base], env=ENV, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert "sdtl.errors.ConfigError: config key optim.lr" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[0]
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------- the first compiled call
@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Raises(nn.Module):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    def forward(self, x):
        raise self.exc


def _guarded(module: nn.Module, backend="eager") -> _FirstCallGuard:
    guard = maybe_compile(module, SimpleNamespace(compile=True, compile_backend=backend), logging.getLogger("t"))
    assert isinstance(guard, _FirstCallGuard)
    return guard


@pytest.mark.parametrize("exc", [RuntimeError("shape mismatch"), torch.OutOfMemoryError("CUDA out of memory"),
                                 DataError("v.avi: cannot decode video", path="v.avi")],
                         ids=["shape", "oom", "data"])
def test_a_models_own_error_in_the_first_call_is_not_a_compile_error(fresh_dynamo, exc):
    guard = _guarded(_Raises(exc))
    with pytest.raises(type(exc)) as err:
        guard(torch.ones(2))
    assert not isinstance(err.value, ConfigError) and str(err.value) == str(exc)
    assert not guard.checked


def test_a_shape_error_found_while_tracing_is_not_a_compile_error(fresh_dynamo):
    guard = _guarded(nn.Linear(3, 4))
    with pytest.raises(RuntimeError) as err:
        guard(torch.ones(2, 5))  # dynamo reports it as TorchRuntimeError: the model's error, not the compiler's
    assert not isinstance(err.value, SdtlError)


def test_a_backend_failure_names_run_compile_and_keeps_its_cause(fresh_dynamo):
    def broken_backend(gm, example_inputs):
        raise ValueError("backend exploded")

    guard = _guarded(nn.Linear(3, 4), backend=broken_backend)
    with pytest.raises(ConfigError) as err:
        guard(torch.ones(2, 3))
    assert err.value.key == "run.compile" and err.value.hint == "set run.compile=false"
    assert "compiling the model failed" in err.value.problem and "ValueError: backend exploded" in err.value.problem
    assert isinstance(err.value.__cause__, torch._dynamo.exc.BackendCompilerFailed)
    ok = _guarded(nn.Linear(3, 4))
    assert ok(torch.ones(2, 3)).shape == (2, 4) and ok.checked


def test_is_compile_failure():
    import torch._dynamo.exc as dynamo_exc

    failed = dynamo_exc.BackendCompilerFailed("b", ValueError("x"), None)
    assert is_compile_failure(failed)
    assert not is_compile_failure(RuntimeError("shape mismatch"))
    assert not is_compile_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_compile_failure(dynamo_exc.TorchRuntimeError("RuntimeError when making fake tensor call"))
    oom = torch.OutOfMemoryError("CUDA out of memory")
    assert not is_compile_failure(dynamo_exc.BackendCompilerFailed("inductor", oom, None))  # autotuning ran out of memory


def test_a_run_argument_is_named_as_python_spells_it_and_as_the_cli_spells_it(tmp_path, capsys, monkeypatch):
    """A library caller reads ``out_dir`` / ``resume='auto'``; the command line prints ``--out`` /
    ``--resume auto`` for the same error (no flag in the library's own message)."""
    from sdtl.engine.rundir import resolve_resume

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as caught:
        resolve_resume(out, None)
    text = str(caught.value)
    assert text.startswith(f"out_dir {out}: already holds files; pass resume='auto'") and "--" not in text
    assert caught.value.for_cli() == (f"--out {out}: already holds files; pass --resume auto to continue it, "
                                      f"or choose another --out")
    with pytest.raises(UserError) as caught:
        resolve_resume(tmp_path / "new", str(tmp_path / "nope.pt"))
    assert str(caught.value).startswith(f"resume='{tmp_path / 'nope.pt'}': no such checkpoint")
    import pickle

    assert str(UserError("«draft» v2.mp4: unreadable")) == "«draft» v2.mp4: unreadable"  # a file name, not a marker
    again = pickle.loads(pickle.dumps(caught.value))  # a Slurm job's or a worker's error keeps both spellings
    assert str(again) == str(caught.value) and again.for_cli() == caught.value.for_cli()

    monkeypatch.delenv("SDTL_DEBUG", raising=False)
    assert main(["finetune", "--config", "synthetic_tiny", "--out", str(out), "--set", f"data.root={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (f"sdtl: error: --out {out}: already holds files; pass --resume auto "
                                               f"to continue it, or choose another --out")
