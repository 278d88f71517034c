"""``sdtl tune`` (Optuna) on the embedded tiny data, against SQLite (the default) and a real PostgreSQL
server started by the tests (tests/postgres_server.py; skipped with the reason where it cannot start):

* the space is parsed and every corner validated before any work;
* one worker: 8 trials, some pruned (fewer epochs in their metrics.jsonl), the best trial's value is its
  run's validation value, ``best.yaml`` runs as it is;
* two workers on one PostgreSQL study: every trial runs exactly once, both workers take trials;
* a worker killed with SIGKILL mid-trial, then a new worker: the dead trial is retried with the same
  parameters in the same run folder (resumed, not restarted), and nothing is lost or counted twice.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import postgres_server
from process_helpers import started_in_a_temp_folder

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tune_cmd(data, out: Path, *extra: str, trials: int = 8, epochs: int = 4) -> list[str]:
    sets = [f"data.root={data}", f"optim.epochs={epochs}", "data.workers=0", "run.threads=1", "run.progress=false",
            "run.tensorboard=false"]
    return [sys.executable, "-m", "sdtl", "-q", "tune", "--config", "synthetic_tiny",
            "--space", "regularizer.weight=log:0.01:100", "--trials", str(trials), "--out", str(out),
            *[a for s in sets for a in ("--set", s)], *extra]


def finished(summary: dict) -> list[dict]:
    return [t for t in summary["trials"] if t["state"] in ("complete", "pruned")]


def epochs_run(run_dir: str) -> list[int]:
    return [json.loads(x)["epoch"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("epoch", 0) >= 1]


def check_study(out: Path, trials: int, epochs: int) -> dict:
    """What every tune must satisfy: each finished trial has its own run folder, run once; pruned trials
    stopped early; the best trial's value is its run's validation value (the selected epoch's)."""
    from sdtl.studies import core

    summary = json.loads((out / "tune.json").read_text())
    done = finished(summary)
    assert len(done) >= trials, summary["counts"]
    dirs = [t["run_dir"] for t in done]
    assert len(set(dirs)) == len(dirs), dirs  # no run folder serves two finished trials
    for t in done:
        got = epochs_run(t["run_dir"])
        assert got == sorted(set(got)), (t, got)  # one record per epoch: never run twice
        if t["state"] == "pruned":
            assert len(got) < epochs, t
            assert not (Path(t["run_dir"]) / "results.json").exists()
        else:
            assert got == list(range(1, epochs + 1)), t
            assert t["value"] == core.collect(core.RunSpec("t", Path(t["run_dir"]), "synthetic_tiny", []))["val"]
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in done if t["state"] == "complete")
    return summary


# ------------------------------------------------------------------------------------------ space
@pytest.mark.parametrize("item,says", [
    ("regularizer.weight=log:0:10", "LOW > 0"), ("regularizer.weight=float:5:1", "below HIGH"),
    ("regularizer.weight=norm:0:1", "unknown kind"), ("optim.nonsense=float:0:1", "not a config key"),
    ("optim.name=choice:sgd", "two or more"), ("optim.epochs=int:1.5:3", "integers"),
    ("regularizer.weight", "KEY=SPEC")])
def test_bad_space_specs_are_refused(item, says):
    from sdtl.errors import UserError
    from sdtl.studies.tune import parse_space

    with pytest.raises(UserError, match=says):
        parse_space([item])


def test_space_parses_every_kind():
    from sdtl.studies.tune import parse_space

    params = parse_space(["regularizer.weight=log:0.01:100", "optim.lr=float:0.001:0.1", "optim.epochs=int:2:5",
                          "optim.name=choice:sgd,adamw"])
    assert [(p.kind, p.low, p.high, p.choices) for p in params] == [
        ("log", 0.01, 100.0, []), ("float", 0.001, 0.1, []), ("int", 2, 5, []), ("choice", None, None, ["sgd", "adamw"])]


def test_a_space_corner_the_config_refuses_stops_before_any_work(tiny_synth, tmp_path):
    out = tmp_path / "tune"
    cmd = tune_cmd(tiny_synth, out)
    cmd[cmd.index("regularizer.weight=log:0.01:100")] = "regularizer.weight=float:-1:10"
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "regularizer.weight=-1" in proc.stderr and ">= 0" in proc.stderr, proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------- SQLite
def test_one_worker_prunes_and_writes_a_best_yaml_that_runs(tiny_synth, tmp_path):
    out = tmp_path / "tune"
    proc = subprocess.run(tune_cmd(tiny_synth, out), env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = check_study(out, trials=8, epochs=4)
    assert summary["counts"].get("pruned", 0) >= 1, summary["counts"]
    assert (out / "tune.db").exists() and (out / "tune.png").stat().st_size > 0
    md = (out / "tune.md").read_text()
    assert "Best on validation" in md and f"trial {summary['best']['number']}" in md
    run = tmp_path / "best"
    done = subprocess.run([sys.executable, "-m", "sdtl", "-q", "finetune", "--config", str(out / "best.yaml"),
                           "--out", str(run), "--set", "optim.epochs=1"], env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    import yaml

    weight = yaml.safe_load((run / "config.yaml").read_text())["regularizer"]["weight"]
    assert weight == pytest.approx(summary["best"]["params"]["regularizer.weight"], rel=1e-12)


def test_a_worker_killed_mid_trial_is_retried_in_the_same_run_folder(tiny_synth, tmp_path):
    out = tmp_path / "tune"
    cmd = tune_cmd(tiny_synth, out, "--heartbeat", "1", trials=3, epochs=4)
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    victim = None
    while victim is None:  # kill the worker inside its second trial, after that trial's first epoch
        assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
        metrics = out / "trials" / "0001" / "metrics.jsonl"
        if metrics.exists() and epochs_run(str(metrics.parent)):
            victim = out / "trials" / "0001"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    epochs_before = epochs_run(str(victim))
    assert 1 <= len(epochs_before) < 4
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = check_study(out, trials=3, epochs=4)
    failed = [t for t in summary["trials"] if t["state"] == "fail"]
    assert [t["number"] for t in failed] == [1], summary["trials"]
    retry = next(t for t in summary["trials"] if t["retry_of"] == 1)
    assert retry["run_dir"] == str(victim) and retry["params"] == failed[0]["params"]
    assert len(finished(summary)) == 3  # the retry replaced the dead trial: not counted twice
    # resumed, not restarted: the epochs the dead worker finished are kept and not run again (check_study:
    # one record per epoch), and the run went on to its end or its pruning
    after = epochs_run(str(victim))
    assert after[: len(epochs_before)] == epochs_before and len(after) > len(epochs_before)


# ------------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def postgres():
    yield from started_in_a_temp_folder("sdtl-pg-", "PostgreSQL", lambda root: postgres_server.start(root / "pg"),
                                        postgres_server.stop)


def test_two_workers_share_one_postgresql_study(postgres, tiny_synth, tmp_path):
    out = tmp_path / "tune"
    cmd = tune_cmd(tiny_synth, out, "--storage", postgres.url, "--study", "two-workers", trials=6, epochs=4)
    workers = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    time.sleep(3)  # the second worker joins a study the first has created
    workers.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for w in workers:
        _, err = w.communicate(timeout=900)
        assert w.returncode == 0, err[-3000:]
    summary = check_study(out, trials=6, epochs=4)
    assert "postgresql://" in summary["storage"] and not (out / "tune.db").exists()
    assert len({t["worker"] for t in finished(summary)}) == 2  # both workers took trials
    assert len(finished(summary)) <= 6 + 1  # at most one extra from the race of two workers
