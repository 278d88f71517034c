"""The one core every study shares (``demo``, ``compare``, ``sweep``, ``wise``).

* :class:`RunSpec`: one fine-tuning run of a study, i.e. ``sdtl finetune --config RECIPE --out DIR
  --set ...``; a study is a list of them.
* :func:`claim_out` / :func:`study_folder`: may ``--out`` hold this study? A new or empty folder, or
  one the same study wrote (its marker file says so, and with which identity). Everything else is
  refused, and nothing is ever written over a folder sdtl did not write.
* :func:`build_configs`, :func:`run_all` and the :class:`Executor` protocol: every config is built
  and validated before the first run; run folders made with other settings are refused; finished
  runs are reused (and said so), unfinished ones resumed. :class:`InProcess` runs one after another
  in this process, :class:`SubprocessPool` runs N at a time as ``sdtl finetune`` child processes
  (one GPU each when there are GPUs). A cluster executor is one more :class:`Executor`.
* :func:`collect`, :func:`stat`, :func:`summarise`, :func:`fmt`: what a finished run reports, mean ±
  std over seeds (:mod:`sdtl.studies.stats`) per group of runs, and the one way tables print it.

This module is imported when the CLI registers the study commands: it imports neither torch nor
matplotlib at the top, nor anything else ``sdtl --help`` does not need.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdtl.errors import RunFailed, RunInterrupted, UserError

log = logging.getLogger("sdtl.studies")

METRIC = "video_acc1"  # test metric of the selected checkpoint (results.json)
VAL_METRIC = "val_video_acc1"  # validation metric at the selected epoch (metrics.jsonl)

# What `sdtl: interrupted; ...` says for a study: re-running the same command is how it continues.
RERUN_HINT = ("finished runs are kept and the interrupted run has its completed epochs in its checkpoints; "
              "re-run the same command to continue (finished runs are reused, the unfinished one resumes)")


# ------------------------------------------------------------------------------------- run spec
@dataclass
class RunSpec:
    """One fine-tuning run of a study: ``sdtl finetune --config RECIPE --out DIR --set S ...``."""

    name: str  # unique within the study: logs, failure records, child log file names
    dir: Path
    recipe: str  # recipe name or YAML file
    sets: list[str]  # every override of the recipe, in order (run.seed included)
    seed: int = 0
    method: str | None = None  # the study's series (demo, compare); None in a sweep
    point: dict = field(default_factory=dict)  # the run's other coordinates (grid values, λ, lr, ...)
    label: str | None = None  # a longer description for the log (default: name)

    @property
    def finished(self) -> bool:
        return (self.dir / "results.json").exists()

    def describe(self) -> str:
        return self.label or self.name

    def config(self):
        """The run's config, validated (a :class:`UserError` names the run)."""
        from sdtl.engine import config as cfgmod

        try:
            cfg = cfgmod.load_config(self.recipe, list(self.sets), kind="finetune")
            cfgmod.validate_ranges(cfg)
        except UserError as exc:
            raise UserError(f"run {self.name}: {exc}") from None
        return cfg

    def command(self) -> list[str]:
        """The same run as an ``sdtl finetune`` child process (resuming its folder if it has one)."""
        cmd = [sys.executable, "-m", "sdtl", "-q", "finetune", "--config", self.recipe, "--out", str(self.dir),
               "--resume", "auto"]
        for item in self.sets:
            cmd += ["--set", item]
        return cmd


# ----------------------------------------------------------------------------- the output folder
def read_marker(out: Path, marker: str) -> dict | None:
    path = Path(out) / marker
    return (json.loads(path.read_text()) or {}) if path.exists() else None


def _require_equal(study: str) -> Callable[[Path, dict, dict, bool], None]:
    def check(out: Path, old: dict, new: dict, extend: bool) -> None:
        if old != new:
            from sdtl.engine.rundir import config_changes

            changes = config_changes(old, new)
            raise UserError(f"--out {out}: holds a `sdtl {study}` with other settings ({'; '.join(changes[:4])}"
                            f"{' …' if len(changes) > 4 else ''}); nothing was changed: choose another --out")
    return check


