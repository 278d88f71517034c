"""A real PostgreSQL server for the tests (``shared/CLUSTER.md``): ``initdb`` as the postgres user in a
temporary folder, the server on a free loopback port, stopped by ``pg_ctl stop`` and then by the PID it
wrote. :func:`start` returns a reason string where it cannot start (not root, PostgreSQL not installed,
no Python driver)."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from process_helpers import stop_pid


@dataclass
class Server:
    root: Path
    bin: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://sdtl@127.0.0.1:{self.port}/postgres"


def _bin_dir() -> Path | None:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    return Path(dirs[-1]) if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, timeout=120,
                          check=False)


def start(root: Path) -> Server | str:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the test PostgreSQL runs as the postgres user, started by root (the tests are not root)"
    bindir = _bin_dir()
    if bindir is None or not (bindir / "initdb").exists():
        return "PostgreSQL is not installed (apt-get install postgresql: .ci/run does)"
    try:
        import psycopg  # noqa: F401 - SQLAlchemy 2.1's driver for postgresql:// URLs
    except ImportError:
        return "no PostgreSQL driver for SQLAlchemy (pip install 'psycopg[binary]': the test extra has it)"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    shutil.chown(root, "postgres")
    proc = _as_postgres(str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "sdtl")
    if proc.returncode != 0:
        return f"initdb failed: {proc.stderr.strip()[-300:]}"
    port = _free_port()
    proc = _as_postgres(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-w", "-l", str(root / "log"), "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    if proc.returncode != 0:
        log = (root / "log").read_text(errors="replace")[-300:] if (root / "log").exists() else ""
        return f"the server did not start: {proc.stderr.strip()[-300:]} {log}"
    return Server(root, bindir, port)


def stop(server: Server) -> None:
    pid_file = server.root / "data" / "postmaster.pid"
    pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
    _as_postgres(str(server.bin / "pg_ctl"), "-D", str(server.root / "data"), "-m", "fast", "-w", "stop")
    if pid is not None:
        stop_pid(pid, terminate=False, wait_s=5.0)  # pg_ctl asked it to stop; make sure it did
