"""Experiment trackers: the run's config, its per-epoch metrics and its plots in MLflow or Weights & Biases.

``run.trackers`` names where a run's metrics go besides ``OUT/metrics.jsonl``: ``tensorboard`` (the
default; :class:`sdtl.engine.reporting.RunLog` writes ``OUT/tb``), ``mlflow`` and ``wandb``. The last
two are optional extras (``pip install 'sdtl[mlflow]'`` / ``'sdtl[wandb]'``), imported only when a run
names them; one that is named but not installed is a :class:`~sdtl.errors.ConfigError` before any work
(:func:`check_installed`).

Each tracker receives, from rank 0 only:

* at the start, the whole config as parameters (dotted keys: ``optim.lr``, ``regularizer.weight``);
* after each epoch (a loop call-out placed after the checkpoint is written), every number of the
  epoch's record in ``metrics.jsonl``, with the epoch as the step (fine-tuning's epoch 0: the
  forgetting diagnostics at the start);
* at the end of a run that finished, ``curves.png``, ``confusion.png`` and ``results.json`` (those that
  exist) as artifacts; the tracker run then ends ``FINISHED`` (``KILLED`` on a stop request or a
  tuner's pruning, ``FAILED`` on an error).

``OUT/trackers.json`` keeps, per tracker, its run id and the last epoch it was sent. ``--resume``
continues the same tracker run (MLflow: the same run id; W&B: ``id=…, resume="allow"``) and sends only
the epochs after that one: none twice, and the epochs a killed process had not sent yet (or a
failing tracker missed) are sent then. A tracker pointed elsewhere on resume (another ``run.mlflow_uri``,
experiment, W&B project or mode) starts a new run there and receives the whole history.

A tracker that fails (an unreachable server, a store it cannot write) warns once and is off for the rest
of the process; training never stops for it.

``run.mlflow_uri`` ``""``: ``$MLFLOW_TRACKING_URI`` when set, else a SQLite store in the run folder
(``OUT/mlflow.db``, artifacts under ``OUT/mlartifacts``; ``mlflow ui --backend-store-uri
sqlite:///OUT/mlflow.db`` shows it). ``run.wandb_mode`` ``auto``: ``$WANDB_MODE`` when set, ``online``
when ``$WANDB_API_KEY`` is set, else ``offline`` (the run lands under ``OUT/wandb``; ``wandb sync``
uploads it later).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path

from sdtl.atomic import atomic_write_text
from sdtl.engine.callbacks import Callback
from sdtl.errors import ConfigError, RunInterrupted

log = logging.getLogger("sdtl.trackers")

STATE_FILE = "trackers.json"
#: what each tracker's end of run uploads, when the run wrote it
ARTIFACTS = ("curves.png", "confusion.png", "results.json")
#: trackers of optional extras: tracker name -> the module it needs (the extra has the tracker's name)
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}


def tensorboard_enabled(cfg) -> bool:
    """TensorBoard events in ``OUT/tb``: ``tensorboard`` in ``run.trackers`` and ``run.tensorboard`` not
    turned off (the older switch, kept so that recipes saying ``tensorboard: false`` keep working)."""
    return "tensorboard" in cfg.run.trackers and bool(cfg.run.tensorboard)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None  # finds it without importing it
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (import blocked)
        return False


def check_installed(cfg) -> None:
    """Refuse, before any work, a tracker that ``run.trackers`` names but that is not installed."""
    for name in cfg.run.trackers:
        module = EXTRAS.get(name)
        if module is not None and not _installed(module):
            raise ConfigError("run.trackers", f"{name} is named but the {module} package is not installed",
                              f"pip install 'sdtl[{name}]', or leave {name} out of run.trackers")


def flat_params(cfg) -> dict[str, str]:
    """The whole config as ``{"optim.lr": "0.05", ...}`` (lists and None as Python writes them)."""
    from sdtl.engine import config as cfgmod

    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = str(value)

    walk(cfgmod.to_dict(cfg), "")
    return out


def numeric_metrics(record: dict) -> dict[str, float]:
    """The numbers of an epoch record (what TensorBoard gets too): finite, not booleans, not the epoch."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _end_status(exc: BaseException | None) -> tuple[str, int]:
    """(MLflow run status, exit code for W&B) of a run that ended with ``exc``."""
    if exc is None:
        return "FINISHED", 0
    if isinstance(exc, RunInterrupted):
        return "KILLED", exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", 130
    if type(exc).__name__ == "TrialPruned":  # a tuner stopped the trial early (Optuna): not a crash
        return "KILLED", 0
    return "FAILED", int(getattr(exc, "exit_code", 1) or 1)


