"""A real SLURM cluster on this one host, for tests: munged, slurmctld and two slurmd nodes (``n1``, ``n2``).

Everything lives in one folder (config, keys, sockets, state, spool, logs), so nothing of the host's own SLURM or
munge setup is read or changed, and ``SLURM_CONF`` in a job's environment selects this cluster. The daemons run as
root (CI does); ``stop`` shuts them all down and checks that none is left. Needs Debian's ``slurmctld slurmd
slurm-client munge`` (``scripts/setup.sh --test`` installs them).

Settings that matter (measured on slurm 22.05): ``cred_expire=10`` cuts the wait before a requeued job may start
again from ~150 s to ~20 s; ``config_overrides`` lets two nodes of 2 CPUs share a 2-core host; no accounting, so a
job's state is read with ``scontrol show job`` (kept ``MinJobAge`` seconds after it ends).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"})


def available() -> str | None:
    """Why no cluster can start here (a missing program, not root), or None."""
    missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(name) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian: slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    return None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@dataclass
class Cluster:
    root: Path
    env: dict[str, str] = field(default_factory=dict)  # the environment of a shell on this cluster's login node

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def submit(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """``sbatch --parsable ARGS`` from ``cwd``; the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"sbatch {' '.join(args)} failed: {result.stderr}"
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, states: frozenset[str] = FINAL_STATES, timeout: float = 300) -> dict[str, str]:
        """Poll the job until its state is one of ``states``; its last record."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job.get('JobState')} after {timeout:.0f} s"
            time.sleep(0.5)

    def stop(self) -> None:
        """Shut every daemon down and check that none is left."""
        self.run("scontrol", "shutdown", check=False, timeout=30)
        for pid_file in [self.root / "slurmctld.pid", *(self.root / f"slurmd-{node}.pid" for node in NODES)]:
            wait_gone(pid_file)
        subprocess.run(
            ["munged", "--stop", f"--socket={self.root / 'munge' / 'munge.socket'}"],
            capture_output=True,
            timeout=30,
        )
        wait_gone(self.root / "munge" / "munged.pid")
        left = running_daemons(self.root)
        assert not left, f"daemons of the test cluster still running: {left}"


def pid_of(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid_file: Path, timeout: float = 20) -> None:
    """Wait for the daemon of ``pid_file`` to exit; kill it if it will not."""
    pid = pid_of(pid_file)
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, 9)


def running_daemons(root: Path) -> list[str]:
    """The processes whose command line names this cluster's folder (daemons, job steps)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline and any(name in cmdline for name in DAEMONS):
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def slurm_conf(root: Path, ports: list[int], cpus: int) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={cpus} RealMemory=4000 State=UNKNOWN"
        for node, port in zip(NODES, ports[1:], strict=True)
    )
    return f"""\
ClusterName=lightning-compress-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / "munge" / "munge.socket"},cred_expire=10
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}/%n
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=10
{nodes}
PartitionName=cpu Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def start(root: Path, cpus_per_node: int = 2, timeout: float = 60) -> Cluster:
    """munged, slurmctld and the two slurmd, configured under ``root``; returns once both nodes are idle."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    munge = root / "munge"
    munge.mkdir(mode=0o755, exist_ok=True)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for folder in ("state", "spool"):
        (root / folder).mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, free_ports(1 + len(NODES)), cpus_per_node))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(root=root, env=env)

    def daemon(*args: str) -> None:
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}): {result.stderr}"

    daemon(
        "munged",
        "--force",
        f"--socket={munge / 'munge.socket'}",
        f"--key-file={key}",
        f"--pid-file={munge / 'munged.pid'}",
        f"--log-file={munge / 'munged.log'}",
        f"--seed-file={munge / 'munged.seed'}",
    )
    try:
        daemon("slurmctld", "-f", str(conf))
        for node in NODES:
            daemon("slurmd", "-f", str(conf), "-N", node)
        deadline = time.monotonic() + timeout
        while True:
            states = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False).stdout.split()
            if states.count("idle") == len(NODES):
                return cluster
            if time.monotonic() > deadline:
                log = root / "slurmctld.log"
                logs = log.read_text()[-2000:] if log.exists() else ""
                raise AssertionError(f"the test cluster's nodes are {states} after {timeout:.0f} s\n{logs}")
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise
