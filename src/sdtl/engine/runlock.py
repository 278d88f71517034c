"""One writer per run directory.

Two ``sdtl finetune --out R --resume auto`` started side by side both trained R and wrote every epoch
of ``metrics.jsonl`` twice. Every command that writes a run directory (``finetune``, ``pretrain``,
``evaluate``, ``demo``) holds :class:`RunLock` on it: an exclusive POSIX lock (``lockf``) on ``R/.sdtl.lock``.
The kernel releases the lock when the process ends however it ends (kill -9 included), so a stale
lock file never blocks anything; the PID and command written into it only say who holds it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from sdtl.errors import UserError

LOCK_NAME = ".sdtl.lock"


class RunLock:
    """``with RunLock(out_dir, "finetune"):`` — refuse (UserError) if another process holds ``out_dir``."""

    def __init__(self, out_dir: str | Path, what: str) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A POSIX record lock, not flock(): DataLoader workers are forked with the descriptor, and a
            # flock() would stay held by them after the trainer is killed; lockf locks belong to the
            # process alone and end with it.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"--out {self.path.parent}: in use by another sdtl process (PID {holder.get('pid', '?')}"
                            f" on {holder.get('host', '?')}, `sdtl {holder.get('what', '?')}`); wait for it to "
                            f"finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                 "argv": sys.argv}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def is_lock_file(path: Path) -> bool:
    return path.name == LOCK_NAME
