"""What a run leaves behind for people: metrics.jsonl, TensorBoard events, curves.png.

One JSON line per epoch in ``OUT/metrics.jsonl`` (train loss parts, throughput, data-wait share,
validation metrics, forgetting diagnostics); the same scalars in TensorBoard under ``OUT/tb``; and
``OUT/curves.png`` redrawn at most every 20 s and when the run ends. On resume the history stored in the checkpoint is the
source of truth and metrics.jsonl is rewritten from it, so a run killed between writing a line and
writing its checkpoint never shows an epoch twice, and a line torn by a crash in the middle of its
append is dropped (with a warning) instead of breaking every reader of the file.

A full disk: a ``metrics.jsonl`` line or TensorBoard events that cannot be written stop the run
(:class:`~sdtl.errors.NoSpaceError`, the failed append cut back so no partial line is left). A
``curves.png`` that cannot be written only warns and the run goes on (:func:`sdtl.atomic.atomic_savefig`):
the figure is redrawn from the history at the next redraw and at the end, so nothing is lost, and
training does not stop for a picture (the next checkpoint or metrics write stops it cleanly if the
disk stays full).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from sdtl.atomic import append_text, atomic_savefig, atomic_write_text, is_no_space, no_space_error
from sdtl.regularizers.registry import metric_parts

log = logging.getLogger("sdtl.report")


class RunLog:
    PLOT_EVERY_S = 20.0

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, history: list[dict] | None = None) -> None:
        self.out_dir = out_dir
        self.enabled = enabled
        self.history: list[dict] = list(history or [])
        self.writer = None
        self._plotted = time.monotonic()  # first redraw after PLOT_EVERY_S; close() always draws
        if not enabled:
            return
        self._check_existing()
        self._rewrite()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint.
            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=(self.history[-1]["epoch"] + 1) if self.history else 0)

    def _check_existing(self) -> None:
        """Say what of an existing metrics.jsonl the rewrite from the checkpoint's history drops: a torn
        line (a crash in the middle of an append), epochs logged after the checkpoint was written."""
        path = self.out_dir / "metrics.jsonl"
        try:
            data = path.read_bytes()
        except OSError:
            return
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: what follows the last newline ("" when none)
        torn = []
        for number, line in enumerate(complete + ([tail] if tail.strip() else []), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError:
                torn.append(number)
        known = {r.get("epoch") for r in self.history}
        logged = []
        for line in complete:
            try:
                logged.append(json.loads(line).get("epoch"))
            except (ValueError, AttributeError):
                pass
        after = sorted({e for e in logged if e not in known and isinstance(e, int)})
        kept = f"epochs {self.history[0]['epoch']}-{self.history[-1]['epoch']}" if self.history else "no epoch yet"
        if torn:
            log.warning("%s: line %s is incomplete or not JSON (the run stopped while writing it); it is dropped "
                        "and the file is rewritten from the checkpoint's history (%s)", path,
                        ", ".join(map(str, torn)), kept)
        if after:
            log.info("%s: epoch(s) %s were logged after the checkpoint this run resumes from; they are trained "
                     "and logged again", path, ", ".join(map(str, after)))

    def _rewrite(self) -> None:
        atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def log_epoch(self, record: dict) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        append_text(self.out_dir / "metrics.jsonl", json.dumps(record) + "\n")  # a full disk: NoSpaceError
        if self.writer is not None:
            step = record["epoch"]
            try:
                for key, value in record.items():
                    if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                            and math.isfinite(value):
                        self.writer.add_scalar(key.replace("_", "/", 1), value, step)
                self.writer.flush()
            except Exception as exc:
                if is_no_space(exc):
                    raise no_space_error(self.out_dir / "tb", exc) from exc
                raise
        # Redrawing costs ~0.4 s (a quarter of an epoch on the demo): at most every PLOT_EVERY_S seconds.
        if time.monotonic() - self._plotted >= self.PLOT_EVERY_S:
            self._plot()

    def _plot(self) -> None:
        plot_curves(self.history, self.out_dir / "curves.png")  # a full disk: a warning (atomic_savefig)
        self._plotted = time.monotonic()

    def close(self) -> None:
        """Draw the curves and close TensorBoard; never raises for a full disk (it runs in ``finally``
        blocks, where it would hide the error that stopped the run)."""
        if self.enabled and self.history:
            self._plot()
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as exc:
                if not is_no_space(exc):
                    raise
                log.warning("%s: no space left on the device; the last TensorBoard events may be missing",
                            self.out_dir / "tb")


def plot_curves(history: list[dict], path: Path) -> None:
    if not history or not any(_is_number(v) for r in history for k, v in r.items() if k != "epoch"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    # (title, y-axis label, keys, fixed y range): accuracies keep 0-100 so that a few points of
    # change do not look like a collapse
    panels = [
        ("training loss", "loss (mean per step)", ["train_loss", "train_ce", *metric_parts()], None),
        ("pretext accuracy (%)", "accuracy (%)", ["train_acc"], (0, 100)),  # pre-training runs
        ("validation accuracy (%)", "accuracy (%)", ["val_video_acc1", "val_clip_acc1"], (0, 100)),
        ("forgetting (relative drift)", "relative drift (0 = unchanged)", ["feat_drift", "epoch_drift", "param_drift"],
         None),
        ("pre-trained skill kept (%)", "retention accuracy (%)", ["retention_acc"], (0, 100)),
        ("learning rate", "learning rate", ["lr"], None),
    ]
    series = {key: [(e, r[key]) for e, r in zip(epochs, history) if _is_number(r.get(key))]
              for _, _, keys, _ in panels for key in keys}
    panels = [(title, ylabel, [k for k in keys if series[k]], ylim) for title, ylabel, keys, ylim in panels]
    panels = [panel for panel in panels if panel[2]]  # every panel drawn has data
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, ylabel, keys, ylim) in zip(axes[0], panels):
        for key in keys:
            ax.plot(*zip(*series[key]), marker="o", ms=3, label=key)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
