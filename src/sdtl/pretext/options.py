"""Each pretext task's options: the keys of the config's ``task`` section it reads, with their
defaults; each checks itself (a :class:`~sdtl.errors.ConfigError` naming ``task.<key>``) and says in
one line what it runs. The field names *are* the config keys (``task.<field>``).

Torch-free: the config reads them (``sdtl --help`` must not pay torch's import time).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sdtl.errors import ConfigError


def need(cond: bool, key: str, rule: str, value) -> None:
    """Raise ``ConfigError("task.<key>", "<rule> (got <value>)")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"task.{key}", f"{rule} (got {value!r})")


@dataclass
class PretextOptions:
    """Base class: subclasses declare their keys as fields and override :meth:`check` and :meth:`describe`."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Range checks of this task's keys (raise with :func:`need`)."""

    def describe(self) -> str:
        """The task and its settings in one line, for the run's log."""
        raise NotImplementedError


@dataclass
class SpeedOptions(PretextOptions):
    strides: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # the stride classes

    def check(self) -> None:
        s = self.strides
        need(bool(s) and all(isinstance(x, int) and x >= 1 for x in s) and len(set(s)) == len(s), "strides",
             "must be distinct integers >= 1, e.g. [1, 2, 4, 8]", s)

    def describe(self) -> str:
        return f"speed {self.strides}"


@dataclass
class RSPNetOptions(PretextOptions):
    queue_size: int = 16384  # negative keys (trimmed to a multiple of the global batch)
    key_momentum: float = 0.999  # EMA of the key network
    temperature: float = 0.07  # of both heads' similarities
    embed_dim: int = 128  # output of each head (A-VID, RSP)
    margin: float = 2.0  # of the RSP ranking loss, on similarities / temperature
    avid_weight: float = 1.0  # weight of the A-VID loss (appearance)
    rsp_weight: float = 1.0  # weight of the RSP loss (relative speed)

    def check(self) -> None:
        need(self.queue_size >= 1, "queue_size", "must be >= 1 (and at least one global batch)", self.queue_size)
        need(0 <= self.key_momentum < 1, "key_momentum", "must be in [0, 1); RSPNet uses 0.999", self.key_momentum)
        need(self.temperature > 0, "temperature", "must be > 0; RSPNet uses 0.07", self.temperature)
        need(self.embed_dim >= 1, "embed_dim", "must be >= 1; RSPNet uses 128", self.embed_dim)
        need(self.margin >= 0, "margin", "must be >= 0; RSPNet uses 2.0", self.margin)
        need(self.avid_weight >= 0, "avid_weight", "must be >= 0", self.avid_weight)
        need(self.rsp_weight >= 0, "rsp_weight", "must be >= 0", self.rsp_weight)
        need(self.avid_weight + self.rsp_weight > 0, "rsp_weight",
             "task.avid_weight and task.rsp_weight are both 0", self.rsp_weight)

    def describe(self, queue: int | None = None, clip_len: int | None = None) -> str:
        """``queue``: the queue as built (trimmed to a multiple of the global batch); ``clip_len``: frames."""
        frames = f"; {2 * clip_len}-frame windows -> {clip_len}-frame clips at 1x / 2x" if clip_len else ""
        return (f"rspnet (queue {queue if queue is not None else self.queue_size}, momentum {self.key_momentum}, "
                f"τ {self.temperature}, margin {self.margin}, weights A-VID {self.avid_weight} / RSP "
                f"{self.rsp_weight}{frames})")
