"""Runs on a Slurm cluster: ``--slurm`` submits the same run as a job through submitit, and the job
survives preemption and time limits by requeueing itself and resuming exactly.

**Submitting** (:func:`submit_run`, :func:`submit_array`): the run's config is loaded and validated
(``slurm`` section included) and its ``--out`` folder judged exactly as a local run would, before
anything is submitted. submitit writes the sbatch script, the pickled job and the logs under
``OUT/slurm/`` (a sweep: ``S/slurm/``); ``OUT/slurm/jobs.jsonl`` records every submission. Resources
come from the ``slurm`` config section (:class:`sdtl.engine.config.SlurmConfig`); it is not part of a
run's identity, so a resumed or re-submitted run may change it.

**Inside the allocation** (:class:`SlurmRun`): one task per GPU (``slurm.tasks_per_node`` tasks per
node on CPU). Each task joins the process group from Slurm's environment, no torchrun:
``RANK = SLURM_PROCID``, ``LOCAL_RANK = SLURM_LOCALID``, ``WORLD_SIZE = SLURM_NTASKS``, the first
node of ``SLURM_JOB_NODELIST`` as ``MASTER_ADDR`` and a port derived from the job id.

**Preemption and time limits.** Slurm sends ``SIGUSR1`` ``slurm.signal_delay_s`` seconds before a
job's time limit (``--signal=USR1@N``; a preempting scheduler or ``scancel --signal=USR1`` sends the
same). The training loop's stop path takes it: the current optimizer step finishes, the mid-epoch
checkpoint state is written, and :class:`~sdtl.errors.RunInterrupted` comes back here; rank 0 then
hands over to submitit's own requeue path (``scontrol requeue`` of this job, the resubmitted job
resumes with ``--resume auto``; after ``slurm.max_requeues`` time-limit requeues it gives up). A
``SIGTERM`` (``scontrol requeue`` or ``scancel`` from outside, Slurm's own preemption) also writes the
state, then the job ends and Slurm does what was asked: a requeued job resumes, a cancelled one can be
resumed by submitting the command again with ``--resume auto``. On CPU with ``run.deterministic`` a
run preempted mid-epoch any number of times ends bit-identical to an uninterrupted one.

``submitit`` is an optional extra (``pip install 'sdtl[slurm]'``), imported only here.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sdtl.errors import RunFailed, RunInterrupted, UserError

log = logging.getLogger("sdtl.slurm")

#: the signal Slurm sends before a time limit (and what a preemption is told to send): submitit's
#: SUBMITIT_PREEMPT_SIGNAL, set before submitit is imported
PREEMPT_SIGNAL = "USR1"
JOBS_FILE = "jobs.jsonl"
#: squeue states of a job that has not ended
LIVE_STATES = {"PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
               "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
               "STAGE_OUT": "running", "RESIZING": "running", "SIGNALING": "running"}


def import_submitit():
    """submitit, told to use SIGUSR1 (it reads the choice when imported), or a UserError saying how to get it."""
    os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", PREEMPT_SIGNAL)
    try:
        import submitit
    except ImportError:
        raise UserError("«slurm» needs submitit: pip install 'sdtl[slurm]' (or pip install submitit)") from None
    return submitit


def require_slurm() -> None:
    missing = [tool for tool in ("sbatch", "srun", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"«slurm»: {', '.join(missing)} not found on PATH; submit from a machine of a Slurm "
                        f"cluster (a login node), or run without «slurm»")


# ------------------------------------------------------------------------------- the executor
def tasks_per_node(s) -> int:
    return s.tasks_per_node or max(1, s.gpus_per_node)


def sbatch_parameters(s, job_name: str) -> dict:
    """submitit's SlurmExecutor parameters for the ``slurm`` section ``s`` (validated)."""
    from sdtl.engine.config import slurm_minutes

    params = {"job_name": job_name, "nodes": s.nodes, "ntasks_per_node": tasks_per_node(s),
              "cpus_per_task": s.cpus_per_task, "time": slurm_minutes(s.time), "signal_delay_s": s.signal_delay_s,
              "stderr_to_stdout": True, "array_parallelism": s.array_parallelism,
              "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}", *s.setup]}
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    extra = {}
    for item in s.extra:
        name, _, value = item.partition("=")
        extra[name.strip().lstrip("-")] = value.strip() if value else True
    if extra:
        params["additional_parameters"] = extra
    return params


