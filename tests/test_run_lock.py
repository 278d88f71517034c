"""One writer per run directory: a second trainer is refused with the holder's PID, a killed
holder blocks nothing, and the lock file never makes a folder look used."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sdtl.engine.runlock import LOCK_NAME, RunLock
from sdtl.errors import UserError

HOLDER = textwrap.dedent("""
    import sys, time
    from sdtl.engine.runlock import RunLock
    with RunLock(sys.argv[1], "finetune"):
        print("held", flush=True)
        time.sleep(120)
""")


def _start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_blocks_nothing(tmp_path):
    run = tmp_path / "run"
    proc = _start_holder(run)
    try:
        with pytest.raises(UserError, match=rf"in use by another sdtl process \(PID {proc.pid}\b.*sdtl finetune"):
            with RunLock(run, "finetune"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel released the lock with the process: the stale file does not block
    with RunLock(run, "finetune"):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_cli_finetune_is_refused_while_another_process_holds_the_run(tiny_synth, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    proc = _start_holder(run)
    try:
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "sdtl", "finetune", "--config", "synthetic_tiny", "--out", str(run),
                              "--resume", "auto", "--set", f"data.root={tiny_synth}"], capture_output=True, text=True)
        assert res.returncode == 2 and f"PID {proc.pid}" in res.stderr, res.stderr
        assert time.monotonic() - t0 < 60
    finally:
        proc.kill()
        proc.wait()
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n'  # untouched


def test_lock_file_does_not_count_as_content(tmp_path):
    from sdtl.engine.rundir import resolve_resume

    run = tmp_path / "run"
    with RunLock(run, "finetune"):
        assert resolve_resume(run, None) is None  # a new run may start in a folder holding only the lock
