"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd started in a temporary
folder with a generated slurm.conf (``shared/CLUSTER.md``: proctrack/linuxproc, task/none, this
machine's CPUs and hostname), their own munge socket and free ports, so nothing outside the folder is
touched. Stopped by the PIDs it started. :func:`start` returns a reason string where it cannot start
(not root, Slurm or munge not installed, a daemon that does not come up)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from process_helpers import stop_pid

DAEMONS = ("munged", "slurmctld", "slurmd")
TOOLS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")


@dataclass
class Cluster:
    root: Path
    env: dict
    pids: dict = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (empty once the controller forgot the job)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def release(self, job_id: str) -> None:
        """Start a requeued job now: Slurm holds one for ~2 minutes (EligibleTime) after a requeue."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root (the tests are not root)"
    for tool in (*DAEMONS, *TOOLS):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (apt-get install slurm-wlm munge: .ci/run does)"
    if not MUNGE_KEY.exists():
        return f"{MUNGE_KEY} is missing (the munge package creates it)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _pid(path: Path, timeout: float = 15.0) -> int | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.1)
    return None


def start(root: Path) -> Cluster | str:
    reason = _missing()
    if reason:
        return reason
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(exist_ok=True)
    munge_dir = root / "munge"
    munge_dir.mkdir(exist_ok=True)
    shutil.chown(munge_dir, "munge", "munge")
    munge_dir.chmod(0o755)  # munged: every directory above its socket must be searchable by all
    sock = munge_dir / "munge.sock"
    cluster = Cluster(root=root, env={})
    proc = subprocess.run(["runuser", "-u", "munge", "--", _binary("munged"), f"--socket={sock}",
                           f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                           f"--seed-file={munge_dir / 'munged.seed'}"], capture_output=True, text=True, timeout=30,
                          check=False)
    if proc.returncode != 0:
        return f"munged did not start: {proc.stderr.strip() or proc.stdout.strip()}"
    cluster.pids["munged"] = _pid(munge_dir / "munged.pid")

    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=sdtltest", f"SlurmctldHost={host}", "AuthType=auth/munge", f"AuthInfo=socket={sock}",
        "CredType=cred/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldLogFile={root / 'log' / 'ctld.log'}", f"SlurmdLogFile={root / 'log' / 'd.log'}",
        f"SlurmctldPidFile={root / 'ctld.pid'}", f"SlurmdPidFile={root / 'd.pid'}",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "SlurmUser=root", "ReturnToService=2",
        "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none", "KillWait=30", "MinJobAge=600",
        f"NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    cluster.env = {**os.environ, "SLURM_CONF": str(conf)}
    for daemon, pid_file in (("slurmctld", "ctld.pid"), ("slurmd", "d.pid")):
        proc = subprocess.run([_binary(daemon)], env=cluster.env, capture_output=True, text=True, timeout=60,
                              check=False)
        pid = _pid(root / pid_file)
        if proc.returncode != 0 or pid is None:
            stop(cluster)
            log = (root / "log" / ("ctld.log" if daemon == "slurmctld" else "d.log"))
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            return f"{daemon} did not start: {proc.stderr.strip()} {' | '.join(tail)}"
        cluster.pids[daemon] = pid
    deadline = time.time() + 30
    while time.time() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T", check=False).strip()
        if state in ("idle", "mixed", "allocated"):
            return cluster
        time.sleep(0.3)
    stop(cluster)
    return f"the node did not become idle within 30 s (sinfo: {state!r})"


def stop(cluster: Cluster) -> None:
    """Cancel every job of this cluster, then stop the daemons it started, by their PIDs."""
    if cluster.env:
        cluster.run("scancel", "--partition=debug", check=False)
        time.sleep(1)
    for name in ("slurmd", "slurmctld", "munged"):
        pid = cluster.pids.get(name)
        if pid:
            stop_pid(pid)