def make_executor(folder: Path, s, job_name: str):
    submitit = import_submitit()
    require_slurm()
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=s.max_requeues)
    executor.update_parameters(**sbatch_parameters(s, job_name))
    return executor


# ---------------------------------------------------------------------------- inside the job
def process_group_env(env=None) -> dict[str, str]:
    """torch.distributed's env:// variables from Slurm's (one process per Slurm task)."""
    submitit = import_submitit()
    job = submitit.JobEnvironment()
    env = os.environ if env is None else env
    port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    return {"RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank), "WORLD_SIZE": str(job.num_tasks),
            "MASTER_ADDR": job.hostnames[0], "MASTER_PORT": env.get("MASTER_PORT", str(port))}


@dataclass
class SlurmRun:
    """One ``sdtl finetune`` / ``pretrain`` run as a submitit job (pickled into ``OUT/slurm``).

    ``config`` is the validated config as a dict (what the submitting command resolved); ``resume`` is
    the command's ``--resume`` for the first start; a requeued job always resumes ``auto``."""

    kind: str  # finetune | pretrain
    config: dict
    out: str
    resume: str | None = None

    def __call__(self):
        log_to_job_output()
        os.environ.update(process_group_env())
        from sdtl.engine import config as cfgmod

        cfg = cfgmod.config_from_dict(dict(self.config), kind=self.kind)
        out = Path(self.out)
        resume = self.resume
        if (out / "checkpoints" / "last.pt").exists() or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            resume = "auto"  # a requeued job continues its own run
        try:
            if self.kind == "finetune":
                from sdtl.engine.finetune import run_finetune

                results = run_finetune(cfg, out, resume=resume)
                return {k: results[k] for k in ("video_acc1", "video_acc5", "clip_acc1") if k in results} \
                    if results else None
            from sdtl.engine.pretrain import run_pretrain

            path = run_pretrain(cfg, out, resume=resume)
            return {"encoder": str(path)} if path else None
        except RunInterrupted as exc:
            requeue_or_stop(exc)

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption hook: the job to run after the requeue (the same run, resumed)."""
        submitit = import_submitit()
        return submitit.helpers.DelayedSubmission(SlurmRun(self.kind, self.config, self.out, "auto"))


def requeue_or_stop(exc: RunInterrupted):
    """In a submitit job, after a run stopped with its state written. On the preemption / time-limit
    signal, submitit's requeue path (rank 0 requeues the job; every rank exits without a result, so the
    job is not over); on SIGTERM the job just ends (Slurm requeues it or it was cancelled)."""
    log.warning("%s", exc)
    preempt = getattr(signal, "SIG" + PREEMPT_SIGNAL)
    if exc.signum in (preempt, getattr(signal, "SIGUSR2", None)):
        handler = signal.getsignal(exc.signum)  # submitit's checkpoint_and_try_requeue, installed again
        if callable(handler):
            handler(exc.signum, None)  # rank 0: checkpoint() -> scontrol requeue -> SystemExit
    raise SystemExit(RunInterrupted.exit_code)  # no result pickle: the job is not finished


def log_to_job_output() -> None:
    """sdtl's log lines on the job's output, as the CLI prints them (submitit logs its own lines)."""
    logger = logging.getLogger("sdtl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# ------------------------------------------------------------------------------ job states
def _run_tool(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def job_state(job_id: str, result_pickle: Path | None = None) -> tuple[str, str]:
    """``(state, detail)`` of a submitted job: state is ``queued``, ``running``, ``done``, ``failed``,
    ``stopped`` (ended without a result after a stop request or a cancel: resume it) or ``unknown``.

    Read from the job's result file (submitit writes one when the function returns or raises), then
    ``squeue`` while the job lives, then ``scontrol`` / ``sacct`` for an ended job (no accounting
    database needed while the controller remembers the job)."""
    if result_pickle is not None and result_pickle.exists():
        import pickle

        try:
            with open(result_pickle, "rb") as fh:
                outcome, value = pickle.load(fh)
        except Exception as exc:  # noqa: BLE001 - a result being written or unreadable
            return "unknown", f"result file {result_pickle} unreadable ({exc})"
        if outcome == "success":
            return "done", ""
        lines = [x for x in str(value).strip().splitlines() if x.strip()]
        return "failed", lines[-1] if lines else "raised an error"
    out = _run_tool(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if out and out.strip():
        state, _, reason = out.strip().splitlines()[0].partition("|")
        if state in LIVE_STATES:
            return LIVE_STATES[state], ("" if reason in ("None", "") else reason)
    out = _run_tool(["scontrol", "show", "job", "-o", job_id])
    fields = dict(item.split("=", 1) for item in (out or "").split() if "=" in item)
    state = fields.get("JobState")
    if state is None:
        sacct = _run_tool(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"])
        if sacct and sacct.strip():
            state, _, code = sacct.strip().splitlines()[0].partition("|")
            state = state.split()[0]
            fields = {"ExitCode": code}
    if state is None:
        return "unknown", "Slurm no longer knows the job and it left no result (see its log)"
    if state in LIVE_STATES:
        return LIVE_STATES[state], fields.get("Reason", "")
    if state == "COMPLETED":  # the job script ended with 0 but the function left no result
        return "failed", "the job ended without a result (see its log)"
    detail = f"{state}, exit code {fields.get('ExitCode', '?')}" + (
        f", {fields['Reason']}" if fields.get("Reason") not in (None, "None") else "")
    if state in ("CANCELLED", "PREEMPTED") or fields.get("ExitCode", "").startswith(f"{RunInterrupted.exit_code}:"):
        return "stopped", detail
    return "failed", detail


def record_submission(folder: Path, entry: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / JOBS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def read_submissions(folder: Path) -> list[dict]:
    path = folder / JOBS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line: that submission's id is lost, nothing else
            continue
    return rows


def wait_for(job_id: str, result_pickle: Path, poll_s: float = 5.0, quiet: bool = False) -> tuple[str, str]:
    """Poll until the job has ended; ``(state, detail)`` as :func:`job_state`."""
    last = None
    while True:
        state, detail = job_state(job_id, result_pickle)
        if state != last and not quiet:
            log.info("Slurm job %s: %s%s", job_id, state, f" ({detail})" if detail else "")
            last = state
        if state not in ("queued", "running"):
            return state, detail
        time.sleep(poll_s)


# -------------------------------------------------------------------------------- submitting
def submit_run(kind: str, cfg, out, resume: str | None, wait: bool = False) -> dict | None:
    """Submit ``sdtl <kind>`` of ``cfg`` into ``out`` as one Slurm job. Checks everything a local run
    checks first. Returns None without ``wait``; with it, the job's result (raises if it failed)."""
    from sdtl.engine import config as cfgmod
    from sdtl.engine.rundir import resolve_resume

    cfgmod.validate_ranges(cfg)  # the slurm section included: nothing bad is submitted
    out = Path(out).resolve()
    resolve_resume(out, resume)  # a foreign folder, or a run without --resume: refused as locally
    if resume not in (None, "auto"):
        resume = str(Path(resume).resolve())
    folder = out / "slurm"
    executor = make_executor(folder, cfg.slurm, cfg.slurm.job_name or f"sdtl-{kind}-{out.name}")
    job = executor.submit(SlurmRun(kind, cfgmod.to_dict(cfg), str(out), resume))
    log_path = job.paths.stdout
    record_submission(folder, {"job_id": job.job_id, "kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "log": str(log_path), "result": str(job.paths.result_pickle)})
    tasks = cfg.slurm.nodes * tasks_per_node(cfg.slurm)
    print(f"submitted Slurm job {job.job_id}: sdtl {kind} -> {out} ({cfg.slurm.nodes} node(s), {tasks} task(s)); "
          f"log: {str(log_path).replace('%t', '0')}")
    if not wait:
        print(f"follow it with: squeue -j {job.job_id}; tail -f {str(log_path).replace('%t', '0')}")
        return None
    state, detail = wait_for(job.job_id, job.paths.result_pickle)
    return finished_result(job, state, detail, out)


def finished_result(job, state: str, detail: str, out: Path):
    if state == "done":
        return job.results()[0]  # rank 0's (the other ranks return None)
    if state == "stopped":
        raise RunInterrupted(f"Slurm job {job.job_id} ended before the run finished ({detail}); its state is in "
                             f"{out}/checkpoints/last.pt", checkpoint=out / "checkpoints" / "last.pt")
    raise RunFailed(f"Slurm job {job.job_id} {state}: {detail} (log: {str(job.paths.stdout).replace('%t', '0')})")
