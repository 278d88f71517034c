"""Atomic file writes: a crash (or kill -9) leaves either the old file or the new one, never half.

Every file sdtl rewrites in place — checkpoints, metrics.jsonl, results.json, summaries, plots —
goes through :func:`atomic_write`: write to a temp file in the same folder, fsync it, rename it over
the target, fsync the folder.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> Path:
    """Write via ``write(tmp_path)`` to a temp file in ``path``'s folder, fsync it, then rename over ``path``.

    If ``write`` raises, the temp file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_copy(src, dst) -> Path:
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_savefig(fig, path, **kwargs) -> Path:
    """``fig.savefig`` atomically (the format comes from ``path``'s suffix, not the temp name)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