def claim_out(out: Path, study: str, marker: str, identity: dict | None = None, *, extend: bool = False,
              check: Callable[[Path, dict, dict, bool], None] | None = None, reuse: bool = True,
              force: bool | None = None, writes: Iterable[str] = ()) -> dict | None:
    """May ``out`` hold this ``sdtl <study>``? Returns the content of its marker file (None: a new or empty
    folder). Writes nothing; refuses with a :class:`UserError` that says what to do:

    * ``out`` that is a file;
    * a folder with files but no ``marker`` (not this study's): unless ``force`` (a study with a
      ``--force`` option passes True or False, the others None), and even then if it already holds
      any of ``writes``, the names the study would write;
    * a folder with the marker when ``reuse`` is False (a study that writes once, as ``wise``);
    * a folder whose marker records another ``identity``: ``check(out, old, new, extend)`` raises to
      refuse (default: any difference refuses). ``extend`` is the study's ``--extend``.
    """
    from sdtl.engine.runlock import is_lock_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a new or empty directory")
    old = read_marker(out, marker) if out.is_dir() else None
    if old is None:
        held = sorted(p.name for p in out.iterdir() if not is_lock_file(p)) if out.is_dir() else []
        if held and not force:
            listing = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            hint = (f" (or pass --force to add the {study}'s files to it; nothing in it is deleted)"
                    if force is not None else "")
            raise UserError(f"--out {out}: not empty and not an sdtl {study} folder (it holds {listing} but no "
                            f"{marker}); choose a new or empty --out directory{hint}")
        taken = sorted(set(held) & set(writes))
        if taken:  # --force adds the study's files; it never writes over files the study did not write
            raise UserError(f"--out {out}: already holds {', '.join(taken)}, which the {study} would write over, "
                            f"and no {marker} says the {study} wrote them; choose a new --out (nothing was changed)")
        return None
    if not reuse:
        raise UserError(f"--out {out}: already holds {marker} (a finished `sdtl {study}`), which is never "
                        f"written over; choose another --out directory")
    if identity is not None:
        (check or _require_equal(study))(out, old.get("identity") or {}, json.loads(json.dumps(identity)), extend)
    return old


@contextlib.contextmanager
def study_folder(out: Path, study: str, claim: Callable[[], dict | None], lock=None):
    """``with study_folder(out, "demo", lambda: claim_out(...)) as old:`` — claim, lock, claim again.

    The first claim refuses a foreign folder before a lock file is written into it; the second runs
    under the lock (another process may have written in between) and its result is yielded. A
    :class:`UserError` inside removes the folder again if this call created it and it holds nothing
    but the lock (bad input leaves nothing behind).
    """
    from sdtl.engine.rundir import remove_if_only_bookkeeping
    from sdtl.engine.runlock import RunLock

    out = Path(out)
    claim()
    created = not out.exists()
    try:
        with (lock or RunLock)(out, study):
            yield claim()
    except UserError:
        if created and out.is_dir():
            remove_if_only_bookkeeping(out)
        raise


# ---------------------------------------------------------------------------------------- running
def build_configs(runs: list[RunSpec], what: str) -> list:
    """Every run's config, built and validated now: a bad key or value stops the study before any run."""
    cfgs = []
    for run in runs:
        try:
            cfgs.append(run.config())
        except UserError as exc:
            raise UserError(f"{what} {exc}") from None
    return cfgs


class Executor(ABC):
    """Runs a study's unfinished runs (each resumes its own folder, ``--resume auto``)."""

    @abstractmethod
    def run(self, todo: list[RunSpec]) -> dict[str, str]:
        """Run every spec of ``todo``; returns ``{run name: error}`` for the runs that failed."""


class InProcess(Executor):
    """One run after another in this process, in the order given."""

    def __init__(self, study: str) -> None:
        self.study = study

    def run(self, todo: list[RunSpec]) -> dict[str, str]:
        from sdtl.engine.finetune import run_finetune

        failed = {}
        for i, spec in enumerate(todo, start=1):
            log.info("%s [%d/%d]: %s -> %s", self.study, i, len(todo), spec.describe(), spec.dir)
            try:
                run_finetune(spec.config(), spec.dir, resume="auto")
            except RunFailed as exc:  # e.g. a diverging point: recorded, the study goes on
                log.warning("%s: %s failed: %s", self.study, spec.name, exc)
                failed[spec.name] = str(exc)
        return failed


