"""One writer per run directory.

Two ``sdtl finetune`` processes resuming the same run folder R side by side both trained R and wrote
every epoch of ``metrics.jsonl`` twice. Every command that writes a run directory (``finetune``, ``pretrain``,
``evaluate``, ``demo``) holds :class:`RunLock` on it: an exclusive ``flock`` on ``R/.sdtl.lock``.
The kernel releases the lock when the process ends however it ends (kill -9 included), so a stale
lock file never blocks anything; the PID and command written into it only say who holds it.

Why ``flock`` and not a POSIX ``lockf``: a ``lockf`` lock is dropped as soon as the process closes
*any* descriptor of the file (reading the holder line is enough), and a second ``RunLock`` on the
same folder in the same process is silently granted and then releases the first. A ``flock``
belongs to one open file, so neither can happen. Its one trap, forked children (DataLoader
workers) inheriting the open file and keeping the lock after the trainer is killed, is closed by
dropping the descriptor in every forked child.

Under ``torchrun`` only rank 0 takes the lock (:func:`rank0_lock`); the other ranks work under it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from sdtl.errors import UserError

LOCK_NAME = ".sdtl.lock"

_HELD_FDS: set[int] = set()  # descriptors of the locks this process holds


def _close_in_forked_child() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)  # the parent's open file, and with it the lock, stays the parent's alone
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


class RunLock:
    """``with RunLock(out_dir, "finetune"):`` — refuse (UserError) if another holder has ``out_dir``.

    Creates ``out_dir`` if needed. ``what`` names the command in the holder line that a refused
    second process prints (``sdtl demo``, ``sdtl finetune``, ...).
    """

    def __init__(self, out_dir: str | Path, what: str) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{self.path.parent}: in use by another sdtl process "
                                f"(PID {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                                f"`sdtl {holder.get('what', '?')}`); wait for it to finish or stop it, "
                                f"or choose another output folder") from exc
            # A holder that gave up on bad input removes its lock file with its empty folder; a lock
            # taken on that removed file would not exclude anyone, so take the file now in place.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                 "argv": sys.argv, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        self._fd = fd
        _HELD_FDS.add(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def rank0_lock(out_dir: str | Path, what: str):
    """:class:`RunLock` for a single process or torchrun's rank 0; nothing for the other ranks.

    The other ranks must not try: they would find rank 0 holding the folder and refuse their own run.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return RunLock(out_dir, what)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def is_lock_file(path: Path) -> bool:
    return path.name == LOCK_NAME