# ------------------------------------------------------------------------------------ trackers
class Tracker:
    """One external tracker. Every method may raise: :class:`Tracking` turns that into one warning."""

    name = ""

    def target(self) -> dict:
        """Where this tracker's runs go (stored in trackers.json: a resume elsewhere starts a new run)."""
        raise NotImplementedError

    def start(self, run_id: str | None, params: dict[str, str], run_name: str, kind: str) -> tuple[str, bool]:
        """Start a new run, or continue ``run_id``: ``(run id, whether run_id was continued)``."""
        raise NotImplementedError

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_artifacts(self, paths: list[Path], out_dir: Path) -> None:
        raise NotImplementedError

    def end(self, exc: BaseException | None) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """After a failure: release what the tracker holds without talking to its server again."""

    def describe(self) -> str:
        return self.name


class MLflowTracker(Tracker):
    """MLflow through its client API (no global active run): params, metrics with the epoch as step,
    artifacts, and the run's status."""

    name = "mlflow"
    MAX_PARAM = 500  # characters of a param value every MLflow store accepts
    BATCH = 100  # params per log_batch request (MLflow's limit; 1000 for metrics)

    def __init__(self, cfg, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.configured = cfg.run.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        self.experiment = cfg.run.mlflow_experiment
        self.uri = self.configured or f"sqlite:///{(self.out_dir / 'mlflow.db').resolve()}"
        self.client = None
        self.run_id: str | None = None

    def target(self) -> dict:
        return {"uri": self.configured, "experiment": self.experiment}

    def describe(self) -> str:
        return f"mlflow run {self.run_id} (experiment {self.experiment!r}) at {self.uri}"

    def start(self, run_id, params, run_name, kind):
        import mlflow  # noqa: F401 - the optional extra, imported only here
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # "Creating initial tables ..."
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        existing = None
        if run_id:
            try:
                existing = client.get_run(run_id)
            except MlflowException as exc:
                log.warning("mlflow: run %s is not in %s (%s); starting a new run there with the whole history",
                            run_id, self.uri, str(exc).splitlines()[0])
        if existing is not None:
            self.run_id = run_id
            client.update_run(run_id, status="RUNNING")
            old = existing.data.params
            new = {k: v for k, v in self._params(params).items() if k not in old}
            changed = [f"{k}: {old[k]} -> {v}" for k, v in self._params(params).items() if k in old and old[k] != v]
            if changed:  # MLflow params cannot change: what a resume changed is a tag
                client.set_tag(run_id, "sdtl.config_changes", "; ".join(changed)[:5000])
            self._log_params(new)
            return run_id, True
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            location = None if self.configured else (self.out_dir / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(self.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={"sdtl.kind": kind, "sdtl.run_dir": str(self.out_dir.resolve())})
        self.run_id = run.info.run_id
        self._log_params(self._params(params))
        return self.run_id, False

    def _params(self, params: dict[str, str]) -> dict[str, str]:
        cut = self.MAX_PARAM
        return {k: v if len(v) <= cut else v[: cut - 1] + "…" for k, v in params.items()}

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), self.BATCH):
            self.client.log_batch(self.run_id, params=items[i: i + self.BATCH])

    def log_epoch(self, epoch, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, epoch) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i: i + 1000])

    def log_artifacts(self, paths, out_dir):
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def end(self, exc):
        self.client.set_terminated(self.run_id, status=_end_status(exc)[0])


class WandbTracker(Tracker):
    """Weights & Biases: ``wandb.init(dir=OUT)`` (so the run's files are under ``OUT/wandb``), offline
    unless configured; the config as flat dotted keys, ``run.log(..., step=epoch)``, the artifacts
    copied into the run's files."""

    name = "wandb"

    def __init__(self, cfg, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.project = cfg.run.wandb_project
        self.mode = self.resolve_mode(cfg.run.wandb_mode)
        # $WANDB_MODE is left for wandb itself to read (it knows its aliases)
        self.init_mode = None if cfg.run.wandb_mode == "auto" and os.environ.get("WANDB_MODE") else self.mode
        self.run = None

    @staticmethod
    def resolve_mode(mode: str) -> str:
        """``auto``: ``$WANDB_MODE`` when set, ``online`` with ``$WANDB_API_KEY``, else ``offline``."""
        if mode != "auto":
            return mode
        if os.environ.get("WANDB_MODE"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"

    def target(self) -> dict:
        return {"project": self.project, "mode": self.mode}

    def describe(self) -> str:
        where = f"under {self.out_dir / 'wandb'} (upload it with `wandb sync`)" if self.mode == "offline" else \
            f"in project {self.project!r}"
        return f"wandb {self.mode} run {self.run.id if self.run is not None else '?'} {where}"

    def start(self, run_id, params, run_name, kind):
        import wandb  # the optional extra, imported only here

        new_id = run_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=self.project, dir=str(self.out_dir), mode=self.init_mode, id=new_id,
                              resume="allow", name=run_name, job_type=kind,
                              settings=wandb.Settings(console="off", disable_git=True, silent=True))
        self.run.config.update(params, allow_val_change=True)
        return self.run.id, run_id is not None

    def log_epoch(self, epoch, metrics):
        self.run.log(metrics, step=epoch)

    def log_artifacts(self, paths, out_dir):
        # The run's files folder is uploaded with the run (at its end online; by `wandb sync` offline).
        for path in paths:
            shutil.copyfile(path, Path(self.run.dir) / path.name)

    def end(self, exc):
        run, self.run = self.run, None
        run.finish(exit_code=_end_status(exc)[1])

    def abandon(self):
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=1)