class SlurmArray(Executor):
    """The unfinished runs as one Slurm job array (through submitit), ``slurm.array_parallelism`` at a
    time, logs and job records in ``OUT/slurm``. A run whose last job is still queued or running is not
    submitted again. ``wait``: wait for every job, then report the failed ones (with their reason);
    otherwise return after submitting (``submitted`` holds ``{run name: job id}``)."""

    def __init__(self, study: str, out: Path, slurm_cfg, wait: bool) -> None:
        self.study, self.out, self.slurm_cfg, self.wait = study, Path(out), slurm_cfg, wait
        self.submitted: dict[str, str] = {}

    def run(self, todo: list[RunSpec]) -> dict[str, str]:
        from sdtl.engine import config as cfgmod
        from sdtl.engine import slurm

        folder = self.out / "slurm"
        states = job_states(folder)
        live = {name: st for name, st in states.items() if st["state"] in ("queued", "running")}
        for name, st in live.items():
            log.info("%s: %s is already %s as Slurm job %s: not submitted again", self.study, name, st["state"],
                     st["job_id"])
        submit = [spec for spec in todo if spec.name not in live]
        jobs = []
        if submit:
            executor = slurm.make_executor(folder, self.slurm_cfg, self.slurm_cfg.job_name or f"sdtl-{self.study}")
            with executor.batch():
                for spec in submit:
                    jobs.append(executor.submit(slurm.SlurmRun("finetune", cfgmod.to_dict(spec.config()),
                                                               str(spec.dir.resolve()), "auto")))
            for spec, job in zip(submit, jobs):
                slurm.record_submission(folder, {"run": spec.name, "job_id": job.job_id, "log": str(job.paths.stdout),
                                                 "result": str(job.paths.result_pickle),
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                self.submitted[spec.name] = job.job_id
            array = jobs[0].job_id.split("_")[0]
            print(f"submitted Slurm job array {array}: {len(jobs)} run(s) of the {self.study}, at most "
                  f"{self.slurm_cfg.array_parallelism} at a time; logs in {folder}")
        if not self.wait:
            return {}
        failed = {}
        pending = [(spec.name, job.job_id, job.paths.result_pickle) for spec, job in zip(submit, jobs)]
        pending += [(name, st["job_id"], Path(st["result"])) for name, st in live.items()]
        for name, job_id, result in pending:
            state, detail = slurm.wait_for(job_id, result, quiet=True)
            if state != "done":
                failed[name] = f"Slurm job {job_id} {state}: {detail}"
                log.warning("%s: %s %s", self.study, name, failed[name])
        return failed


def job_states(folder: Path) -> dict[str, dict]:
    """``{run name: {"job_id", "state", "detail", "log", "result"}}`` of each run's latest submission in
    ``folder`` (``OUT/slurm``), its state asked of Slurm now."""
    from sdtl.engine import slurm

    latest = {}
    for row in slurm.read_submissions(folder):
        if "run" in row:
            latest[row["run"]] = row
    out = {}
    for name, row in latest.items():
        state, detail = slurm.job_state(row["job_id"], Path(row["result"]))
        out[name] = {**row, "state": state, "detail": detail}
    return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed study kills its runs
    except OSError:
        pass


class SubprocessPool(Executor):
    """``parallel`` runs at a time as ``sdtl finetune`` child processes; with GPUs each child sees one
    (``CUDA_VISIBLE_DEVICES``, the least loaded first). Each child's output goes to ``logs/<name>.log``."""

    def __init__(self, study: str, parallel: int, logs: Path, poll_s: float = 0.5) -> None:
        self.study, self.parallel, self.logs, self.poll_s = study, parallel, Path(logs), poll_s

    def run(self, todo: list[RunSpec]) -> dict[str, str]:
        import subprocess

        import torch

        from sdtl.engine.loop import StopRequest

        gpus = torch.cuda.device_count()
        self.logs.mkdir(parents=True, exist_ok=True)
        pending, running, failed = list(todo), {}, {}
        try:
            # SIGINT / SIGTERM / SIGUSR1 to the study (Ctrl-C, a scheduler) stop it the way they stop a
            # run: its children are asked to stop and write their state, instead of dying with it.
            with StopRequest() as stop:
                self._run(pending, running, failed, gpus, subprocess, stop)
        except (KeyboardInterrupt, RunInterrupted):
            _stop_children(running)  # each writes its state after its current step; then re-run the study
            raise
        return failed

    def _run(self, pending, running, failed, gpus, subprocess, stop) -> None:
        load = {g: 0 for g in range(gpus)}  # children per GPU: a new child gets the least loaded one
        while pending or running:
            while pending and len(running) < self.parallel:
                spec = pending.pop(0)
                env = dict(os.environ)
                gpu = min(load, key=lambda g: (load[g], g)) if gpus else None
                if gpu is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
                    load[gpu] += 1
                log_path = self.logs / (spec.name.replace("/", "__") + ".log")
                with open(log_path, "a", encoding="utf-8") as fh:
                    proc = subprocess.Popen(spec.command(), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=_die_with_parent)
                running[proc] = (spec, log_path, gpu)
                log.info("%s: started %s (pid %d%s)", self.study, spec.describe(), proc.pid,
                         f", GPU {gpu}" if gpu is not None else "")
            time.sleep(self.poll_s)
            if stop.signum is not None:
                raise RunInterrupted(f"{self.study} stopped by {stop.name}")
            for proc in [p for p in running if p.poll() is not None]:
                spec, log_path, gpu = running.pop(proc)
                if gpu is not None:
                    load[gpu] -= 1
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                if proc.returncode == RunInterrupted.exit_code:  # stopped on request: so is the study
                    _stop_children(running)
                    raise RunInterrupted(f"{self.study}: {spec.name} was stopped ({tail[0]})")
                if proc.returncode != 0:
                    failed[spec.name] = f"exit {proc.returncode}: {tail[0]} (log: {log_path})"
                    log.warning("%s: %s failed: %s", self.study, spec.name, failed[spec.name])


def _stop_children(running: dict, timeout_s: float = 300.0) -> None:
    """Ask running child runs to stop (SIGTERM: each finishes its step and writes its state), and wait."""
    import signal
    import subprocess

    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def add_parallel_option(p) -> None:
    """``--parallel N``: the same option on every study that runs fine-tunes."""
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="fine-tuning runs at a time, as child processes; on a multi-GPU box each gets one GPU "
                        "(default 1: one after another in this process)")


def make_executor(study: str, parallel: int, out: Path, slurm_cfg=None, wait: bool = False) -> Executor:
    """In this process for ``parallel`` 1, else a pool of ``parallel`` child processes (logs in OUT/logs);
    with ``slurm_cfg`` (``--slurm``) a Slurm job array."""
    if parallel < 1:
        raise UserError(f"--parallel {parallel}: must be >= 1")
    if slurm_cfg is not None:
        if parallel != 1:
            raise UserError(f"--parallel {parallel}: runs children on this machine; with --slurm the number of "
                            f"runs at a time is slurm.array_parallelism (--set slurm.array_parallelism=N)")
        return SlurmArray(study, out, slurm_cfg, wait)
    if wait:
        raise UserError("--wait waits for Slurm jobs: use it with --slurm")
    return InProcess(study) if parallel == 1 else SubprocessPool(study, parallel, Path(out) / "logs")


def _names(runs: list[RunSpec], most: int = 4) -> str:
    names = [r.name for r in runs]
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def run_all(runs: list[RunSpec], cfgs: list, executor: Executor, study: str) -> dict[str, str]:
    """Check every run folder against its config, say what is reused, run the rest with ``executor``.

    A folder whose stored config is not the run's is refused before anything runs (never reused,
    never continued with another config). Returns ``{run name: error}`` for the runs that failed.
    """
    from sdtl.engine.rundir import check_same_config

    for run, cfg in zip(runs, cfgs):
        check_same_config(run.dir, cfg, f"this {study}")
    done = [r for r in runs if r.finished]
    todo = [r for r in runs if not r.finished]
    partial = [r for r in todo if (r.dir / "config.yaml").exists()]
    log.info("%s: %d runs: %d finished earlier (reused as they are%s), %d to run%s", study, len(runs), len(done),
             f": {_names(done)}" if done else "", len(todo),
             f" ({len(partial)} resumed from their last checkpoint: {_names(partial)})" if partial else "")
    return executor.run(todo)


def failures_message(study: str, failed: dict[str, str]) -> str:
    return (f"{study}: {len(failed)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
            + " (re-run the same command to retry them from their last checkpoint)")


# ------------------------------------------------------------------------------------- results
def write_text(path: Path, text: str) -> None:
    """Write a study file atomically (a crash leaves the old file or the new one, never half)."""
    from sdtl.atomic import atomic_write_text

    atomic_write_text(path, text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def collect(run: RunSpec) -> dict:
    """What the tables need from a finished run: ``results`` (its results.json), ``history`` (its
    metrics.jsonl), ``test`` / ``test_last`` / ``test_mean_class``, ``val`` (the validation value of the
    epoch that selected its checkpoint), ``epoch``, ``num_classes`` and ``seconds`` (its epochs and final test)."""
    res = json.loads((run.dir / "results.json").read_text())
    history = read_jsonl(run.dir / "metrics.jsonl")
    epoch = res["selected"]["epoch"]
    at_selected = next((r for r in history if r.get("epoch") == epoch), {})
    return {"spec": run, "results": res, "history": history,
            "test": res[METRIC], "test_last": res["last"][METRIC], "test_mean_class": res["mean_class_acc"],
            "val": at_selected.get(VAL_METRIC, float("nan")), "epoch": epoch,
            "num_classes": len(res.get("per_class_acc") or {}) or None,
            "seconds": sum(r.get("epoch_time_s", 0.0) for r in history) + res.get("eval_time_s", 0.0)}


def final(history: list[dict], key: str) -> float:
    """The last numeric value of ``key`` in a run's history (NaN if none)."""
    vals = [r[key] for r in history if isinstance(r.get(key), (int, float))]
    return vals[-1] if vals else float("nan")


def stat(values: list[float], drop_nan: bool = False) -> dict:
    """``{mean, std, values}`` over seeds (sample std; NaN for no values). ``drop_nan``: leave NaNs out."""
    from sdtl.studies.stats import mean_std

    if drop_nan:
        values = [v for v in values if not math.isnan(v)]
    m, s = mean_std(values)
    return {"mean": m, "std": s, "values": values}


def fmt(s: dict, digits: int = 1) -> str:
    """``"48.3 ± 5.8"``; ``"—"`` when there is no value (or the mean is not a number)."""
    if not s["values"] or math.isnan(s["mean"]):
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def group_runs(runs: list[RunSpec], by: Callable[[RunSpec], Hashable]) -> dict:
    """``{key: [runs]}`` in the order keys first appear."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(by(run), []).append(run)
    return groups


def summarise(runs: list[RunSpec], metrics: dict[str, Callable[[dict], float]], by: Callable[[RunSpec], Hashable],
              failed: dict[str, str] | None = None, root: Path | None = None, drop_nan: bool = False) -> dict:
    """Per group of runs (``by``): ``runs``, ``finished``, ``failed`` ({name: error}; unfinished runs
    count as failed), ``seeds`` and ``dirs`` (relative to ``root``) of the finished runs, and a
    :func:`stat` of every metric (``metrics[name](collect(run))``) over them. Keys in first-seen order."""
    failed = failed or {}
    rows = {}
    for key, group in group_runs(runs, by).items():
        done = [(r, collect(r)) for r in group if r.name not in failed and r.finished]
        row = {"runs": len(group), "finished": len(done),
               "failed": {r.name: failed.get(r.name, "not finished") for r in group
                          if r.name in failed or not r.finished},
               "seeds": [r.seed for r, _ in done]}
        if root is not None:
            row["dirs"] = [str(r.dir.relative_to(root)) for r, _ in done]
        row.update({name: stat([get(c) for _, c in done], drop_nan) for name, get in metrics.items()})
        rows[key] = row
    return rows


def num_classes_of(runs: list[RunSpec]) -> int | None:
    """The number of classes of a study's finished runs (from the first one's results.json)."""
    for run in runs:
        if run.finished:
            return collect(run)["num_classes"]
    return None


# --------------------------------------------------------------------------------- wall time
def accumulate_wall_time(earlier: dict | None, now: dict[str, float]) -> dict:
    """This invocation's seconds added to those of the earlier invocations on the same folder, with
    ``invocations`` counted (a re-run that reuses every run adds ~0 instead of replacing the total)."""
    earlier = earlier or {}
    out = {k: earlier.get(k, 0.0) + v for k, v in now.items()}
    out["invocations"] = earlier.get("invocations", 1 if earlier else 0) + 1
    return out
