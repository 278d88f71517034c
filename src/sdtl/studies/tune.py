"""``sdtl tune``: search config keys (λ, the learning rate ...) with Optuna, pruning trials that fall
behind on validation, with one or many workers sharing one study.

    sdtl tune --config ucf101_r21d_sd --space regularizer.weight=log:0.01:1000 --space optim.lr=log:0.001:0.1 \\
              --trials 40 --out tunes/lambda --set data.root=/data/UCF101

* ``--space KEY=SPEC``: ``log:LOW:HIGH`` (log-uniform float), ``float:LOW:HIGH``, ``int:LOW:HIGH``,
  ``choice:A,B,C`` (values read as ``--set`` reads them). Before any trial, the recipe with every
  corner of the space (each key at its low and high end, each choice) is loaded and validated like
  ``--set``: a bad key, a bad range or a value the config refuses is an error before any work. Each
  sampled config is validated again before its trial starts.
* **Objective**: the validation video acc@1 of the epoch each trial's run selected (what ``sweep``
  reports as *val*); test accuracy is recorded beside it and never chooses.
* **Sampler**: TPE, seeded (``--seed``; each worker adds the number of trials it found in the study).
  **Pruning** on each epoch's validation acc@1: ``--pruner hyperband`` (default; min 1 epoch, max the
  recipe's epochs, reduction factor 3), ``sha`` (successive halving), ``median`` or ``none``. A pruned
  trial stops right after the epoch that decided it (its record and checkpoint are written first).
* **Trials** are ordinary run folders, ``OUT/trials/NNNN`` (``evaluate``, ``inspect``, ``--resume``
  understand them). Workers send heartbeats to the study; a trial whose worker died (a crash, kill
  -9) is marked failed when its heartbeat is ``3 x --heartbeat`` seconds old and re-queued with the
  same parameters; the worker that takes it resumes the *same* run folder from its last checkpoint.
  ``--trials N`` counts finished (complete or pruned), running and re-queued trials, so a retried
  trial is never counted twice; a worker leaves once N are finished (it waits for running ones that
  could still fail and need a retry). With several workers a race can start up to one extra trial.
* **Storage**: ``OUT/tune.db`` (SQLite, nothing to start) by default; ``--storage journal:PATH``
  (Optuna's journal file, for a shared filesystem); or any SQLAlchemy URL, e.g.
  ``postgresql://user@host:5432/db``, so that workers on many machines share one study. Starting
  ``sdtl tune`` again with the same ``--out`` / ``--storage`` / ``--study`` adds a worker (or
  continues a stopped study); the study records its config, space and objective, and a worker with
  other ones is refused.
* **Outputs** (written by each worker when it leaves, atomically, from the study's state):
  ``tune.json``, ``tune.md`` (every trial: parameters, state, epochs run, validation, test; the best
  on validation with its test beside it), ``tune.png`` (optimisation history; the objective against
  each parameter) and ``best.yaml``, the best trial's full config: ``sdtl finetune --config
  OUT/best.yaml --out RUN`` runs it as is.

Trials run one at a time in each worker process (one process per trial; start more workers for more
at a time). Optuna is an optional extra (``pip install 'sdtl[tune]'``), imported only by this command.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdtl.errors import RunInterrupted, UserError
from sdtl.studies import core

log = logging.getLogger("sdtl.tune")

MARKER = "tune_study.json"
OBJECTIVE = "val_video_acc1"
KINDS = ("log", "float", "int", "choice")
PRUNERS = ("hyperband", "sha", "median", "none")


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("sdtl tune needs Optuna: pip install 'sdtl[tune]' (or pip install optuna)") from None
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the retry bookkeeping (RetryFailedTrialCallback.retried_trial_number) is marked experimental
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ------------------------------------------------------------------------------------- the space
@dataclass
class Param:
    key: str
    kind: str  # log | float | int | choice
    low: float | int | None = None
    high: float | int | None = None
    choices: list[str] = field(default_factory=list)

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.kind == "log")

    def corners(self) -> list:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def describe(self) -> str:
        return f"{self.kind}:{','.join(self.choices)}" if self.kind == "choice" else f"{self.kind}:{self.low}:{self.high}"


def as_set(key: str, value) -> str:
    """``key=value`` for ``--set``: floats in full precision (repr), choices as typed."""
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def parse_space(items: list[str]) -> list[Param]:
    """``["regularizer.weight=log:0.01:100", "optim.name=choice:sgd,adamw"]`` -> params, or a UserError."""
    from sdtl.engine.config import is_config_key
    from sdtl.studies.sweep import split_values

    if not items:
        raise UserError("sdtl tune needs at least one --space KEY=SPEC, e.g. --space regularizer.weight=log:0.01:100")
    params, seen = [], set()
    for item in items:
        key, eq, spec = item.partition("=")
        key = key.strip()
        hint = "SPEC is log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or choice:A,B,C"
        if not eq or not key:
            raise UserError(f"--space {item}: expected KEY=SPEC; {hint}")
        if not is_config_key(key):
            raise UserError(f"--space {item}: {key} is not a config key (see `sdtl recipes --show NAME`)")
        if key in seen:
            raise UserError(f"--space {item}: {key} is given twice")
        seen.add(key)
        kind, _, rest = spec.partition(":")
        if kind not in KINDS:
            raise UserError(f"--space {item}: unknown kind {kind!r}; {hint}")
        if kind == "choice":
            choices = [c for c in split_values(rest) if c != ""]
            if len(choices) < 2 or len(set(choices)) != len(choices):
                raise UserError(f"--space {item}: choice needs two or more different values, e.g. choice:sgd,adamw")
            params.append(Param(key, kind, choices=choices))
            continue
        bounds = rest.split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            low, high = (int(b) for b in bounds) if kind == "int" else (float(b) for b in bounds)
        except ValueError:
            raise UserError(f"--space {item}: {kind} needs two numbers LOW:HIGH"
                            f"{' (integers)' if kind == 'int' else ''}; {hint}") from None
        if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            raise UserError(f"--space {item}: LOW must be below HIGH (got {low} and {high})")
        if kind == "log" and low <= 0:
            raise UserError(f"--space {item}: log needs LOW > 0 (a log-uniform range); use float:{low}:{high} "
                            f"to include {low}")
        params.append(Param(key, kind, low, high))
    return params


def check_space(recipe: str, sets: list[str], params: list[Param]) -> object:
    """Load and validate the recipe at every corner of the space (each key's ends and choices, the others
    at their first corner): a value the config refuses is an error now, not in trial 17. Returns the
    config at the first corner."""
    from sdtl.engine import config as cfgmod

    base = {p.key: p.corners()[0] for p in params}
    first = None
    for p in params:
        for value in p.corners():
            point = {**base, p.key: value}
            try:
                cfg = cfgmod.load_config(recipe, [*sets, *(as_set(k, v) for k, v in point.items())], kind="finetune")
                cfgmod.validate_ranges(cfg)
            except UserError as exc:
                raise UserError(f"--space {p.key}={p.describe()}: at {p.key}={value}: {exc.template}") from None
            first = first or cfg
    return first


# ---------------------------------------------------------------------------------- the study
def storage_url(storage: str | None, out: Path) -> str:
    return storage or f"sqlite:///{(out / 'tune.db').resolve()}"


def redacted(url: str) -> str:
    """A storage URL without its password (what is written to files and logs)."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def make_storage(url: str, heartbeat: float):
    optuna = import_optuna()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    retry_cls, retry_arg = retry_callback()
    error: Exception | None = None
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=max(1, int(heartbeat)),
                grace_period=max(3, int(3 * heartbeat)), **{retry_arg: retry_cls(max_retry=3)})
        except ImportError as exc:  # no driver: trying again will not help
            error = exc
            break
        except Exception as exc:  # noqa: BLE001 - e.g. two workers creating the same new schema at once
            error = exc
            time.sleep(0.5 * (attempt + 1))
    raise UserError(f"--storage {redacted(url)}: cannot open it ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); for PostgreSQL install a driver "
                    f"(pip install 'psycopg[binary]', or psycopg2-binary with a postgresql+psycopg2:// URL) "
                    f"and check the server is reachable")


def retry_callback():
    """Optuna's re-queue of trials whose heartbeat went stale, and the RDBStorage argument that takes it
    (renamed in Optuna 4.9; the old names still work, with a deprecation warning, until 6.0)."""
    optuna = import_optuna()
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return optuna.storages.RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback"
    return optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"


def make_pruner(name: str, epochs: int):
    optuna = import_optuna()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


class PruneOnValidation:
    """A loop call-out (after the run's own, so the epoch is logged and checkpointed): reports each
    epoch's validation acc@1 to the trial and stops the run when the pruner says so. It has the
    :class:`sdtl.engine.callbacks.Callback` methods without subclassing it: importing the engine here
    would put torch into ``sdtl --help``, which registers this command."""

    name = ""

    def __init__(self, trial, optuna) -> None:
        self.trial, self.optuna = trial, optuna

    def on_step_end(self, loop, epoch: int, step: int) -> None:
        pass

    def on_epoch_end(self, loop, record: dict) -> None:
        value = record.get(OBJECTIVE)
        if value is None:
            return
        self.trial.report(float(value), int(record["epoch"]))
        if record["epoch"] < loop.cfg.optim.epochs and self.trial.should_prune():  # the last epoch is done anyway
            log.info("trial %d pruned after epoch %d (validation acc@1 %.2f)", self.trial.number, record["epoch"], value)
            raise self.optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

    def state_dict(self):
        return None


