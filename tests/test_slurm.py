"""``--slurm`` against a real single-node Slurm (tests/slurm_cluster.py starts munged, slurmctld and
slurmd in a temporary folder; the tests skip with the reason where it cannot start):

* bad ``slurm.*`` values are refused before anything is submitted (no cluster needed);
* a tiny fine-tune job: the resources of the ``slurm`` section reach sbatch, ``--wait`` exits 0 and the
  job's run equals the same run made locally;
* a 2-task CPU (gloo) DDP job across 2 Slurm tasks, the process group set up from Slurm's environment;
* a run preempted mid-epoch (``scancel --signal=USR1``: it writes its state and requeues itself), then
  requeued from outside mid-epoch (``scontrol requeue``: SIGTERM), ends bit-identical to an
  uninterrupted local run;
* a 2x2 sweep as a job array: ``--status`` shows each run's state; re-running the command submits only
  the missing run, then writes the summary.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_cluster
from process_helpers import started_in_a_temp_folder
from test_stop_and_resume import learning_record, load, mid_epoch_position

pytestmark = pytest.mark.slow
CPU_JOB = ["slurm.gpus_per_node=0", "slurm.cpus_per_task=1", "slurm.time=20", "run.progress=false"]


def sdtl(*args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sdtl", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"sdtl {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def cluster():
    yield from started_in_a_temp_folder("sdtl-slurm-", "Slurm cluster", slurm_cluster.start, slurm_cluster.stop)


def job_id_of(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("submitted Slurm job "):
            return line.split()[3].rstrip(":")
    raise AssertionError(f"no job id in: {stdout}")


def wait_until(cond, what: str, timeout: float = 300, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------ no cluster needed
@pytest.mark.parametrize("bad,named", [
    ("slurm.time=soon", "slurm.time"), ("slurm.extra=[nodes=2]", "slurm.extra"),
    ("slurm.mem=lots", "slurm.mem"), ("slurm.signal_delay_s=7200", "slurm.signal_delay_s"),
    ("slurm.tasks_per_node=3", "slurm.tasks_per_node"), ("slurm.nodes=0", "slurm.nodes")])
def test_bad_slurm_values_are_refused_before_anything_is_submitted(tiny_synth, tmp_path, bad, named):
    out = tmp_path / "run"
    extra = ["slurm.gpus_per_node=2"] if "tasks_per_node" in bad else []
    proc = sdtl("finetune", "--config", "synthetic_tiny", "--out", str(out), "--slurm",
                *sets(f"data.root={tiny_synth}", "slurm.time=60", *extra, bad), check=False)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()  # nothing submitted, nothing written


def test_wait_without_slurm_is_refused(tiny_synth, tmp_path):
    proc = sdtl("finetune", "--config", "synthetic_tiny", "--out", str(tmp_path / "r"), "--wait",
                *sets(f"data.root={tiny_synth}"), check=False)
    assert proc.returncode == 2 and "--slurm" in proc.stderr


def test_slurm_section_is_not_part_of_a_runs_identity():
    from sdtl.engine.config import load_config, to_dict
    from sdtl.engine.rundir import config_changes

    a = to_dict(load_config("synthetic_tiny", ["slurm.time=10"]))
    b = to_dict(load_config("synthetic_tiny", ["slurm.time=20", "slurm.partition=gpu"]))
    assert config_changes(a, b) == []
    c = to_dict(load_config("synthetic_tiny", ["optim.lr=0.5"]))
    assert config_changes(a, c) == [f"optim.lr: {a['optim']['lr']!r} -> 0.5"]


# ---------------------------------------------------------------------------------- on the cluster
def test_tiny_finetune_job_gets_its_resources_and_equals_a_local_run(cluster, tiny_synth, tmp_path):
    common = ["finetune", "--config", "synthetic_tiny", "--deterministic",
              *sets(f"data.root={tiny_synth}", "optim.epochs=2", "run.threads=1", "data.workers=0")]
    local = tmp_path / "local"
    sdtl(*common, "--out", str(local))
    out = tmp_path / "job"
    proc = subprocess.Popen([sys.executable, "-m", "sdtl", *common, "--out", str(out), "--slurm", "--wait",
                             *sets(*CPU_JOB, "slurm.time=0-00:07:00", "slurm.job_name=tiny-ft",
                                   "slurm.extra=[comment=sdtl-test]")],
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    job_id = job_id_of(first)
    info = wait_until(lambda: cluster.job(job_id) or None, "the job to be known")
    assert info["JobName"] == "tiny-ft" and info["TimeLimit"] == "00:07:00" and info["NumNodes"].startswith("1")
    assert info["Comment"] == "sdtl-test"
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    assert "video acc@1" in stdout
    log = (out / "slurm" / job_id / f"{job_id}_0_log.out").read_text()
    assert "1 process(es) on cpu" in log
    assert learning_record(out) == learning_record(local)
    assert json.loads((out / "results.json").read_text())["video_acc1"] == \
        json.loads((local / "results.json").read_text())["video_acc1"]


def test_two_slurm_tasks_run_one_gloo_ddp_job(cluster, tiny_synth, tmp_path):
    out = tmp_path / "ddp"
    sdtl("finetune", "--config", "synthetic_tiny", "--out", str(out), "--slurm", "--wait",
         *sets(f"data.root={tiny_synth}", "optim.epochs=1", "data.workers=0", "run.threads=1", *CPU_JOB,
               "slurm.tasks_per_node=2"), env=cluster.env)
    job_id = json.loads((out / "slurm" / "jobs.jsonl").read_text().splitlines()[0])["job_id"]
    rank0 = (out / "slurm" / job_id / f"{job_id}_0_log.out").read_text()
    assert "2 process(es) on cpu" in rank0, rank0[-2000:]
    assert (out / "slurm" / job_id / f"{job_id}_1_log.out").exists()  # the second task ran too
    assert (out / "results.json").exists()


def test_pretraining_job_writes_the_encoder_finetune_loads(cluster, tiny_synth, tmp_path):
    out = tmp_path / "pre"
    proc = sdtl("pretrain", "--config", "synthetic_tiny_pretrain", "--out", str(out), "--slurm", "--wait",
                *sets(f"data.root={tiny_synth}", "optim.epochs=1", "data.workers=0", *CPU_JOB), env=cluster.env)
    encoder = out / "checkpoints" / "encoder.pt"
    assert f"encoder checkpoint: {encoder}" in proc.stdout, proc.stdout
    assert load(encoder)["sdtl_format"] == "pretrain"


def test_preempted_and_requeued_mid_epoch_ends_bit_identical(cluster, tiny_synth, tiny_encoder, tmp_path):
    # SD with a mid-epoch teacher refresh and dropout: a resume that lost any state would show.
    common = ["finetune", "--config", "synthetic_tiny", "--deterministic",
              *sets(f"data.root={tiny_synth}", f"model.pretrained={tiny_encoder}", "optim.epochs=3", "run.threads=1",
                    "regularizer.snapshot_every=3", "model.dropout=0.5", "data.workers=0", "data.batch_size=2")]
    ref = tmp_path / "ref"
    sdtl(*common, "--out", str(ref))
    out = tmp_path / "job"
    # checkpoints after every step only to see where the run is; the signals write their own
    proc = sdtl(*common, "--out", str(out), "--slurm", *sets(*CPU_JOB, "run.checkpoint_every_steps=1"),
                env=cluster.env)
    job_id = job_id_of(proc.stdout)
    interrupted = []
    for how in ("preempt", "requeue"):
        start = wait_until(lambda: mid_epoch_position(out), "a mid-epoch checkpoint")
        wait_until(lambda start=start: (mid_epoch_position(out) or start) != start, "the next step")
        restarts = int(cluster.job(job_id).get("Restarts", 0))
        if how == "preempt":  # what Slurm sends before a time limit or a preemption
            cluster.run("scancel", "--signal=USR1", job_id)
        else:  # an operator's requeue: SIGTERM to the job's tasks
            cluster.run("scontrol", "requeue", job_id)
        wait_until(lambda before=restarts: int(cluster.job(job_id).get("Restarts", 0)) > before,
                   "the job to be requeued")
        wait_until(lambda: cluster.job(job_id).get("JobState") == "PENDING", "the requeued job to be pending")
        interrupted.append(mid_epoch_position(out))
        wait_until(lambda: cluster.release(job_id) or cluster.job(job_id).get("JobState") != "PENDING",
                   "the requeued job to start", timeout=200, poll=1)
    log = (out / "slurm" / job_id / f"{job_id}_0_log.out")
    wait_until(lambda: (out / "results.json").exists(), "the requeued job to finish", timeout=600, poll=0.5)
    text = log.read_text()
    assert "training stopped by SIGUSR1" in text and "training stopped by SIGTERM" in text, text[-3000:]
    assert sum(p is not None for p in interrupted) == 2, interrupted  # both stops landed inside an epoch
    assert int(cluster.job(job_id)["Restarts"]) == 2
    a, b = load(out / "checkpoints" / "last.pt")["model"], load(ref / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"stopped at {interrupted}"
    assert learning_record(out) == learning_record(ref)


def test_sweep_as_a_job_array_then_only_the_missing_run(cluster, tiny_synth, tmp_path):
    out = tmp_path / "sweep"
    cmd = ["sweep", "--config", "synthetic_tiny", "--grid", "regularizer.weight=0,1", "--seeds", "2", "--out", str(out),
           "--slurm", *sets(f"data.root={tiny_synth}", "optim.epochs=1", "data.workers=0", "run.threads=1", *CPU_JOB,
                            "slurm.array_parallelism=2")]
    first = sdtl(*cmd, env=cluster.env)
    assert "submitted Slurm job array" in first.stdout and "4 run(s)" in first.stdout
    rows = [json.loads(x) for x in (out / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({r["job_id"].split("_")[0] for r in rows}) == 1  # one array
    array = rows[0]["job_id"].split("_")[0]
    assert "%2" in cluster.run("scontrol", "show", "job", array)  # at most 2 at a time ("ArrayTaskThrottle=2")
    status = sdtl("sweep", "--status", str(out), env=cluster.env).stdout
    assert all(name in status for name in ("regularizer.weight=0/seed0", "regularizer.weight=1/seed1"))
    assert any(state in status for state in ("queued", "running", "done"))

    def all_done():
        text = sdtl("sweep", "--status", str(out), env=cluster.env).stdout
        return text if "4 done" in text else None

    wait_until(all_done, "every run of the array", timeout=600, poll=2)
    # a run is done when its results.json is written; its job may still be closing its files
    wait_until(lambda: not cluster.run("squeue", "-h", "-j", array, check=False).strip(), "the array's jobs to end",
               poll=0.5)
    import shutil

    shutil.rmtree(out / "runs" / "regularizer.weight=1" / "seed0")  # a run lost (or never made)
    second = sdtl(*cmd, "--wait", env=cluster.env)
    assert "1 run(s)" in second.stdout, second.stdout
    assert (out / "sweep.md").exists() and "regularizer.weight" in (out / "sweep.md").read_text()
    assert "4 done" in sdtl("sweep", "--status", str(out), env=cluster.env).stdout


def test_tune_workers_as_a_job_array_share_one_study(cluster, tiny_synth, tmp_path):
    out = tmp_path / "tune"
    proc = sdtl("tune", "--config", "synthetic_tiny", "--space", "regularizer.weight=log:0.01:100", "--trials", "4",
                "--out", str(out), "--slurm", "--workers", "2", "--wait",
                *sets(f"data.root={tiny_synth}", "optim.epochs=2", "data.workers=0", "run.threads=1",
                      "run.tensorboard=false", *CPU_JOB), env=cluster.env)
    assert "2 tune worker(s)" in proc.stdout and "Best on validation" in proc.stdout, proc.stdout
    summary = json.loads((out / "tune.json").read_text())
    done = [t for t in summary["trials"] if t["state"] in ("complete", "pruned")]
    assert len(done) in (4, 5) and len({t["run_dir"] for t in done}) == len(done)
    assert len({t["worker"] for t in done}) == 2, done  # both array jobs took trials
    assert (out / "best.yaml").exists()
