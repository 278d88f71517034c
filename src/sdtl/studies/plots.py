"""Plot helpers shared by the studies' figures (summary.png, sweep.png, compare.png, wise.png, ...).

matplotlib is imported on first use (with the Agg backend: no display needed), never at import time.
"""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Write ``fig`` atomically (a crash leaves the old file or the new one) and close it."""
    from sdtl.atomic import atomic_savefig

    atomic_savefig(fig, path, dpi=110)
    pyplot().close(fig)


def chance_line(ax, num_classes: int | None, label: str = "chance", **style) -> float | None:
    """A dashed line at chance accuracy, 100 / ``num_classes`` %; nothing when the count is unknown."""
    if not num_classes:
        return None
    chance = 100.0 / num_classes
    ax.axhline(chance, **{"color": "grey", "ls": "--", "lw": 1, **style}, label=label)
    return chance
