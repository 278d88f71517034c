"""Run-directory integrity with real processes: one writer per run (a running trainer holds it, a
killed one and its forked workers hold nothing), torchrun ranks under rank 0's lock, resume never
writes into a folder that holds no run, and a pre-training resume records its config changes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from data_helpers import free_port
from sdtl.engine.config import load_config
from sdtl.engine.runlock import LOCK_NAME, RunLock
from sdtl.errors import UserError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def sdtl_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "sdtl", "-q", *args]


def _wait_for(condition, what: str, proc, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"process ended before {what}: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def finished_run(tiny_synth, tmp_path_factory):
    from sdtl.engine.finetune import run_finetune

    out = tmp_path_factory.mktemp("finished") / "run"
    run_finetune(load_config("synthetic_tiny", [f"data.root={tiny_synth}", "optim.epochs=1",
                                                "eval.probe_videos=0", "run.threads=1"]), out)
    return out


def test_a_running_trainer_holds_its_run_and_a_killed_one_blocks_nothing(tiny_synth, tmp_path):
    run = tmp_path / "run"
    trainer = subprocess.Popen(
        sdtl_cmd("finetune", "--config", "synthetic_tiny", "--out", str(run), "--set", f"data.root={tiny_synth}",
                 "--set", "optim.epochs=50", "--set", "data.workers=2", "--set", "eval.probe_videos=0",
                 "--set", "run.threads=1"),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, "the first epoch", trainer)
        trainer.send_signal(signal.SIGSTOP)  # frozen mid-run: it holds the run, writes nothing meanwhile
        before = metrics.read_bytes()
        with pytest.raises(UserError, match=rf"in use by another sdtl process \(PID {trainer.pid} .*sdtl finetune"):
            with RunLock(run, "finetune"):
                pass
        # the reproduction: a second trainer on the same run is refused, and writes nothing
        second = subprocess.run(sdtl_cmd("finetune", "--out", str(run), "--resume", "auto"), env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"PID {trainer.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert metrics.read_bytes() == before
    finally:
        trainer.kill()  # SIGKILL (delivered to a stopped process too); its DataLoader workers may linger
        trainer.wait()
    with RunLock(run, "finetune"):  # at once: neither the dead trainer nor its orphaned workers hold it
        pass


FORKING_HOLDER = textwrap.dedent("""
    import multiprocessing, sys, time
    from sdtl.engine.runlock import RunLock
    with RunLock(sys.argv[1], "finetune"):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=False)
        child.start()  # as a DataLoader worker is: forked while the lock is held
        print(child.pid, flush=True)
        time.sleep(60)
""")


def test_forked_children_of_a_killed_holder_do_not_keep_the_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(run)], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(UserError, match=rf"PID {holder.pid}\b"):
            with RunLock(run, "finetune"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked child outlives its parent, as orphaned workers do for a while
        with RunLock(run, "finetune"):
            pass
    finally:
        holder.kill()
        holder.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_one_process_cannot_hold_a_run_twice_and_reading_the_lock_file_keeps_it(tmp_path):
    run = tmp_path / "run"
    probe = [sys.executable, "-c", "import sys; from sdtl.engine.runlock import RunLock\n"
                                   "with RunLock(sys.argv[1], 'evaluate'): pass", str(run)]
    with RunLock(run, "demo"):
        # a nested lock on the same folder used to be granted and its exit released the outer one
        with pytest.raises(UserError, match=rf"PID {os.getpid()}\b.*sdtl demo"):
            with RunLock(run, "finetune"):
                pass
        assert json.loads((run / LOCK_NAME).read_text())["what"] == "demo"  # open + close of the lock file
        other = subprocess.run(probe, env=ENV, capture_output=True, text=True)
        assert other.returncode != 0 and f"PID {os.getpid()}" in other.stderr
    assert subprocess.run(probe, env=ENV, capture_output=True, text=True).returncode == 0


def test_evaluate_under_torchrun_runs_under_rank_0s_lock(finished_run, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "sdtl", "-q", "evaluate", "--checkpoint",
           str(finished_run / "checkpoints" / "last.pt"), "--out", str(out), "--set", "run.threads=1"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # rank 1 used to be refused by rank 0's lock
    assert json.loads((out / "results.json").read_text())["num_test_videos"] == 36


def test_evaluate_never_writes_over_files_and_bad_input_leaves_no_folder(finished_run, tmp_path):
    from sdtl.engine.evaluate import evaluate_checkpoint

    out = tmp_path / "eval"
    with pytest.raises(UserError, match="no such checkpoint"):
        evaluate_checkpoint(tmp_path / "missing.pt", out)
    assert not out.exists()  # it used to leave a folder holding the lock file

    mine = tmp_path / "figures"
    mine.mkdir()
    (mine / "confusion.png").write_bytes(b"my own figure")
    with pytest.raises(UserError, match="already holds confusion.png"):
        evaluate_checkpoint(finished_run / "checkpoints" / "last.pt", mine)
    assert (mine / "confusion.png").read_bytes() == b"my own figure"
    assert sorted(p.name for p in mine.iterdir()) == ["confusion.png"]


@pytest.mark.parametrize("resume", ["auto", "checkpoint"])
def test_resume_into_a_folder_that_holds_no_run_is_refused_and_touches_nothing(finished_run, tiny_synth,
                                                                              tmp_path, resume):
    from sdtl.engine.finetune import run_finetune

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"mine": true}')
    (mine / "notes.txt").write_text("notes")
    target = "auto" if resume == "auto" else str(finished_run / "checkpoints" / "last.pt")
    cfg = load_config("synthetic_tiny", [f"data.root={tiny_synth}", "optim.epochs=2", "eval.probe_videos=0"])
    with pytest.raises(UserError, match=r"holds files but no sdtl run \(notes.txt, results.json\)"):
        run_finetune(cfg, mine, resume=target)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "results.json"]
    assert (mine / "results.json").read_text() == '{"mine": true}'


def test_pretrain_resume_warns_and_records_config_changes(tiny_synth, tmp_path, caplog):
    from sdtl.engine.pretrain import run_pretrain

    out = tmp_path / "pre"
    base = [f"data.root={tiny_synth}", "run.threads=1", "optim.epochs=1"]
    run_pretrain(load_config("synthetic_tiny_pretrain", base, kind="pretrain"), out)
    with pytest.raises(UserError, match="do not fit the configured model"):  # was a RuntimeError traceback
        run_pretrain(load_config("synthetic_tiny_pretrain", [*base, "model.width=0.125"], kind="pretrain"), out,
                     resume="auto")
    assert not (out / "config_changes.jsonl").exists()  # a refused resume changed nothing
    with caplog.at_level("WARNING", logger="sdtl"):
        run_pretrain(load_config("synthetic_tiny_pretrain", [*base, "optim.epochs=2"], kind="pretrain"), out,
                     resume="auto")
    assert "optim.epochs: 1 -> 2" in caplog.text
    changes = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert [c["changes"] for c in changes] == [["optim.epochs: 1 -> 2"]] and changes[0]["epoch"] == 1
    assert Path(changes[0]["resumed_from"]) == (out / "checkpoints" / "last.pt").resolve()