def run_number(study, trial) -> int:
    """The run folder number of ``trial``: its own, or for a retry the original trial's (a chain of
    retries keeps the first number), so a retried trial resumes the same run folder."""
    trials = study.get_trials(deepcopy=False)
    resumes = trials[trial.number].user_attrs.get("run_number")  # a re-queued interrupted trial
    if resumes is not None:
        return int(resumes)
    failed = retry_callback()[0].retried_trial_number(trials[trial.number])
    if failed is None:
        return trial.number
    original = trials[failed]
    return int(original.user_attrs.get("run_number", failed))


@dataclass
class Tuner:
    recipe: str
    sets: list[str]
    params: list[Param]
    out: Path

    def objective(self, study, trial) -> float:
        from sdtl.engine import config as cfgmod
        from sdtl.engine.finetune import run_finetune

        optuna = import_optuna()
        number = run_number(study, trial)
        run_dir = self.out / "trials" / f"{number:04d}"
        trial.set_user_attr("run_number", number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        values = {p.key: p.suggest(trial) for p in self.params}
        sets = [*self.sets, *(as_set(k, v) for k, v in values.items())]
        cfg = cfgmod.load_config(self.recipe, sets, kind="finetune")
        cfgmod.validate_ranges(cfg)
        log.info("trial %d -> %s: %s", trial.number, run_dir, ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                                          else f"{k}={v}" for k, v in values.items()))
        try:
            run_finetune(cfg, run_dir, resume="auto", callbacks=(PruneOnValidation(trial, optuna),))
        except (RunInterrupted, KeyboardInterrupt):
            # stopped with its state written (Ctrl-C, SIGTERM, a Slurm preemption): this trial ends as
            # failed and a copy with the same parameters waits in the study for the next worker, which
            # resumes the same run folder
            study.enqueue_trial(values, user_attrs={"run_number": number, "resumes_trial": trial.number},
                                skip_if_exists=False)
            raise
        got = core.collect(core.RunSpec(f"trial{number}", run_dir, self.recipe, sets))
        trial.set_user_attr("test_acc1", got["test"])
        trial.set_user_attr("epochs", len([r for r in got["history"] if r.get("epoch", 0) >= 1]))
        return float(got["val"])


