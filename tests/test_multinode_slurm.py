"""Two Slurm nodes on one machine: ``slurmd -N n1`` and ``slurmd -N n2`` with NodeAddr
127.0.0.2 / 127.0.0.3 (loopback addresses standing for two hosts), ``%n`` in their spool, PID
and log paths. The node names do not resolve: a rank that looked its rendezvous host up by name
instead of taking Slurm's NodeAddr would never meet the other. Both report the same host name,
so node identity must come from Slurm (SLURM_NODEID), not from the host.

The daemons are this module's children, stopped by their PIDs; jobs go through the same
``sbatch --wait`` helper as the single-node cluster tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fne_dist import checkpoint as ckpt
from tests.fixtures_slurm import (
    SlurmCluster,
    _free_ports,
    _slurm_conf,
    _start_munge,
    _wait,
    _which,
    missing_binaries,
)
from tests.test_cluster_slurm import JOB_TIMEOUT_S, assert_trained_two_ranks, sbatch

pytestmark = [pytest.mark.system, pytest.mark.slow]

NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3"}


def _two_node_conf(base: Path, host: str, sock: Path) -> str:
    """The single-node test config, with two nodes of one CPU each on their own addresses
    and ports, and per-node (``%n``) slurmd paths."""
    ports = _free_ports(5)
    conf = _slurm_conf(base, host, sock, ports[:3], 1)
    lines = [ln for ln in conf.splitlines() if not ln.startswith(("NodeName=", "PartitionName="))]
    lines = [
        ln.replace(f"{base}/spool", f"{base}/spool-%n")
        .replace(f"{base}/slurmd.pid", f"{base}/slurmd-%n.pid")
        .replace(f"{base}/slurmd.log", f"{base}/slurmd-%n.log")
        for ln in lines
    ]
    for (name, addr), port in zip(NODES.items(), ports[3:], strict=True):
        lines.append(
            f"NodeName={name} NodeHostname={host} NodeAddr={addr} Port={port} CPUs=1 "
            "RealMemory=2000 State=UNKNOWN"
        )
    lines.append(
        f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP"
    )
    return "\n".join(lines) + "\n"


def start_two_nodes() -> SlurmCluster:
    base = Path(tempfile.mkdtemp(prefix="fne2", dir="/tmp"))
    base.chmod(0o755)
    (base / "state").mkdir()
    host = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(base, "n1", {})
    try:
        cluster.procs["munged"], sock = _start_munge(base)
        conf = base / "slurm.conf"
        conf.write_text(_two_node_conf(base, host, sock))
        cluster.env = {"SLURM_CONF": str(conf)}
        env = {**os.environ, **cluster.env}
        daemons = {"slurmctld": ["-D", "-c", "-i"]}
        daemons |= {f"slurmd-{n}": ["-D", "-N", n] for n in NODES}
        for key, args in daemons.items():
            cluster.procs[key] = subprocess.Popen(
                [_which(key.split("-")[0]), *args],
                env=env,
                stdout=(base / f"{key}.out").open("w"),
                stderr=subprocess.STDOUT,
            )
        for name in NODES:
            _wait(
                lambda n=name: "State=IDLE" in cluster.scontrol("show", "node", n, "--oneliner"),
                f"Slurm node {name}",
                cluster.procs[f"slurmd-{name}"],
                base / f"slurmd-{name}.log",
            )
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: SlurmCluster) -> None:
    """Every daemon by its PID: the slurmds, then slurmctld, then munged."""
    for key in (*(f"slurmd-{n}" for n in NODES), "slurmctld"):
        proc = cluster.procs.pop(key, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    cluster.stop()  # what is left: munged


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[SlurmCluster]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing)")
    cluster = start_two_nodes()
    try:
        yield cluster
    finally:
        stop(cluster)
        with contextlib.suppress(OSError):
            shutil.rmtree(cluster.base)


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_srun_script_on_two_nodes(two_nodes: SlurmCluster, tmp_path: Path) -> None:
    """Invariant: cluster/slurm/srun.sbatch with one task on each of two Slurm nodes (names
    that do not resolve) meets at n1's NodeAddr, trains 2 ranks, and its checkpoints list
    both ranks' files."""
    assert "NodeAddr=127.0.0.2" in two_nodes.scontrol("show", "node", "n1", "--oneliner")
    job = sbatch(
        two_nodes,
        tmp_path / "srun",
        "srun.sbatch",
        ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=0", "--cpus-per-task=1"],
    )
    assert_trained_two_ranks(job)
    for step_dir in ckpt.list_checkpoints(job.run_dir / "checkpoints"):
        files = ckpt.validate(step_dir)["files"]
        assert {"rank-00000.json", "rank-00001.json", "rank-00001.safetensors"} <= set(files)
