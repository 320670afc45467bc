"""A real single-node Slurm (munge + slurmctld + slurmd) for the tests, under one temp dir.

Everything is private to the test session: munged serves its own socket with its own key,
slurm.conf (selected by SLURM_CONF, exported to every client the tests run) names free
non-default ports, and state, spool, PID and log files live under the temp dir. The daemons run
in the foreground as children of pytest and are stopped by their PIDs. Debian's ``slurm-wlm``
and ``munge`` packages provide the binaries (.ci/apt-packages.txt); without them the tests that
need Slurm skip, saying so.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = (
    "munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "squeue", "scancel",
)  # fmt: skip
START_TIMEOUT_S = 30.0
CANCEL_TIMEOUT_S = 30.0  # scancel, then the jobs' steps end (KillWait=5 below)


def missing_binaries() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _which(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    assert found, name
    return found


@dataclass
class SlurmCluster:
    """A running single-node cluster: ``env`` is what a Slurm client needs (SLURM_CONF)."""

    base: Path
    node: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log(self, name: str, n: int = 3000) -> str:
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.is_file() else f"(no {path})"

    def scontrol(self, *args: str) -> str:
        return subprocess.run(
            [_which("scontrol"), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout

    def _client(self, *args: str) -> subprocess.CompletedProcess | None:
        """A Slurm client command against this cluster (None if it could not run in time)."""
        try:
            return subprocess.run(
                [_which(args[0]), *args[1:]],
                env={**os.environ, **self.env},
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None

    def job_ids(self) -> list[str]:
        """Every job slurmctld still holds (pending, running or completing)."""
        done = self._client("squeue", "--noheader", "--format=%i")
        return done.stdout.split() if done is not None and done.returncode == 0 else []

    def cancel_jobs(self, timeout_s: float = CANCEL_TIMEOUT_S) -> list[str]:
        """scancel every job of this cluster by its id, then wait (at most ``timeout_s``) until
        slurmctld holds none: their steps have ended on every node. Every job on the cluster is
        this session's (its SLURM_CONF is private). A test that failed mid-way leaves its jobs
        running; stopping the daemons without this would leave their steps (slurmstepd and the
        training processes) running with no daemon to end them. Returns the ids cancelled."""
        ids = self.job_ids()
        if ids:
            self._client("scancel", *ids)
            deadline = time.monotonic() + timeout_s
            while self.job_ids() and time.monotonic() < deadline:
                time.sleep(0.5)
        return ids

    def stop(self) -> None:
        """Cancel the cluster's jobs while slurmctld runs (``cancel_jobs``), then stop every
        daemon by its PID (slurmd first, munged last)."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self.cancel_jobs()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _slurm_conf(base: Path, node: str, socket_path: Path, ports: list[int], cpus: int) -> str:
    return f"""\
ClusterName=fnetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SrunPortRange={ports[2]}-{ports[2] + 20}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
MinJobAge=10
JobRequeue=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _start_munge(base: Path) -> tuple[subprocess.Popen, Path]:
    """munged as the munge user, on its own socket with its own key."""
    mdir = base / "munge"
    mdir.mkdir()
    user = pwd.getpwnam("munge")
    key = mdir / "munge.key"
    subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, timeout=30)
    for path in (mdir, key):
        os.chown(path, user.pw_uid, user.pw_gid)
    key.chmod(0o600)
    mdir.chmod(0o755)  # munged insists that every client can reach its socket
    sock = mdir / "munge.socket"
    # As the munge user, in the foreground: the PID we hold is munged's own (no runuser/su in
    # between that might not pass the stop signal on).
    proc = subprocess.Popen(
        [_which("munged"), "-F", f"--socket={sock}", f"--key-file={key}",
         f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
         f"--seed-file={mdir}/munged.seed"],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        stdout=subprocess.DEVNULL,
        stderr=(base / "munged.out").open("w"),
    )  # fmt: skip
    _wait(lambda: sock.exists(), "munged socket", proc, mdir / "munged.log")
    return proc, sock


def _wait(ready, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{what} did not come up (rc={proc.poll()}):\n{tail}")
        time.sleep(0.2)


def start_cluster(cpus: int = 2) -> SlurmCluster:
    """Configure and start munge, slurmctld and slurmd; wait until the node is idle."""
    # /tmp, not pytest's 0700 tree: the munge user must reach its directory; short for sockets.
    base = Path(tempfile.mkdtemp(prefix="fnes", dir="/tmp"))
    base.chmod(0o755)
    (base / "state").mkdir()
    (base / "spool").mkdir()
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(base, node, {})
    try:
        cluster.procs["munged"], sock = _start_munge(base)
        conf = base / "slurm.conf"
        conf.write_text(_slurm_conf(base, node, sock, _free_ports(3), cpus))
        cluster.env = {"SLURM_CONF": str(conf)}
        env = {**os.environ, **cluster.env}
        for name, args in (("slurmctld", ["-D", "-c", "-i"]), ("slurmd", ["-D"])):
            cluster.procs[name] = subprocess.Popen(
                [_which(name), *args],
                env=env,
                stdout=(base / f"{name}.out").open("w"),
                stderr=subprocess.STDOUT,
            )
        _wait(
            lambda: "State=IDLE" in cluster.scontrol("show", "node", node, "--oneliner"),
            "the Slurm node",
            cluster.procs["slurmd"],
            base / "slurmd.log",
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One real single-node Slurm per test session, shared by every test that needs it."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing: apt-get install "
                    "slurm-wlm munge, as .ci/apt-packages.txt does)")  # fmt: skip
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(cluster.base)
