"""Atomic file writes: a crash (or kill -9) leaves either the old file or the new one, never half.

Every file sdtl rewrites in place — checkpoints, metrics.jsonl, results.json, summaries, plots —
goes through :func:`atomic_write` / :func:`atomic_write_stream`: write to a temp file in the same
folder, fsync it, rename it over the target, fsync the folder. Appends (``metrics.jsonl``) go through
:func:`append_text`, which cuts a failed append back to the last complete line.

A full disk (ENOSPC, or a quota: EDQUOT) is not a crash: the temp file is removed, the old file is
left as it was, and :class:`~sdtl.errors.NoSpaceError` (a one-line :class:`~sdtl.errors.UserError` naming the file)
is raised, however the writer reported it. sdtl's own writers (``torch.save``, ``savefig``, text)
write through a file object opened here, so the operating system's ``OSError`` reaches us even
where a library would wrap it (``torch.save`` to a path turns it into ``RuntimeError: [enforce fail at
inline_container.cc] unexpected pos ...``).
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from sdtl.errors import NoSpaceError

#: errno values that mean "the disk (or the user's quota) is full"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: the temp files :func:`atomic_write` makes: ``.NAME.PID.HEX8.tmp`` beside the target
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def is_no_space(exc: BaseException, directory=None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or quota is full.

    Checked: an ``OSError`` with errno ENOSPC / EDQUOT anywhere in the cause chain, the OS's own
    wording of those errors, and torch's zip writer's ``unexpected pos`` (what a failed short write
    becomes inside ``torch.save``) when ``directory``'s filesystem has (almost) nothing left.
    """
    if isinstance(exc, NoSpaceError):
        return True
    texts = {os.strerror(e).lower() for e in NO_SPACE_ERRNOS} | {"no space left on device", "disk quota exceeded"}
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        message = str(e).lower()
        if any(t in message for t in texts):
            return True
        if directory is not None and "unexpected pos" in message:
            free = _free_bytes(Path(directory))
            if free is not None and free < (1 << 20):
                return True
    return False


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def no_space_error(path, exc: BaseException | None = None) -> NoSpaceError:
    """The one-line error for a write to ``path`` that failed for lack of space."""
    path = Path(path)
    free = _free_bytes(path.parent if path.parent.exists() else Path("."))
    where = f" ({_human(free)} free there)" if free is not None else ""
    quota = any(isinstance(e, OSError) and e.errno == errno.EDQUOT for e in _chain(exc)) if exc else False
    what = "disk quota exceeded" if quota else "no space left on the device"
    return NoSpaceError(f"{path}: {what} while writing it{where}; it was not written (its previous version, if "
                        f"any, is intact): free space there and run the same command again (a training run "
                        f"continues with «resume=auto»)", path=path)


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


def temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _write_through(path: Path, put, data: bytes) -> int:
    """Every byte sdtl writes into a run file passes here on its way to ``put`` (the real write) for the
    file that becomes ``path``: the one place a test makes the disk full."""
    return put(data)


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file object over the temp file of ``target``: hashes what passes
    (sha256) and keeps the first ``OSError`` of the real file, so a library that wraps it (torch's
    zip writer) cannot hide it."""

    def __init__(self, handle, target: Path) -> None:
        super().__init__()
        self._handle, self.target = handle, target
        self._written = 0
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._written

    def write(self, data) -> int:
        data = bytes(data)
        try:
            done = 0
            while done < len(data):  # a short write is followed by the rest (or by its error)
                count = _write_through(self.target, self._handle.write, data[done:])
                if count == 0:
                    raise OSError(errno.EIO, f"{self.target}: the write made no progress")
                done += len(data) - done if count is None else count
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha256.update(data)
        self._written += len(data)
        return len(data)

    def flush(self) -> None:
        if self._handle.closed:  # the sink outlives its file (IOBase's finalizer flushes it once more)
            return
        try:
            self._handle.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def _commit(path: Path, produce, before_replace=None):
    """Shared by the writers: ``produce(tmp)`` writes and fsyncs the temp file and returns a result;
    then ``before_replace()`` and the rename. A failure removes the temp file; a full disk raises
    :class:`NoSpaceError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(path, exc) from exc
        raise
    tmp = temp_path(path)
    try:
        result = produce(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, Exception) and not isinstance(exc, NoSpaceError) and is_no_space(exc, path.parent):
            raise no_space_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)
    return result


def atomic_write(path, write) -> Path:
    """Write via ``write(tmp_path)`` to a temp file in ``path``'s folder, fsync it, then rename over ``path``.

    If ``write`` raises, the temp file is removed and ``path`` keeps its old content. For writers that
    only take a path (safetensors); sdtl's own writers use :func:`atomic_write_stream`.
    """
    def produce(tmp: Path) -> None:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())

    path = Path(path)
    _commit(path, produce)
    return path


def atomic_write_stream(path, write, before_replace=None) -> str:
    """Write via ``write(handle)`` (a binary, write-only file object) atomically; return the sha256 of
    what was written (hex). ``before_replace()`` runs after the temp file is complete and synced,
    just before the rename (a checkpoint removes its stale checksum file there)."""
    def produce(tmp: Path) -> str:
        with open(tmp, "wb") as handle:
            sink = _Sink(handle, path)
            try:
                write(sink)
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException as exc:
                if sink.error is not None and sink.error is not exc:
                    raise sink.error from exc  # the OS's own error, not a library's wrapper of it
                raise
        return sink.sha256.hexdigest()

    path = Path(path)
    return _commit(path, produce, before_replace)


def atomic_write_text(path, text: str) -> Path:
    path = Path(path)
    atomic_write_stream(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


def atomic_copy(src, dst) -> Path:
    dst = Path(dst)
    atomic_write_stream(dst, lambda handle: _copy_into(src, handle))
    return dst


def _copy_into(src, handle) -> None:
    with open(src, "rb") as source:
        shutil.copyfileobj(source, handle, 1 << 20)


def atomic_link(src, dst) -> Path:
    """``dst`` becomes the same file as ``src`` (a hard link, so no data is copied and no space used),
    atomically: a crash leaves the old ``dst`` or the new one. Only for files that are only ever
    replaced by a rename, never changed in place (sdtl's checkpoints). Where the filesystem has no
    hard links this is :func:`atomic_copy`."""
    src, dst = Path(src), Path(dst)
    try:
        if os.path.samefile(src, dst):
            return dst  # already one file (rename(2) would do nothing and leave the temp name behind)
    except OSError:
        pass  # dst does not exist yet
    tmp = temp_path(dst)
    try:
        os.link(src, tmp)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(dst, exc) from exc
        return atomic_copy(src, dst)  # EPERM, EXDEV, EMLINK, ENOTSUP: no hard link here
    try:
        os.replace(tmp, dst)
    finally:
        try:
            os.unlink(tmp)  # left only if the rename failed (or dst became the same file meanwhile)
        except FileNotFoundError:
            pass
    _fsync_dir(dst.parent)
    return dst


def append_text(path, text: str) -> Path:
    """Append ``text`` to ``path`` in one write; if it fails (a full disk), cut the file back to what it
    held before, so no partial line is left, and raise (:class:`NoSpaceError` for a full disk)."""
    path = Path(path)
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(path, exc) from exc
        raise
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += _write_through(path, lambda chunk: os.write(fd, chunk), data[written:])
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            if is_no_space(exc):
                raise no_space_error(path, exc) from exc
            raise
    finally:
        os.close(fd)
    return path


def atomic_savefig(fig, path, **kwargs) -> Path | None:
    """``fig.savefig`` atomically (the format comes from ``path``'s suffix, not the temp name).

    A figure that cannot be written for lack of space is skipped with a warning (None is returned):
    every figure sdtl draws is drawn from data it has written (metrics.jsonl, results.json) or will
    write next, so nothing is lost, and a run or a summary does not die for a picture; the data
    writes that follow stop the program cleanly if the disk stays full.
    """
    fmt = Path(path).suffix.lstrip(".") or "png"
    path = Path(path)
    try:
        atomic_write_stream(path, lambda handle: fig.savefig(handle, format=fmt, **kwargs))
    except NoSpaceError:
        logging.getLogger("sdtl.files").warning(
            "%s: no space left on the device; the figure was not written (it is drawn from data sdtl keeps: "
            "free space and it is redrawn at the next redraw or run)", path)
        return None
    return path


def remove_stale_temp_files(directory) -> list[Path]:
    """Remove the temp files a killed writer left in ``directory`` (``.NAME.PID.HEX8.tmp``, made by
    this module only), except those of a process that is still alive. Returns what was removed.
    Call it only where no other live process can be writing (a run folder under its lock)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = TEMP_NAME.match(entry.name)
        if not match or not entry.is_file() or entry.is_symlink():
            continue
        if _alive(int(match["pid"])):  # this process, or one that may still be writing
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
