"""Run folders: which checkpoint a run resumes from, never overwriting what sdtl did not write, the
config identity of a run (and how a resume changes it), the process-group entry and the run log file.

Faults on the disk: an output folder sdtl cannot write into is refused before any work
(:func:`check_writable`); a resume verifies the checkpoint against its checksum and, for the run's
own ``last.pt``, falls back to ``prev.pt`` when it is truncated or corrupted (:func:`load_resume`),
saying which file, why, and where the run continues from; temp files a killed writer left behind are
removed under the run's lock.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from sdtl.atomic import append_text, is_no_space, remove_stale_temp_files
from sdtl.engine.runlock import LOCK_NAME, RunLock
from sdtl.engine.runtime import amp_dtype, configure_determinism
from sdtl.errors import CheckpointError, NoSpaceError, UserError

log = logging.getLogger("sdtl.run")


# What sdtl writes into a run folder before its config.yaml: none of it makes a folder a run
# ("slurm": the job's scripts and logs, written by `--slurm` when it submits the run).
BOOKKEEPING = frozenset({LOCK_NAME, "train.log", "video_index.jsonl", "slurm"})


def resolve_resume(out_dir: Path, resume: str | None, is_main: bool = True) -> Path | None:
    """Decide which checkpoint to resume from, refusing to touch an existing run unasked.

    ``resume=None``: ``out_dir`` must not hold a run (or anything else). ``"auto"``: resume from
    ``out_dir/checkpoints/last.pt`` when it exists (else from ``prev.pt``, the one before it), else
    start fresh. A path: that checkpoint. With a resume, ``out_dir`` must be new, empty, or a run
    folder (it has config.yaml or a checkpoint). Whether the file is usable is :func:`load_resume`'s.
    """
    last = out_dir / "checkpoints" / "last.pt"
    prev = last.with_name("prev.pt")
    # Only rank 0 judges the folder: by the time another rank looks, rank 0 may have written in it.
    content = sorted(p.name for p in out_dir.iterdir() if p.name not in BOOKKEEPING) \
        if is_main and out_dir.is_dir() else []
    is_run = (out_dir / "config.yaml").exists() or last.exists() or prev.exists()
    if resume is None:
        if content:
            what = "a run" if is_run else "files"
            raise UserError(f"«out» {out_dir}: already holds {what}; pass «resume=auto» to continue it, "
                            f"or choose another «out»")
        return None
    if content and not is_run:
        # --resume continues a run; it must not write config.yaml, metrics.jsonl, results.json ...
        # over the files of a folder that holds none.
        raise UserError(f"«out» {out_dir}: holds files but no sdtl run ({', '.join(content[:3])}"
                        f"{', ...' if len(content) > 3 else ''}); «resume» continues a run in its own "
                        f"folder: choose another «out»")
    if resume == "auto":
        return last if last.exists() else prev if prev.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"«resume={resume}»: no such checkpoint file; pass «resume=auto» or the path "
                        f"of a last.pt / best.pt written by sdtl")
    return path


def start_run(cfg, out_dir: Path, resume: str | None, info, kind: str) -> tuple[Path | None, dict | None]:
    """Checks shared by every run before any work: determinism, AMP, and which checkpoint to resume
    (returned in today's layout, whatever version wrote it: :func:`sdtl.engine.state.read_checkpoint`)."""
    from sdtl.engine.state import read_checkpoint
    from sdtl.models.checkpoints import safe_load

    configure_determinism(cfg.run.deterministic, cfg.run.threads, cfg.run.cudnn_benchmark)
    amp_dtype(cfg.optim.amp, info.device)  # fail early: bf16 on a card without it
    resume_path = resolve_resume(out_dir, resume, info.is_main)
    if info.is_main:  # under the run's lock: no other sdtl process writes here
        for folder in (out_dir, out_dir / "checkpoints"):
            for stale in remove_stale_temp_files(folder):
                log.info("removed %s, a temp file left by a killed writer", stale)
    payload = None
    if resume_path:
        resume_path, payload = load_resume(out_dir, resume_path, info.is_main, safe_load, asked=resume)
    if payload is not None and payload.get("sdtl_format") != kind:
        raise UserError(f"«resume={resume_path}»: not an sdtl {kind} checkpoint (format "
                        f"{payload.get('sdtl_format')!r}); pass checkpoints/last.pt of a {kind} run")
    return resume_path, (None if payload is None else read_checkpoint(payload)[1])


def load_resume(out_dir: Path, path: Path, is_main: bool, load, asked: str | None = None) -> tuple[Path, dict]:
    """``(path, payload)`` of the checkpoint a resume starts from, read with ``load`` (:func:`safe_load`,
    which checks the checksum beside the file).

    The run's own ``last.pt`` (``--resume auto``, or its path given) that is truncated, corrupted or
    does not match its checksum is not the end: the run falls back to ``prev.pt``, the checkpoint
    before it. The log says which file was refused and why, and where the run continues from; the
    refused file is set aside (``last.pt.corrupt``). When no checkpoint of the run is usable, a
    one-line :class:`~sdtl.errors.CheckpointError` says what was checked (and whether ``best.pt``,
    usually further back, is usable). Any other path is read as it is, without fallback. ``asked``:
    the ``--resume`` value as given (for the message).
    """
    from sdtl.engine import state as state_mod

    path = Path(path)
    own_dir = out_dir / "checkpoints"
    own = path.parent.resolve() == own_dir.resolve() and path.name in (state_mod.LAST, state_mod.PREV)
    if not own:
        return path, load(path)
    chain = [path] + ([own_dir / state_mod.PREV] if path.name == state_mod.LAST else [])
    refused: list[tuple[Path, str]] = []
    for candidate in chain:
        if not candidate.is_file():
            refused.append((candidate, "missing"))
            continue
        try:
            payload = load(candidate)
        except CheckpointError as exc:
            refused.append((candidate, getattr(exc, "reason", None) or exc.template))
            continue
        if is_main and not refused and candidate.name == state_mod.PREV and not (own_dir / state_mod.LAST).exists():
            log.warning("%s: missing (set aside by an earlier resume, or never renamed into place); resuming from "
                        "%s, at %s", own_dir / state_mod.LAST, candidate, state_mod.describe_position(payload))
        if refused and is_main:
            for bad, why in refused:
                if bad.is_file():
                    state_mod.set_aside(bad, f"refused for the resume: {why}")
                else:
                    log.warning("%s: %s", bad, why)
            log.warning("resuming from %s instead, at %s: the steps after it are trained again",
                        candidate, state_mod.describe_position(payload))
        return candidate, payload
    checked = "; ".join(f"{p.name}: {why}" for p, why in refused)
    best, hint = own_dir / state_mod.BEST, ""
    if best.is_file():
        try:
            hint = (f"; best.pt is readable (it stands at {state_mod.describe_position(load(best))}, further "
                    f"back): to continue from it, pass «resume={best}»")
        except CheckpointError as exc:
            hint = f"; best.pt is not usable either ({getattr(exc, 'reason', None) or exc.template})"
    raise CheckpointError(f"«resume={asked or path}»: no usable checkpoint of this run in {own_dir} (checked {checked})"
                          f"{hint}", path=path)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``["optim.epochs: 30 -> 100", ...]`` for every leaf that differs between two config dicts; the
    sections that say where a run executes (``slurm``) are not compared (not part of its identity)."""
    from sdtl.engine.config import NOT_IDENTITY

    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in NOT_IDENTITY:
            continue
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_changes(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def as_read_today(stored: dict, kind: str) -> dict:
    """A config dict stored by any sdtl, read through today's loader: keys added to sdtl since the run
    was made (``run.trackers``, ``task.*``) come back at their defaults, so comparing it with a config
    of today names only what really differs. A config this sdtl cannot read is returned as it is."""
    from sdtl.engine import config as cfgmod

    try:
        return cfgmod.to_dict(cfgmod.config_from_dict(dict(stored), kind=kind))
    except UserError:
        return stored


def check_same_config(run_dir: Path, cfg, purpose: str) -> None:
    """Refuse to reuse a run folder whose stored config is not what ``purpose`` would run.

    ``sdtl demo`` / ``sweep`` / ``compare`` reuse finished runs and resume unfinished ones; a folder
    made with other settings must never be mixed into their tables or continued with a new config.
    """
    import yaml

    from sdtl.engine import config as cfgmod

    stored_path = run_dir / "config.yaml"
    if not stored_path.exists():
        return
    stored = yaml.safe_load(stored_path.read_text()) or {}
    kind = stored.pop("kind", "finetune")
    changes = config_changes(as_read_today(stored, kind), cfgmod.to_dict(cfg))
    if changes:
        raise UserError(f"{run_dir}: this run was made with other settings ({'; '.join(changes[:4])}"
                        f"{' …' if len(changes) > 4 else ''}); its results cannot be reused for {purpose}. "
                        f"Nothing was changed: use another «out»")


def record_config_changes(cfg, state: dict, out_dir: Path, resume_path, info, logger) -> list[str]:
    """A resumed run's config is its identity: say how this resume changes it, and keep the record.

    Each change is warned and appended to ``OUT/config_changes.jsonl`` (one line per resume that
    changed something), so config.yaml never changes silently.
    """
    import json

    from sdtl.engine import config as cfgmod

    stored = as_read_today(state.get("config") or {}, state.get("sdtl_format") or kind_of(cfg))
    changed = config_changes(stored, cfgmod.to_dict(cfg))
    if changed and info.is_main:
        logger.warning("resuming %s with a config that differs from the checkpoint's: %s", resume_path,
                       "; ".join(changed))
        append_text(out_dir / "config_changes.jsonl",
                    json.dumps({"resumed_from": str(Path(resume_path).resolve()), "epoch": state.get("epoch"),
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changed}) + "\n")
    return changed


def run_in_process_group(cfg, body, out_dir, resume):
    """Validate, join the torchrun process group (if any), run ``body(cfg, out_dir, resume, info)``."""
    from sdtl.engine import config as cfgmod
    from sdtl.engine import distributed as dist_utils

    cfgmod.validate_ranges(cfg)
    info = dist_utils.setup(cfg.run.device)
    try:
        if not info.is_main:  # rank 0 holds the run directory for the whole process group
            return body(cfg, Path(out_dir), resume, info)
        check_writable(Path(out_dir))
        if not (Path(out_dir) / LOCK_NAME).exists():
            # Refuse a foreign folder before writing a lock file into it. A folder that has one is
            # judged under the lock (in start_run): "in use by PID ..." is the answer that matters then.
            resolve_resume(Path(out_dir), resume)
        created = not Path(out_dir).exists()
        try:
            with RunLock(out_dir, kind_of(cfg)), console_log_to(Path(out_dir) / "train.log"):
                return body(cfg, Path(out_dir), resume, info)
        except UserError:
            if created:
                remove_if_only_bookkeeping(Path(out_dir))  # bad input writes nothing
            raise
    finally:
        dist_utils.teardown()


def check_writable(out_dir: Path) -> None:
    """Refuse, before any work, an output folder sdtl cannot write into: a read-only filesystem, no
    permission, a path through a regular file. A folder that exists is tried for real (a temp file
    made and removed at once); one that does not is judged by its nearest existing parent."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"«out» {out_dir}: is a file, not a folder; choose another «out»")
    folders = [out_dir, out_dir / "checkpoints"] if out_dir.is_dir() else []
    if not folders:
        parent = out_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(f"«out» {out_dir}: cannot be made: {parent} is a file, not a folder; choose another «out»")
        if not os.access(parent, os.W_OK | os.X_OK):
            reason = "read-only filesystem" if _read_only(parent) else "permission denied"
            raise UserError(f"«out» {out_dir}: cannot be made: {parent} is not writable ({reason}); choose a "
                            f"folder you can write to")
        return
    for folder in folders:
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise UserError(f"«out» {out_dir}: {folder} is a file, not a folder; choose another «out»")
        try:
            fd, name = tempfile.mkstemp(prefix=".sdtl-write-check-", dir=folder)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            if is_no_space(exc):
                raise NoSpaceError(f"«out» {out_dir}: no space left on the device of {folder}, not even for an "
                                   f"empty file; free space there and run the same command again", path=folder) from exc
            raise UserError(f"«out» {out_dir}: cannot write into {folder} ({exc.strerror or exc}); choose a folder "
                            f"you can write to, or make it writable") from exc


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def remove_if_only_bookkeeping(out_dir: Path) -> None:
    """Remove a run folder this process created if it holds nothing but the lock and bookkeeping."""
    names = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    if names <= BOOKKEEPING and not (out_dir / "slurm").exists():  # a submitted job's folder stays
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
        out_dir.rmdir()


@contextlib.contextmanager
def console_log_to(path: Path):
    """Copy everything sdtl logs (the console's epoch lines, warnings, the final test) into ``path``,
    appended, so a resumed run's log continues the first one's."""
    handler = _RunLogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("sdtl")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


class _RunLogFile(logging.FileHandler):
    """``train.log``: on a full disk one warning on stderr, not a traceback per log line (the run itself
    stops at its next checkpoint or metrics write, which say what to do)."""

    _warned = False

    def handleError(self, record) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and is_no_space(exc):
            if not self._warned:
                self._warned = True
                print(f"sdtl: warning: {self.baseFilename}: no space left on the device; lines are missing from it",
                      file=sys.stderr)
            return
        super().handleError(record)

    def close(self) -> None:
        try:
            super().close()  # flushes what is buffered: may meet the full disk too
        except OSError as exc:
            if not is_no_space(exc):
                raise


def kind_of(cfg) -> str:
    return "pretrain" if hasattr(cfg, "task") else "finetune"
