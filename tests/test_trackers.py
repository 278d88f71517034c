"""run.trackers: MLflow and W&B receive the config, every epoch's metrics and the run's artifacts; a resume
continues the same tracker run without sending an epoch twice; a failing tracker warns once and never
stops training; unknown or missing trackers are refused before any work; neither library is imported
unless a run names it.

Real mlflow and wandb (no mocks of them): the MLflow store is the run folder's SQLite file, read back
with MLflow's client; W&B runs offline into the run folder.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtl.engine.trackers import STATE_FILE, numeric_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY")


def tiny(data, *sets, kind: str = "finetune"):
    from sdtl.engine.config import load_config

    if kind == "pretrain":
        return load_config("synthetic_tiny_pretrain", [f"data.root={data}", "run.threads=1", "data.workers=0",
                                                       "run.progress=false", *sets], kind="pretrain")
    return load_config("synthetic_tiny", [f"data.root={data}", "run.threads=1", "data.workers=0",
                                          "eval.num_clips=1", *sets])


def metrics_by_epoch(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tracker_warnings(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "sdtl.trackers" and r.levelno == logging.WARNING and f"tracker {name} " in r.getMessage()]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No tracker configuration from the machine running the tests; wandb's own folders in tmp."""
    for key in TRACKER_ENV:
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))


class _Kill(BaseException):
    """Stands for kill -9 (nothing catches it): here, right after epoch 2's checkpoint was written and
    before MLflow received that epoch."""


