"""Run folders: which checkpoint a run resumes from, never overwriting what sdtl did not write, the
config identity of a run (and how a resume changes it), the process-group entry and the run log file.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from sdtl.engine.runlock import LOCK_NAME, RunLock
from sdtl.engine.runtime import amp_dtype, configure_determinism
from sdtl.errors import UserError


# What sdtl writes into a run folder before its config.yaml: none of it makes a folder a run.
BOOKKEEPING = frozenset({LOCK_NAME, "train.log", "video_index.jsonl"})


def resolve_resume(out_dir: Path, resume: str | None, is_main: bool = True) -> Path | None:
    """Decide which checkpoint to resume from, refusing to touch an existing run unasked.

    ``resume=None``: ``out_dir`` must not hold a run (or anything else). ``"auto"``: resume from
    ``out_dir/checkpoints/last.pt`` when it exists, else start fresh. A path: that checkpoint.
    With a resume, ``out_dir`` must be new, empty, or a run folder (it has config.yaml or last.pt).
    """
    last = out_dir / "checkpoints" / "last.pt"
    # Only rank 0 judges the folder: by the time another rank looks, rank 0 may have written in it.
    content = sorted(p.name for p in out_dir.iterdir() if p.name not in BOOKKEEPING) \
        if is_main and out_dir.is_dir() else []
    if resume is None:
        if content:
            what = "a run" if (out_dir / "config.yaml").exists() or last.exists() else "files"
            raise UserError(f"--out {out_dir}: already holds {what}; pass --resume auto to continue it, "
                            f"or choose a new --out directory")
        return None
    if content and not (out_dir / "config.yaml").exists() and not last.exists():
        # --resume continues a run; it must not write config.yaml, metrics.jsonl, results.json ...
        # over the files of a folder that holds none.
        raise UserError(f"--out {out_dir}: holds files but no sdtl run ({', '.join(content[:3])}"
                        f"{', ...' if len(content) > 3 else ''}); --resume continues a run in its own "
                        f"folder: choose a new --out directory")
    if resume == "auto":
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"--resume {resume}: no such checkpoint file; pass --resume auto or a path "
                        f"to a last.pt / best.pt written by sdtl")
    return path


def start_run(cfg, out_dir: Path, resume: str | None, info, kind: str) -> tuple[Path | None, dict | None]:
    """Checks shared by every run before any work: determinism, AMP, and which checkpoint to resume
    (returned in today's layout, whatever version wrote it: :func:`sdtl.engine.state.read_checkpoint`)."""
    from sdtl.engine.state import read_checkpoint
    from sdtl.models.checkpoints import safe_load

    configure_determinism(cfg.run.deterministic, cfg.run.threads, cfg.run.cudnn_benchmark)
    amp_dtype(cfg.optim.amp, info.device)  # fail early: bf16 on a card without it
    resume_path = resolve_resume(out_dir, resume, info.is_main)
    payload = safe_load(resume_path) if resume_path else None
    if payload is not None and payload.get("sdtl_format") != kind:
        raise UserError(f"--resume {resume_path}: not an sdtl {kind} checkpoint (format "
                        f"{payload.get('sdtl_format')!r}); pass checkpoints/last.pt of a {kind} run")
    return resume_path, (None if payload is None else read_checkpoint(payload)[1])


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``["optim.epochs: 30 -> 100", ...]`` for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_changes(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


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
    try:  # through the loader, so keys added to sdtl since the run was made compare at their defaults
        stored = cfgmod.to_dict(cfgmod.config_from_dict(stored, kind=kind))
    except UserError:
        pass  # a config this sdtl cannot read differs anyway: compared raw below
    changes = config_changes(stored, cfgmod.to_dict(cfg))
    if changes:
        raise UserError(f"{run_dir}: this run was made with other settings ({'; '.join(changes[:4])}"
                        f"{' …' if len(changes) > 4 else ''}); its results cannot be reused for {purpose}. "
                        f"Nothing was changed: use a new --out")


def record_config_changes(cfg, state: dict, out_dir: Path, resume_path, info, logger) -> list[str]:
    """A resumed run's config is its identity: say how this resume changes it, and keep the record.

    Each change is warned and appended to ``OUT/config_changes.jsonl`` (one line per resume that
    changed something), so config.yaml never changes silently.
    """
    import json

    from sdtl.engine import config as cfgmod

    changed = config_changes(state.get("config") or {}, cfgmod.to_dict(cfg))
    if changed and info.is_main:
        logger.warning("resuming %s with a config that differs from the checkpoint's: %s", resume_path,
                       "; ".join(changed))
        with open(out_dir / "config_changes.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"resumed_from": str(Path(resume_path).resolve()), "epoch": state.get("epoch"),
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


def remove_if_only_bookkeeping(out_dir: Path) -> None:
    """Remove a run folder this process created if it holds nothing but the lock and bookkeeping."""
    names = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    if names <= BOOKKEEPING:
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
        out_dir.rmdir()


@contextlib.contextmanager
def console_log_to(path: Path):
    """Copy everything sdtl logs (the console's epoch lines, warnings, the final test) into ``path``,
    appended, so a resumed run's log continues the first one's."""
    import logging

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("sdtl")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def kind_of(cfg) -> str:
    return "pretrain" if hasattr(cfg, "task") else "finetune"
