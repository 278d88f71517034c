"""What happens to videos that cannot be decoded.

Training (the engine's loop, in the main process): :class:`VideoClipDataset` replaces an undecodable
video by another random one and reports it in the item's ``failed`` list; the loop passes every
batch's ``failed`` list to :meth:`CorruptVideoTracker.update`, which logs each file once, appends it
to ``OUT/quarantine.txt`` and stops the run when more than ``max_fraction`` of the samples seen failed.
One bad file never kills a run; a broken dataset does not train silently on its remaining 50 %.

Evaluation (the engine's evaluate path): a failed test video yields 0 clips; :func:`check_failures`
then refuses the test set, listing every undecodable video, unless the user explicitly skips them.
"""
from __future__ import annotations

import logging
from pathlib import Path

from sdtl.errors import DataError, RunFailed, UserError

log = logging.getLogger(__name__)


class TooManyCorruptVideos(RunFailed, UserError):
    """Too large a share of training samples failed to decode. A :class:`RunFailed` (exit code 1: the
    run stopped because of what it found) that ``except UserError`` handlers also catch."""

    exit_code = RunFailed.exit_code


class CorruptVideoTracker:
    """Counts, logs and quarantines videos that failed to decode during training.

    ``update(failed, num_samples)`` after every batch: ``failed`` is the batch's list of
    ``(path, reason)``; ``num_samples`` the number of samples the batch delivered. ``epoch_count`` is
    the failures of the current epoch (for the epoch metrics; :meth:`reset_epoch` at each epoch start).
    """

    def __init__(self, quarantine_path=None, max_fraction: float = 0.01, min_samples: int = 100):
        if not 0 <= max_fraction <= 1:
            raise UserError(f"max_fraction={max_fraction}: must be in [0, 1]")
        self.quarantine_path = Path(quarantine_path) if quarantine_path is not None else None
        self.max_fraction = max_fraction
        # With few samples seen, one bad file is already > 1 %; judge the share once it means something.
        self.min_samples = min_samples
        self.seen: dict[str, str] = {}  # path -> first error, each file reported once
        self.total_failures = 0
        self.total_samples = 0
        self.epoch_count = 0
        if self.quarantine_path is not None and self.quarantine_path.is_file():
            # A resumed run: files quarantined before are not logged again.
            for line in self.quarantine_path.read_text(encoding="utf-8", errors="replace").splitlines():
                path, _, reason = line.partition("\t")
                if path:
                    self.seen.setdefault(path, reason)

    def update(self, failed, num_samples: int) -> None:
        """Record one batch; raises :class:`TooManyCorruptVideos` when the failing share is too high."""
        failed = list(failed or [])
        self.total_samples += int(num_samples) + len(failed)  # each failure was an attempted sample too
        self.total_failures += len(failed)
        self.epoch_count += len(failed)
        new = []
        for path, reason in failed:
            path = str(path)
            if path not in self.seen:
                self.seen[path] = str(reason)
                new.append((path, str(reason)))
                log.warning("cannot decode %s (%s); replaced by another video, listed in %s", path, reason,
                            self.quarantine_path or "the run report")
        if new and self.quarantine_path is not None:
            self.quarantine_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.quarantine_path, "a", encoding="utf-8") as f:
                for path, reason in new:
                    f.write(f"{path}\t{' '.join(reason.split())}\n")
        self.check(force=False)

    def check(self, force: bool = True) -> None:
        """Raise if the failing share exceeds ``max_fraction``; ``force`` ignores ``min_samples``
        (call it at the end of each epoch so a small dataset is judged too)."""
        share = self.total_failures / max(self.total_samples, 1)
        if self.total_failures and share > self.max_fraction and (force or self.total_samples >= self.min_samples):
            raise TooManyCorruptVideos(self.report())

    def report(self) -> str:
        share = self.total_failures / max(self.total_samples, 1)
        names = ", ".join(list(self.seen)[:5]) + (", ..." if len(self.seen) > 5 else "")
        where = f" (all listed in {self.quarantine_path})" if self.quarantine_path else ""
        return (f"{self.total_failures} of {self.total_samples} training samples ({share:.1%}) failed to decode, "
                f"more than the allowed {self.max_fraction:.1%}; {len(self.seen)} distinct files{where}: {names}. "
                f"Run `sdtl data check --decode` to list every corrupt video, then re-encode or remove them "
                f"(or raise data.max_corrupt_fraction)")

    def reset_epoch(self) -> None:
        self.epoch_count = 0

    @property
    def num_files(self) -> int:
        return len(self.seen)


def check_failures(failed, skip: bool = False) -> int:
    """Refuse an evaluation with undecodable test videos (listing ALL of them) unless ``skip``.

    ``failed``: the concatenated ``failed`` lists of the test loader. Returns the number of distinct
    videos skipped (0 if none) so the report can say so.
    """
    distinct: dict[str, str] = {}
    for path, reason in failed or []:
        distinct.setdefault(str(path), str(reason))
    if distinct and not skip:
        listing = "; ".join(f"{p}: {r}" for p, r in distinct.items())
        raise DataError(f"{len(distinct)} test videos cannot be decoded, so the test set is incomplete and "
                        f"its accuracy would not be comparable: {listing}. Fix or remove them, or set "
                        f"eval.skip_corrupt=true to evaluate without them", path=next(iter(distinct)))
    if distinct:
        log.warning("%d undecodable test videos skipped (eval.skip_corrupt)", len(distinct))
    return len(distinct)