def identity_of(recipe: str, sets: list[str], params: list[Param], trials: int, pruner: str) -> dict:
    from sdtl.engine import config as cfgmod

    base = cfgmod.to_dict(cfgmod.load_config(recipe, sets, kind="finetune"))
    for p in params:  # the searched keys' base values do not matter
        section, _, name = p.key.partition(".")
        base.get(section, {}).pop(name, None)
    base.pop("slurm", None)
    return {"base_config": base, "space": {p.key: p.describe() for p in params}, "objective": OBJECTIVE,
            "pruner": pruner, "trials": trials}


def open_study(url: str, name: str, identity: dict, heartbeat: float, seed: int, pruner: str, epochs: int):
    optuna = import_optuna()
    storage = make_storage(url, heartbeat)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                    pruner=make_pruner(pruner, epochs))
    except Exception as exc:  # noqa: BLE001 - the database refused: say which one
        raise UserError(f"--storage {redacted(url)}: cannot create or load study {name!r} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    old = study.user_attrs.get("sdtl")
    if old is None:
        study.set_user_attr("sdtl", identity)
    elif json.loads(json.dumps(old)) != json.loads(json.dumps(identity)):
        from sdtl.engine.rundir import config_changes

        diff = config_changes({k: v for k, v in old.items()}, identity)
        raise UserError(f"--study {name}: this study was started with another config, space or objective "
                        f"({'; '.join(diff[:3])}); use another --study name (or --out)")
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def work(study, tuner: Tuner, trials: int, poll_s: float) -> None:
    """Run trials until ``trials`` are finished, retrying the trials of dead workers (see the module doc)."""
    optuna = import_optuna()
    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    while True:
        states = [t.state for t in study.get_trials(deepcopy=False)]
        waiting = states.count(TrialState.WAITING)
        if sum(s in counted for s in states) < trials or waiting:
            study.optimize(lambda trial: tuner.objective(study, trial), n_trials=1, catch=(UserError,),
                           gc_after_trial=False)
            continue
        if states.count(TrialState.RUNNING):  # another worker's; if it died, its trial is retried here
            optuna.storages.fail_stale_trials(study)
            time.sleep(poll_s)
            continue
        return


# ------------------------------------------------------------------------------------- outputs
def summarise(study, params: list[Param], url: str, wall_s: float) -> dict:
    from optuna.trial import TrialState

    retried_from = retry_callback()[0].retried_trial_number
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "params": dict(t.params),
                     "value": t.value, "test_acc1": t.user_attrs.get("test_acc1"),
                     "last_reported": t.intermediate_values[last] if last is not None else None,
                     "epochs": t.user_attrs.get("epochs", last), "run_dir": t.user_attrs.get("run_dir"),
                     "worker": t.user_attrs.get("worker"),
                     "retry_of": retried_from(t),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None})
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = max(complete, key=lambda r: (r["value"], -r["number"])) if complete else None
    counts = {s.name.lower(): sum(r["state"] == s.name.lower() for r in rows) for s in TrialState}
    return {"study": study.study_name, "storage": redacted(url), "objective": OBJECTIVE + " (maximised)",
            "space": {p.key: p.describe() for p in params}, "counts": {k: v for k, v in counts.items() if v},
            "best": best, "trials": rows, "worker_wall_time_s": wall_s,
            "selection": "highest validation acc@1 of the epoch each trial selected (ties: the earlier trial); "
                         "test is reported beside it, never used to choose"}


