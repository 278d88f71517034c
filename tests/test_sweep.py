"""`sdtl sweep`: a grid × seeds of ordinary runs; kill -9 and re-run finishes only what is missing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtl.cli import main
from sdtl.studies.sweep import parse_grid, split_values

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
GRID = ["--grid", "regularizer.weight=0,1", "--grid", "optim.lr=0.01,0.05"]


def sweep_args(data, out, *extra):
    return ["-q", "sweep", "--config", "synthetic_tiny", *GRID, "--seeds", "2", "--out", str(out),
            "--set", f"data.root={data}", "--set", "optim.epochs=1", "--set", "eval.probe_videos=0",
            "--set", "run.threads=1", *extra]


def results_of(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text()) for p in sorted(out.glob("runs/*/seed*/results.json"))}


def test_grid_parsing():
    assert split_values("0.1,1,[a,b],x") == ["0.1", "1", "[a,b]", "x"]
    assert parse_grid(["regularizer.weight=1,10", "optim.lr=0.1"]) == {"regularizer.weight": ["1", "10"],
                                                                       "optim.lr": ["0.1"]}


@pytest.mark.parametrize("grid, message", [
    (["regularizer.weight=1,fast"], "regularizer.weight: expected float"),
    (["regularizer.wieght=1,2"], "regularizer.wieght: unknown key"),
    (["regularizer.name=sd,foo"], "is not one of none, sd"),
    (["run.seed=0,1"], "--seeds"),
    (["regularizer.weight=1,1"], "repeated"),
])
def test_bad_grid_is_rejected_before_any_run(grid, message, tiny_synth, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["-q", "sweep", "--config", "synthetic_tiny", "--out", str(out), "--set", f"data.root={tiny_synth}"]
    for g in grid:
        args += ["--grid", g]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sweep_end_to_end_table_equals_runs_and_reruns_skip(tiny_synth, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(sweep_args(tiny_synth, out)) == 0
    results = results_of(out)
    assert len(results) == 8  # 2 x 2 points x 2 seeds, each an ordinary run folder
    summary = json.loads((out / "sweep.json").read_text())
    for row in summary["points"]:
        tests = [results[d]["video_acc1"] for d in row["dirs"]]
        assert row["test"]["values"] == tests and row["finished"] == 2
        # val: the validation accuracy of the epoch each run's results.json says it selected
        for d, val in zip(row["dirs"], row["val"]["values"]):
            history = [json.loads(x) for x in (out / d / "metrics.jsonl").read_text().splitlines()]
            epoch = results[d]["selected"]["epoch"]
            assert val == next(r["val_video_acc1"] for r in history if r["epoch"] == epoch)
    best = [r for r in summary["points"] if r["best_on_val"]]
    assert len(best) == 1 and best[0]["val"]["mean"] == max(r["val"]["mean"] for r in summary["points"])
    table = (out / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert sum("◀" in r for r in rows) == 1 and f"{best[0]['test']['mean']:.1f} ± {best[0]['test']['std']:.1f}" in table
    assert (out / "sweep.png").stat().st_size > 0 and summary["num_classes"] == 6  # its chance line: 100/6
    assert "acc@5" not in table.lower()  # 6 classes; the studies print no acc@5
    # each run's config is the base + its point + its seed
    cfg = (out / "runs" / "regularizer.weight=1,optim.lr=0.05" / "seed1" / "config.yaml").read_text()
    assert "lr: 0.05" in cfg and "seed: 1" in cfg and "weight: 1.0" in cfg

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/results.json")}
    capsys.readouterr()
    assert main(sweep_args(tiny_synth, out)) == 0  # same command: nothing re-runs
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # another grid on the same folder is refused, nothing changes; --extend adds the new values only
    bigger = sweep_args(tiny_synth, out)
    bigger[bigger.index("regularizer.weight=0,1")] = "regularizer.weight=0,1,10"
    assert main(bigger) == 2 and "--extend" in capsys.readouterr().err
    assert main([*bigger, "--dry-run", "--extend"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("finished") for line in listing) == 8
    assert sum(line.startswith("to run") for line in listing) == 4


def test_kill_9_then_rerun_finishes_only_what_is_missing(tiny_synth, tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "sdtl", *sweep_args(tiny_synth, out, "--set", "optim.epochs=2")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill when 3 runs are done and the 4th has begun
        done = list(out.glob("runs/*/seed*/results.json"))
        started = list(out.glob("runs/*/seed*/config.yaml"))
        if len(done) >= 3 and len(started) > len(done):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/results.json")}
    assert 3 <= len(finished) < 8
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished runs untouched
    assert len(results_of(out)) == 8
    for metrics in out.glob("runs/*/seed*/metrics.jsonl"):  # the interrupted run resumed: no epoch twice
        epochs = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
        assert epochs == [1, 2], (metrics, epochs)  # no probe: no epoch-0 record


def test_parallel_children(tiny_synth, tmp_path):
    out = tmp_path / "p"
    args = ["-q", "sweep", "--config", "synthetic_tiny", "--grid", "regularizer.weight=0,1", "--seeds", "1",
            "--out", str(out), "--parallel", "2", "--set", f"data.root={tiny_synth}", "--set", "optim.epochs=1",
            "--set", "eval.probe_videos=0", "--set", "run.threads=1"]
    assert main(args) == 0
    assert len(results_of(out)) == 2 and len(list((out / "logs").iterdir())) == 2


def test_foreign_folder_is_refused(tiny_synth, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(sweep_args(tiny_synth, out)) == 2
    assert "not an sdtl sweep folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_same_grid_in_another_value_order_is_the_same_sweep():
    from sdtl.studies.sweep import _same_sweep

    base = {"base_config": {"optim": {"lr": 0.1}}, "seeds": 2}
    assert _same_sweep({**base, "grid": {"regularizer.weight": ["0", "1"]}},
                       {**base, "grid": {"regularizer.weight": ["1", "0"]}})
    assert not _same_sweep({**base, "grid": {"regularizer.weight": ["0", "1"]}},
                           {**base, "grid": {"regularizer.weight": ["0", "1", "10"]}})
