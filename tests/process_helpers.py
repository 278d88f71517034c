"""Stopping the daemons a test fixture started (Slurm, munge, PostgreSQL), by the PIDs they wrote."""
from __future__ import annotations

import os
import signal
import time


def stop_pid(pid: int, terminate: bool = True, wait_s: float = 10.0) -> None:
    """SIGTERM ``pid`` (unless ``terminate`` is False: something else asked it to stop), wait up to
    ``wait_s`` seconds for it to end, then SIGKILL it. A process already gone is fine."""
    try:
        if terminate:
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def started_in_a_temp_folder(prefix: str, what: str, start, stop):
    """The body of a fixture that starts a daemon with ``start(folder)`` in a new temp folder (not under
    pytest's, which is private to root: the daemons run as their own users), yields it, then stops it
    with ``stop`` and removes the folder. ``start`` returning a string skips with that reason."""
    import shutil
    import tempfile
    from pathlib import Path

    import pytest

    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # the daemons' users must reach their folders under it
    started = start(root)
    if isinstance(started, str):
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no test {what}: {started}")
    try:
        yield started
    finally:
        stop(started)
        shutil.rmtree(root, ignore_errors=True)
