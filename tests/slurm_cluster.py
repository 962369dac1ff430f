"""A real single-node SLURM cluster for the tests, from Debian's packages.

Brought up by hand (no systemd): munge, then ``slurmctld`` and ``slurmd`` with a
configuration in a temporary folder that ``SLURM_CONF`` points the clients at. The settings
that keep tests fast come from measurements on machines of this kind:
``MinJobAge=3600`` keeps finished jobs visible to ``squeue``, ``KillWait=5`` shortens a
cancel, ``AuthInfo=cred_expire=10`` lets a requeued job start within seconds.

This cluster keeps no accounting database, so ``sacct`` (which submitit asks for job
states) is stood in for by a script that reads the same states from ``squeue``.

Needs root and either the packages installed or apt-get to install them; otherwise
:func:`why_unavailable` says why, and the tests that need the cluster skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged"]

SACCT = """#!/bin/sh
# sacct stand-in for a cluster without accounting: JobID|State|NodeList rows from squeue
ids=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j) shift; ids="${ids:+$ids,}$1" ;;
  esac
  shift
done
echo "JobID|State|NodeList"
[ -n "$ids" ] && squeue -h -r --states=all -j "$ids" -o "%i|%T|%N" 2>/dev/null
exit 0
"""


def _have_binaries() -> bool:
    return all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES)


def why_unavailable() -> str | None:
    """None if a cluster can be brought up here (installing the packages if need be)."""
    if os.geteuid() != 0:
        return "SLURM's daemons need root to start"
    if _have_binaries():
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(install, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return f"apt-get could not install SLURM: {done.stderr.strip().splitlines()[-1:]}"
    return None if _have_binaries() else "SLURM's binaries are missing after the install"


class SlurmCluster:
    """One node, one partition; :meth:`stop` cancels every job and stops the daemons."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.bin = folder / "bin"
        self.env: dict[str, str] = {}
        self._munged_started = False

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        running = "".join(subprocess.run(["pgrep", "-a", "-r", "R,S,D", "-x", name], capture_output=True,
                                         text=True).stdout for name in ("slurmctld", "slurmd"))
        if running.strip():
            # its port is ours: the clients would talk to it, not to the cluster started here
            raise RuntimeError(f"a SLURM daemon is already running ({running.strip()}); stop it first")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        host = socket.gethostname().split(".")[0]
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        for sub in ("state", "spool", "log"):
            (self.folder / sub).mkdir(exist_ok=True)
        f = self.folder
        self.conf.write_text("\n".join([
            "ClusterName=vlbench-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root", "AuthType=auth/munge", "AuthInfo=cred_expire=10",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "ReturnToService=2", "MinJobAge=3600", "KillWait=5", "SchedulerParameters=kill_invalid_depend",
            f"StateSaveLocation={f}/state", f"SlurmdSpoolDir={f}/spool",
            f"SlurmctldPidFile={f}/slurmctld.pid", f"SlurmdPidFile={f}/slurmd.pid",
            f"SlurmctldLogFile={f}/log/slurmctld.log", f"SlurmdLogFile={f}/log/slurmd.log",
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        self.bin.mkdir(exist_ok=True)
        sacct = self.bin / "sacct"
        sacct.write_text(SACCT)
        sacct.chmod(sacct.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.env = {"SLURM_CONF": str(self.conf), "PATH": f"{self.bin}:{os.environ['PATH']}"}
        env = {**os.environ, **self.env}
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], check=True, env=env)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
            if state.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the SLURM node did not become idle in {timeout:.0f} s (logs in {f}/log)")

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # already running
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        self._munged_started = True

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env={**os.environ, **self.env})

    def stop(self) -> None:
        import pwd

        self.run("scancel", f"--user={pwd.getpwuid(os.getuid()).pw_name}")
        time.sleep(1)
        for name in ("slurmd", "slurmctld"):
            pid_file = self.folder / f"{name}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (OSError, ValueError):
                    pass
        deadline = time.time() + 15
        for name in ("slurmd", "slurmctld"):
            pid_file = self.folder / f"{name}.pid"
            while pid_file.is_file() and time.time() < deadline:
                try:
                    os.kill(int(pid_file.read_text().strip()), 0)
                except (OSError, ValueError):
                    break
                time.sleep(0.2)
        if self._munged_started:
            pid_file = Path("/run/munge/munged.pid")
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (OSError, ValueError):
                pass