TRACKER_CLASSES = {"mlflow": MLflowTracker, "wandb": WandbTracker}


# ------------------------------------------------------------------------------- the call-out
class Tracking(Callback):
    """The loop call-out that feeds the external trackers.

    Build it with :meth:`open` once the run's history is known; put it after the checkpoint call-out;
    run the training and the final test inside :meth:`session`. On ranks other than 0, or without
    mlflow / wandb in ``run.trackers``, it does nothing.
    """

    # no state in the checkpoint (state_dict None): trackers.json holds it

    def __init__(self, out_dir: Path, trackers: list[Tracker] | None = None, entries: dict | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.trackers = list(trackers or [])
        self.entries = dict(entries or {})  # trackers.json: name -> {run_id, target, logged_epoch}
        self._state_warned = False

    @classmethod
    def open(cls, cfg, out_dir: Path, info, history: list[dict], kind: str) -> Tracking:
        """Start (or, after a resume, continue) a run in each external tracker and send it the epochs of
        ``history`` it has not had yet."""
        names = [n for n in cfg.run.trackers if n in TRACKER_CLASSES]
        if not (info.is_main and names):
            return cls(out_dir)
        self = cls(out_dir, entries=_read_state(Path(out_dir) / STATE_FILE))
        params = flat_params(cfg)
        for name in names:
            tracker = TRACKER_CLASSES[name](cfg, out_dir)
            entry = self.entries.get(name) or {}
            same = entry.get("target") == tracker.target() and entry.get("run_id")
            try:
                run_id, continued = tracker.start(entry["run_id"] if same else None, params, Path(out_dir).name, kind)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self._failed(tracker, "start its run", exc)
                continue
            logged = int(entry.get("logged_epoch", -1)) if same and continued else -1
            self.entries[name] = {"run_id": run_id, "target": tracker.target(), "logged_epoch": logged}
            self.trackers.append(tracker)
            log.info("tracking: %s%s", tracker.describe(), " (continued)" if continued else "")
        self._write_state()
        self.send(history)
        return self

    def on_epoch_end(self, loop, record: dict) -> None:
        self.send(loop.state.history)  # the history holds this epoch's record (the run log appended it)

    # -- what it does
    def send(self, history: list[dict]) -> None:
        """Every epoch of ``history`` after the last one each tracker was sent (none twice)."""
        if not self.trackers:
            return
        for tracker in list(self.trackers):
            entry = self.entries[tracker.name]
            for record in history:
                epoch = record.get("epoch")
                if not isinstance(epoch, int) or epoch <= entry["logged_epoch"]:
                    continue
                try:
                    tracker.log_epoch(epoch, numeric_metrics(record))
                except Exception as exc:  # noqa: BLE001
                    self._failed(tracker, f"log epoch {epoch}", exc)
                    break
                entry["logged_epoch"] = epoch
        self._write_state()

    @contextlib.contextmanager
    def session(self):
        """Around training and the final test: each tracker run ends FINISHED with the artifacts when the
        block completes, KILLED on a stop request (RunInterrupted), FAILED on any other error."""
        try:
            yield self
        except BaseException as exc:
            self.end(exc)
            raise
        self.end(None)

    def end(self, exc: BaseException | None) -> None:
        paths = [self.out_dir / name for name in ARTIFACTS if (self.out_dir / name).is_file()] if exc is None else []
        for tracker in list(self.trackers):
            try:
                if paths:
                    tracker.log_artifacts(paths, self.out_dir)
                tracker.end(exc)
            except Exception as failure:  # noqa: BLE001
                self._failed(tracker, "upload the artifacts and end its run" if paths else "end its run", failure)
        self.trackers = []

    def _failed(self, tracker: Tracker, what: str, exc: Exception) -> None:
        """One warning per tracker; it is off for the rest of this process (a resume sends what it missed)."""
        if tracker in self.trackers:
            self.trackers.remove(tracker)
        try:
            tracker.abandon()
        except Exception as again:  # noqa: BLE001 - already warned about this tracker
            log.debug("tracker %s: releasing it failed too: %r", tracker.name, again)
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        log.warning("tracker %s could not %s (%s%s); it is off for the rest of this run, training goes on "
                    "(epochs it missed are sent if the run is resumed and it works then)", tracker.name, what,
                    type(exc).__name__, f": {detail}" if detail else "")

    def _write_state(self) -> None:
        if not self.entries:
            return
        try:
            atomic_write_text(self.out_dir / STATE_FILE, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        except Exception as exc:  # noqa: BLE001 - the next checkpoint or metrics write says if the disk is full
            if not self._state_warned:
                self._state_warned = True
                log.warning("%s: could not be written (%s); a resume may send some epochs again",
                            self.out_dir / STATE_FILE, exc)


def _read_state(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); the trackers start new runs", path, exc)
        return {}
    return data if isinstance(data, dict) else {}