@pytest.fixture(scope="module")
def mlflow_run(tiny_synth, tmp_path_factory):
    """One fine-tune with run.trackers=[tensorboard,mlflow], killed at epoch 2's tracker call-out (its
    checkpoint written) and resumed to epoch 3; what MLflow held in between."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from sdtl.engine.finetune import run_finetune
    from sdtl.engine.trackers import MLflowTracker

    out = tmp_path_factory.mktemp("mlflow") / "run"
    cfg = tiny(tiny_synth, "optim.epochs=3", "run.trackers=[tensorboard,mlflow]")
    real_log = MLflowTracker.log_epoch

    def killed_at_epoch_2(self, epoch, metrics):
        if epoch == 2:
            raise _Kill
        return real_log(self, epoch, metrics)

    with pytest.MonkeyPatch.context() as mp:
        for key in TRACKER_ENV:
            mp.delenv(key, raising=False)
        mp.setattr(MLflowTracker, "log_epoch", killed_at_epoch_2)
        with pytest.raises(_Kill):
            run_finetune(cfg, out)
        first = json.loads((out / STATE_FILE).read_text())["mlflow"]
        client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        before = {"state": first, "status": client.get_run(first["run_id"]).info.status,
                  "steps": [m.step for m in client.get_metric_history(first["run_id"], "train_loss")]}
        mp.setattr(MLflowTracker, "log_epoch", real_log)
        results = run_finetune(cfg, out, resume="auto")
    return {"out": out, "before": before, "results": results, "client": client,
            "state": json.loads((out / STATE_FILE).read_text())["mlflow"]}


@pytest.mark.slow
def test_mlflow_holds_every_epoch_the_config_and_the_artifacts(mlflow_run):
    out, client, state = mlflow_run["out"], mlflow_run["client"], mlflow_run["state"]
    assert mlflow_run["results"] is not None and (out / "results.json").exists()
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())  # TensorBoard still written beside it
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert state["logged_epoch"] == 3
    records = metrics_by_epoch(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    keys = {k for r in records for k in numeric_metrics(r)}
    assert {"train_loss", "val_video_acc1", "feat_drift", "lr"} <= keys
    for key in keys:  # every number of every epoch, the epoch as step, exactly once
        history = sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], key))
        expected = [(r["epoch"], pytest.approx(float(r[key]))) for r in records if key in numeric_metrics(r)]
        assert history == expected, key
    assert len(client.get_metric_history(state["run_id"], "train_loss")) == 3  # = optim.epochs
    params = run.data.params
    assert params["optim.lr"] == "0.05" and params["optim.epochs"] == "3"
    assert params["run.trackers"] == str(["tensorboard", "mlflow"]) and params["regularizer.name"] == "sd"
    assert params["data.root"].endswith("tiny")
    artifacts = {f.path for f in client.list_artifacts(state["run_id"])}
    assert {"results.json", "curves.png", "confusion.png"} <= artifacts
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "results.json"
    assert json.loads(stored.read_text()) == json.loads((out / "results.json").read_text())
    assert str(out.resolve()) in run.info.artifact_uri  # the default store lives in the run folder


@pytest.mark.slow
def test_mlflow_resume_continues_the_same_run_without_duplicated_epochs(mlflow_run):
    before, state, client = mlflow_run["before"], mlflow_run["state"], mlflow_run["client"]
    # killed after epoch 2's checkpoint, before MLflow got epoch 2: it had epoch 1 only
    assert before["steps"] == [1] and before["state"]["logged_epoch"] == 1
    assert before["status"] == "FAILED"  # the crash ended the run's status (a kill -9 would leave RUNNING)
    assert state["run_id"] == before["state"]["run_id"]  # the resume continued the same MLflow run
    experiment = client.get_experiment_by_name("sdtl")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [state["run_id"]]
    steps = [m.step for m in client.get_metric_history(state["run_id"], "train_loss")]
    assert sorted(steps) == [1, 2, 3]  # epoch 2 sent by the resume, none twice
    assert sorted(m.step for m in client.get_metric_history(state["run_id"], "feat_drift")) == [0, 1, 2, 3]


def _wandb_run_dirs(out: Path, run_id: str) -> list[Path]:
    return sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))


def _wandb_records(run_dir: Path, run_id: str, *texts: bytes) -> bytes:
    """The offline run's transaction log once it holds ``texts`` (wandb's service process may still be
    writing it for a moment after ``finish`` returned)."""
    path = run_dir / f"run-{run_id}.wandb"
    deadline = time.monotonic() + 20
    while True:
        data = path.read_bytes() if path.exists() else b""
        if all(t in data for t in texts) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


@pytest.mark.slow
def test_wandb_offline_writes_its_run_under_out_and_resume_keeps_its_id(tiny_synth, tmp_path, clean_env):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'sdtl[wandb]')")
    from sdtl.engine.finetune import run_finetune

    out = tmp_path / "run"
    run_finetune(tiny(tiny_synth, "optim.epochs=1", "run.trackers=[wandb]"), out)
    state = json.loads((out / STATE_FILE).read_text())["wandb"]
    assert state["target"] == {"project": "sdtl", "mode": "offline"} and state["logged_epoch"] == 1
    (first,) = _wandb_run_dirs(out, state["run_id"])
    expected = (b"train_loss", b"val_video_acc1", b"feat_drift", b"optim.lr", b"regularizer.weight")
    data = _wandb_records(first, state["run_id"], *expected)
    for text in expected:
        assert text in data, text
    for name in ("results.json", "curves.png", "confusion.png"):
        assert (first / "files" / name).read_bytes() == (out / name).read_bytes(), name
    assert not (out / "tb").exists()  # tensorboard left out of run.trackers: no events

    run_finetune(tiny(tiny_synth, "optim.epochs=2", "run.trackers=[wandb]"), out, resume="auto")
    again = json.loads((out / STATE_FILE).read_text())["wandb"]
    assert again["run_id"] == state["run_id"] and again["logged_epoch"] == 2
    dirs = _wandb_run_dirs(out, state["run_id"])
    assert len(dirs) == 2 and dirs[0] == first  # the same W&B run, resumed (a second offline segment)
    assert b"train_loss" in _wandb_records(dirs[1], state["run_id"], b"train_loss")


@pytest.mark.slow
def test_pretraining_sends_its_epochs_and_curves_to_wandb(tiny_synth, tmp_path, clean_env):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'sdtl[wandb]')")
    from sdtl.engine.pretrain import run_pretrain

    out = tmp_path / "pre"
    run_pretrain(tiny(tiny_synth, "optim.epochs=1", "data.batch_size=4", "run.trackers=[tensorboard,wandb]",
                      kind="pretrain"), out)
    state = json.loads((out / STATE_FILE).read_text())["wandb"]
    assert state["logged_epoch"] == 1
    (run_dir,) = _wandb_run_dirs(out, state["run_id"])
    assert b"train_acc" in _wandb_records(run_dir, state["run_id"], b"train_acc")
    assert (run_dir / "files" / "curves.png").read_bytes() == (out / "curves.png").read_bytes()
    assert (out / "tb").is_dir()


@pytest.mark.slow
def test_a_failing_tracker_warns_once_and_the_run_finishes(tiny_synth, tmp_path, clean_env, caplog):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'sdtl[wandb]')")
    from sdtl.engine.finetune import run_finetune
    from sdtl.engine.trackers import WandbTracker

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    calls = []

    def broken_log(self, epoch, metrics):
        calls.append(epoch)
        raise RuntimeError("the W&B service went away")

    caplog.set_level(logging.INFO, logger="sdtl")
    out = tmp_path / "run"
    cfg = tiny(tiny_synth, "optim.epochs=2", "run.trackers=[mlflow,wandb]",
               f"run.mlflow_uri=sqlite:///{blocker}/mlflow.db")  # a store MLflow cannot create
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WandbTracker, "log_epoch", broken_log)
        results = run_finetune(cfg, out)
    assert results is not None and (out / "results.json").exists()
    assert len(metrics_by_epoch(out)) == 3  # epochs 0..2 all trained and logged locally
    (mlflow_warning,) = tracker_warnings(caplog, "mlflow")
    assert "could not start its run" in mlflow_warning and "training goes on" in mlflow_warning
    (wandb_warning,) = tracker_warnings(caplog, "wandb")
    assert "could not log epoch 0" in wandb_warning and "the W&B service went away" in wandb_warning
    assert calls == [0]  # off after its failure: not retried every epoch
    state = json.loads((out / STATE_FILE).read_text())
    assert "mlflow" not in state and state["wandb"]["logged_epoch"] == -1  # a resume would send them all


@pytest.mark.slow
def test_unknown_tracker_exits_2_before_any_work(tiny_synth, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sdtl", "-q", "finetune", "--config", "synthetic_tiny",
                           "--out", str(out), "--set", f"data.root={tiny_synth}",
                           "--set", "run.trackers=[tensorboard,neptune]"],
                          check=False, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "run.trackers" in proc.stderr and "'neptune' is not one of tensorboard, mlflow, wandb" in proc.stderr
    assert not out.exists()


def test_trackers_config_is_checked(tiny_synth):
    from sdtl.engine.config import validate_ranges
    from sdtl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"run.trackers: 'mlflow' is named twice"):
        validate_ranges(tiny(tiny_synth, "run.trackers=[mlflow,tensorboard,mlflow]"))
    with pytest.raises(ConfigError, match=r"run.wandb_mode: 'cloud' is not one of auto, offline, online"):
        tiny(tiny_synth, "run.wandb_mode=cloud")
    with pytest.raises(ConfigError, match=r"run.mlflow_experiment: must not be empty"):
        validate_ranges(tiny(tiny_synth, "run.mlflow_experiment="))
    validate_ranges(tiny(tiny_synth, "run.trackers=[]"))  # no tracker at all: metrics.jsonl only


def test_a_named_tracker_that_is_not_installed_is_refused_before_any_work(tiny_synth, tmp_path, monkeypatch):
    from sdtl.engine.finetune import run_finetune
    from sdtl.engine.pretrain import run_pretrain
    from sdtl.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"run.trackers: wandb is named but .* pip install 'sdtl\[wandb\]'"):
        run_finetune(tiny(tiny_synth, "run.trackers=[tensorboard,wandb]"), out)
    with pytest.raises(ConfigError, match=r"pip install 'sdtl\[wandb\]'"):
        run_pretrain(tiny(tiny_synth, "run.trackers=[wandb]", kind="pretrain"), out)
    assert not out.exists()


def test_tensorboard_follows_run_trackers_and_the_old_switch(tiny_synth):
    from sdtl.engine.trackers import tensorboard_enabled

    assert tensorboard_enabled(tiny(tiny_synth))  # the default: ["tensorboard"]
    assert not tensorboard_enabled(tiny(tiny_synth, "run.trackers=[mlflow]"))
    assert not tensorboard_enabled(tiny(tiny_synth, "run.tensorboard=false"))  # old recipes keep working


def test_tracker_runs_end_with_the_status_of_the_run(monkeypatch):
    from sdtl.engine.trackers import WandbTracker, _end_status
    from sdtl.errors import RunFailed, RunInterrupted

    assert _end_status(None) == ("FINISHED", 0)
    assert _end_status(RunInterrupted("stopped by SIGTERM")) == ("KILLED", 75)  # resumable: not a failure
    assert _end_status(RunFailed("NaN loss")) == ("FAILED", 1)
    assert _end_status(ValueError("bug")) == ("FAILED", 1)
    assert _end_status(type("TrialPruned", (Exception,), {})("pruned after epoch 2")) == ("KILLED", 0)
    for key in TRACKER_ENV:
        monkeypatch.delenv(key, raising=False)
    assert WandbTracker.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbTracker.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbTracker.resolve_mode("auto") == "offline" and WandbTracker.resolve_mode("online") == "online"


def test_the_cli_does_not_import_the_trackers():
    code = ("import sys, sdtl.cli; sdtl.cli.build_parser(); "
            "import sdtl.engine.finetune, sdtl.engine.pretrain, sdtl.engine.trackers; "
            "loaded = sorted(m for m in ('mlflow', 'wandb') if m in sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=120)