def _fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _param(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_markdown(summary: dict, command: str) -> str:
    keys = list(summary["space"])
    best = summary["best"]
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    lines = [f"# sdtl tune: {', '.join(keys)}", "", f"`{command}`", "",
             f"Study `{summary['study']}` ({summary['storage']}); objective: {summary['objective']}; {counts}.",
             f"Selection: {summary['selection']}.", ""]
    if best:
        lines += [f"**Best on validation**: trial {best['number']} ("
                  + ", ".join(f"{k}={_param(best['params'].get(k))}" for k in keys)
                  + f"): val acc@1 {_fmt(best['value'])}, test acc@1 {_fmt(best['test_acc1'])} "
                  f"(`{best['run_dir']}`; its config: `best.yaml`).", ""]
    lines += ["| trial | " + " | ".join(keys) + " | state | epochs | val acc@1 | test acc@1 |",
              "|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for r in summary["trials"]:
        mark = " ◀" if best and r["number"] == best["number"] else ""
        state = r["state"] + (f" (retry of {r['retry_of']})" if r["retry_of"] is not None else "")
        lines.append(f"| {r['number']} | " + " | ".join(_param(r["params"].get(k, "–")) for k in keys)
                     + f" | {state} | {_fmt(r['epochs'])} | {_fmt(r['value'])}{mark} | {_fmt(r['test_acc1'])} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, params: list[Param], path: Path) -> None:
    from sdtl.studies import plots

    plt = plots.pyplot()
    panels = 1 + len(params)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    rows = summary["trials"]
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned"]
    ax = axes[0][0]
    ax.scatter([r["number"] for r in done], [r["value"] for r in done], label="complete", color="C0")
    best, curve = -math.inf, []
    for r in sorted(done, key=lambda r: r["number"]):
        best = max(best, r["value"])
        curve.append((r["number"], best))
    if curve:
        ax.step(*zip(*curve), where="post", color="C1", label="best so far")
    # a pruned trial at the validation accuracy of the epoch that got it pruned
    ax.scatter([r["number"] for r in pruned], [r["last_reported"] for r in pruned], marker="x", color="C3",
               label="pruned (at its last epoch)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation acc@1")
    ax.set_title("optimisation history")
    ax.legend(fontsize=7)
    for i, p in enumerate(params, start=1):
        ax = axes[0][i]
        for group, colour, marker in ((done, "C0", "o"), (pruned, "C3", "x")):
            xs = [r["params"].get(p.key) for r in group]
            ys = [r["value"] for r in group] if group is done else [r["last_reported"] for r in group]
            ax.scatter([str(x) for x in xs] if p.kind == "choice" else xs, ys, color=colour, marker=marker)
        if p.kind == "log":
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_title(f"validation acc@1 vs {p.key}", fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


def write_outputs(study, tuner: Tuner, url: str, wall_s: float, command: str) -> dict:
    from sdtl.engine import config as cfgmod

    out = tuner.out
    summary = summarise(study, tuner.params, url, wall_s)
    core.write_json(out / "tune.json", summary)
    core.write_text(out / "tune.md", render_markdown(summary, command))
    plot(summary, tuner.params, out / "tune.png")
    best = summary["best"]
    if best:
        sets = [*tuner.sets, *(as_set(k, v) for k, v in best["params"].items())]
        cfg = cfgmod.load_config(tuner.recipe, sets, kind="finetune")
        cfg.description = (f"sdtl tune best trial {best['number']} of study {study.study_name}: "
                           + ", ".join(f"{k}={_param(v)}" for k, v in best["params"].items())
                           + f" (validation acc@1 {best['value']:.2f})")
        cfgmod.dump_config(cfg, out / "best.yaml", kind="finetune")
    return summary


# ------------------------------------------------------------------------------------ entry point
def write_marker(out: Path, name: str, url: str, identity: dict, config: str, sets: list[str]) -> None:
    """``OUT/tune_study.json``: which study this folder serves (what a later worker's claim reads)."""
    core.write_json(out / MARKER, {"study": name, "storage": redacted(url), "identity": identity, "config": config,
                                   "sets": sets})


def prepare_study(config: str, space: list[str], trials: int, out: Path, sets: list[str], storage: str | None,
                  study_name: str | None, pruner: str, seed: int, heartbeat: float):
    """What every worker (and ``--slurm`` before it submits any) does first: check the options and every
    corner of the space, claim ``out``, open or create the study and write ``OUT/tune_study.json``.
    Returns ``(study, tuner, storage url, config at the space's first corner)``."""
    if trials < 1:
        raise UserError(f"--trials {trials}: must be >= 1")
    if pruner not in PRUNERS:
        raise UserError(f"--pruner {pruner}: one of {', '.join(PRUNERS)}")
    if heartbeat <= 0:
        raise UserError(f"--heartbeat {heartbeat}: must be > 0 seconds")
    params = parse_space(space)
    first = check_space(config, sets, params)  # every corner valid before anything is written
    identity = identity_of(config, sets, params, trials, pruner)
    core.claim_out(out, "tune", MARKER)
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(storage, out)
    name = study_name or out.resolve().name
    study = open_study(url, name, identity, heartbeat, seed, pruner, first.optim.epochs)
    write_marker(out, name, url, identity, config, sets)
    return study, Tuner(config, sets, params, out), url, first


def run_tune(config: str, space: list[str], trials: int, out: str | Path, sets: list[str] | None = None,
             storage: str | None = None, study_name: str | None = None, pruner: str = "hyperband", seed: int = 0,
             heartbeat: float = 60.0, command: str | None = None) -> dict:
    out = Path(out)
    sets = list(sets or [])
    study, tuner, url, _ = prepare_study(config, space, trials, out, sets, storage, study_name, pruner, seed, heartbeat)
    command = command or f"sdtl tune --config {config} " + " ".join(
        [*(f"--space {s}" for s in space), f"--trials {trials}", f"--out {out}", *(f"--set {s}" for s in sets)])
    t0 = time.perf_counter()
    work(study, tuner, trials, poll_s=min(5.0, heartbeat))
    summary = write_outputs(study, tuner, url, time.perf_counter() - t0, command)
    print(render_markdown(summary, command))
    return summary


@dataclass
class TuneWorker:
    """One ``sdtl tune`` worker as a Slurm job (``--slurm --workers K`` submits K as an array). A
    preempted worker's trial is re-queued with its run folder (see :meth:`Tuner.objective`) and the job
    requeues itself; any worker, this one after its requeue or another, resumes the trial."""

    kwargs: dict

    def __call__(self):
        from sdtl.engine import slurm

        slurm.log_to_job_output()
        try:
            run_tune(**self.kwargs)
        except RunInterrupted as exc:
            slurm.requeue_or_stop(exc)

    def checkpoint(self, *args, **kwargs):
        from sdtl.engine import slurm

        return slurm.import_submitit().helpers.DelayedSubmission(TuneWorker(self.kwargs))


def submit_workers(kwargs: dict, workers: int, wait: bool) -> None:
    """Check everything a local worker checks, then submit ``workers`` tune workers as one job array."""
    from sdtl.engine import config as cfgmod
    from sdtl.engine import slurm

    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    out = Path(kwargs["out"]).resolve()
    kwargs = {**kwargs, "out": str(out), "sets": list(kwargs["sets"] or [])}
    # the folder is claimed and its marker written before the job logs go into it, and the study (with a
    # new database's schema) exists before the workers start: none of them races to make it
    _, _, _, first = prepare_study(kwargs["config"], kwargs["space"], kwargs["trials"], out, kwargs["sets"],
                                   kwargs.get("storage"), kwargs.get("study_name"), kwargs["pruner"], kwargs["seed"],
                                   kwargs["heartbeat"])
    cfgmod.check_slurm(first.slurm)
    if kwargs.get("storage") is None:
        log.warning("--slurm: the workers share the SQLite file %s; on a network filesystem prefer --storage "
                    "journal:PATH or a PostgreSQL URL", out / "tune.db")
    folder = out / "slurm"
    executor = slurm.make_executor(folder, first.slurm, first.slurm.job_name or f"sdtl-tune-{out.name}")
    with executor.batch():
        jobs = [executor.submit(TuneWorker(kwargs)) for _ in range(workers)]
    for job in jobs:
        slurm.record_submission(folder, {"worker": job.job_id, "job_id": job.job_id, "log": str(job.paths.stdout),
                                         "result": str(job.paths.result_pickle), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"submitted Slurm job array {jobs[0].job_id.split('_')[0]}: {workers} tune worker(s), at most "
          f"{first.slurm.array_parallelism} at a time; logs in {folder}")
    if not wait:
        print(f"the outputs (tune.md, best.yaml) appear in {out} as workers finish")
        return
    failed = []
    for job in jobs:
        state, detail = slurm.wait_for(job.job_id, job.paths.result_pickle, quiet=True)
        if state != "done":
            failed.append(f"{job.job_id}: {state} {detail}")
    if failed:
        raise UserError(f"tune workers did not finish: {'; '.join(failed)} (logs in {folder})")
    print((out / "tune.md").read_text())


def _cmd(args) -> int:
    import shlex

    kwargs = {"config": args.config, "space": args.space, "trials": args.trials, "out": args.out,
              "sets": args.overrides, "storage": args.storage, "study_name": args.study, "pruner": args.pruner,
              "seed": args.seed, "heartbeat": args.heartbeat,
              "command": shlex.join(["sdtl", *getattr(args, "argv", [])])}
    if args.wait and not args.slurm:
        raise UserError("--wait waits for Slurm jobs: use it with --slurm")
    if args.slurm:
        submit_workers(kwargs, args.workers, args.wait)
        return 0
    run_tune(**kwargs)
    return 0


def register(sub) -> None:
    from sdtl.cli_options import add_set

    p = sub.add_parser("tune", help="search config keys (e.g. lambda, lr) with Optuna and pruning; many workers, "
                                    "one study",
                       description="Sample --space with TPE, run each trial as an ordinary fine-tuning run in "
                                   "OUT/trials/NNNN, prune trials behind on validation (Hyperband by default). "
                                   "Workers started with the same --out/--storage/--study share the study. Writes "
                                   "tune.json, tune.md, tune.png and best.yaml (the best trial's config, chosen on "
                                   "validation). Needs sdtl[tune].",
                       epilog="example: sdtl tune --config ucf101_r21d_sd --space regularizer.weight=log:0.01:1000 "
                              "--trials 30 --out tunes/lambda --set data.root=/data/UCF101; on many machines add "
                              "--storage postgresql://user@db-host:5432/sdtl --study lambda")
    p.add_argument("--config", required=True, metavar="NAME_OR_PATH", help="fine-tuning recipe name or YAML file")
    p.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                   help="a searched config key: log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or choice:A,B,C "
                        "(repeatable)")
    p.add_argument("--trials", type=int, default=20, metavar="N", help="finished trials the study needs (default 20)")
    p.add_argument("--out", required=True, metavar="DIR", help="tune directory (trials/, outputs, the SQLite study)")
    add_set(p, "override a config key for every trial, as in finetune (repeatable)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage: default sqlite in OUT; journal:PATH; or a "
                                                     "SQLAlchemy URL such as postgresql://user@host:5432/db")
    p.add_argument("--study", metavar="NAME", help="study name in the storage (default: the name of --out)")
    p.add_argument("--pruner", default="hyperband", choices=PRUNERS, help="default hyperband")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    p.add_argument("--heartbeat", type=float, default=60.0, metavar="S",
                   help="seconds between a worker's heartbeats; a trial silent for 3x this is retried (default 60)")
    p.add_argument("--slurm", action="store_true",
                   help="submit --workers tune workers as a Slurm job array (resources: the recipe's slurm section, "
                        "--set slurm.KEY=VALUE); a preempted worker's trial is resumed by the next worker")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="with --slurm: workers to submit (default 1)")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the workers, then print tune.md")
    p.set_defaults(func=_cmd, resume_hint=core.RERUN_HINT)
