"""Two Slurm nodes on one machine: ``slurmd -N n1`` and ``slurmd -N n2`` with NodeAddr
127.0.0.2 / 127.0.0.3 (loopback addresses standing for two hosts), ``%n`` in their spool, PID
and log paths. The node names do not resolve: a rank that looked its rendezvous host up by name
instead of taking Slurm's NodeAddr would never meet the other. Both report the same host name,
so node identity must come from Slurm (SLURM_NODEID), not from the host.

The daemons are this module's children, stopped by their PIDs after every job left on the
cluster is cancelled by its id; jobs go through the same ``sbatch --wait`` helper as the
single-node cluster tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fne_dist.checkpoint.validation import list_checkpoints, validate
from fne_dist.distributed.launch import free_port
from tests.fixtures_prometheus import TargetWatch, every_family, target_lines
from tests.fixtures_slurm import (
    SlurmCluster,
    _free_ports,
    _slurm_conf,
    _start_munge,
    _wait,
    _which,
    missing_binaries,
)
from tests.test_cluster_slurm import (
    JOB_TIMEOUT_S,
    ROOT,
    TIME_LIMIT,
    assert_trained_two_ranks,
    job_env,
    submit,
)

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
        f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP "
        "OverSubscribe=YES"  # jobs that ask (--oversubscribe) run side by side
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
    """The cluster's jobs cancelled by their ids first (``SlurmCluster.cancel_jobs``, bounded:
    a test that failed mid-way leaves its jobs running), then every daemon by its PID: the
    slurmds, then slurmctld, then munged."""
    ctld = cluster.procs.get("slurmctld")
    if ctld is not None and ctld.poll() is None:
        cluster.cancel_jobs()
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


# Each launch script with one rank on each node: (script, engine, GPU option, variables). The
# DDP twin for srun and torchrun (the launch path is what is tested); the deepspeed script runs
# DeepSpeed. The GPU option overrides the script's own request (the test nodes have no GRES).
TWO_NODE_SCRIPTS = {
    "srun": ("srun.sbatch", "ddp", "--gpus-per-task=0", {}),
    "torchrun": ("torchrun.sbatch", "ddp", "--gpus-per-node=0", {"FNE_NPROC_PER_NODE": "1"}),
    "deepspeed": (
        "deepspeed.sbatch",
        "deepspeed",
        "--gpus-per-node=0",
        {"FNE_NPROC_PER_NODE": "1"},
    ),
}


SCRAPED_RUN = "tiny2n"  # run.name of the two-node torchrun job the session Prometheus scrapes


@pytest.fixture(scope="module")
def launched(
    two_nodes: SlurmCluster,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[dict]:
    """Every script of TWO_NODE_SCRIPTS submitted at once (``--oversubscribe``), so that their
    start-ups overlap; each test waits for its own. The torchrun job writes its discovery file
    where the session's Prometheus (where installed) looks, as the scripts do for a cluster's
    (FNE_PROM_TARGETS), and keeps /metrics up 4 s after training. Jobs left at teardown are
    cancelled."""
    prom = None
    with contextlib.suppress(pytest.skip.Exception):
        prom = request.getfixturevalue("prometheus")
    scraped = {
        "FNE_ARGS": f"run.name={SCRAPED_RUN} monitor.linger_s=4 monitor.port={free_port()}",
        **({"FNE_PROM_TARGETS": str(prom.targets)} if prom else {}),
    }
    work = tmp_path_factory.mktemp("two-node-jobs")
    opts = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--oversubscribe"]
    jobs: dict = {}
    for launch, (script, engine, gpus, extra) in TWO_NODE_SCRIPTS.items():
        more = {**extra, **scraped} if launch == "torchrun" else extra
        jobs[launch] = submit(two_nodes, work / launch, script, [*opts, gpus], engine, **more)
    jobs["torchrun"].run_dir = work / "torchrun" / "out" / SCRAPED_RUN
    jobs["prometheus"] = prom
    if prom is not None:
        job = jobs["torchrun"]
        jobs["torchrun_targets"] = TargetWatch(
            prom,
            "fne",
            lambda t: t["labels"].get("run") == SCRAPED_RUN,
            2,
            lambda: job.proc.poll() is None,
        )
    try:
        yield jobs
    finally:
        for job in (jobs[launch] for launch in TWO_NODE_SCRIPTS):
            if job.proc.poll() is None:
                job.timeout_s = 0.0  # cancels the job by its id
                job.wait()


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
@pytest.mark.parametrize("launch", sorted(TWO_NODE_SCRIPTS))
def test_scripts_on_two_nodes(two_nodes: SlurmCluster, launched: dict, launch: str) -> None:
    """Invariant: cluster/slurm/<launch>.sbatch with one rank on each of two Slurm nodes
    (names that do not resolve) meets at n1's NodeAddr, trains 2 ranks, and every checkpoint
    lists both ranks' files (rank 1's written on n2)."""
    assert "NodeAddr=127.0.0.2" in two_nodes.scontrol("show", "node", "n1", "--oneliner")
    job = launched[launch].wait()
    assert_trained_two_ranks(job)
    for step_dir in list_checkpoints(job.run_dir / "checkpoints"):
        files = validate(step_dir)["files"]
        assert {"rank-00000.json", "rank-00001.json", "rank-00001.safetensors"} <= set(files)
    if launch == "torchrun":
        assert "rendezvous 127.0.0.2:" in job.output, job.tail()
    if launch == "deepspeed":
        assert "n1 slots=1" in job.output and "n2 slots=1" in job.output, job.tail()


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_torchrun_on_two_nodes_is_scraped_at_each_nodes_address(launched: dict) -> None:
    """Invariant: torchrun.sbatch across two Slurm nodes binds each node's ranks' /metrics to
    that node's NodeAddr (not loopback 127.0.0.1, which no other host reaches) and writes the
    run's targets where the shipped prometheus.yml's "fne" job looks (FNE_PROM_TARGETS, here
    the session server's templated targets/); that real Prometheus scrapes one rank at
    127.0.0.2 and the other at 127.0.0.3 (both up, node labels 0 and 1) and receives every
    fne_* family from both ranks."""
    prom = launched["prometheus"]
    if prom is None:
        pytest.skip("prometheus (Debian package) not installed")
    targets = launched["torchrun_targets"].seen()
    done = launched["torchrun"].wait()
    print("\ntwo-node torchrun.sbatch job, Prometheus /api/v1/targets (job=fne):")
    print("\n".join(target_lines(targets)))
    assert len(targets) == 2 and all(t["health"] == "up" for t in targets), (targets, done.tail())
    # torchrun numbers the nodes in rendezvous order: either node may hold rank 0
    hosts = {t["labels"]["node"]: t["labels"]["instance"].split(":")[0] for t in targets}
    assert sorted(hosts.values()) == sorted(NODES.values()), hosts
    assert sorted(hosts) == ["0", "1"] and {t["labels"]["rank"] for t in targets} == {"0", "1"}
    assert_trained_two_ranks(done)
    print("\n".join(every_family(prom, f'job="fne", run="{SCRAPED_RUN}"', {"0", "1"})))


def _submit(env: dict[str, str], out: Path, options: list[str], wait: bool) -> tuple[str, int]:
    """sbatch srun.sbatch from the repository root; (job id, sbatch's exit code)."""
    cmd = ["sbatch", "--parsable", f"--output={out}", TIME_LIMIT, *options]
    done = subprocess.run(
        [*cmd, *(["--wait"] if wait else []), "cluster/slurm/srun.sbatch"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    return done.stdout.strip().split(";")[0], done.returncode


def _task_pid(job_id: str, procid: int) -> int | None:
    """The training process of task ``procid`` of ``job_id`` (from its environment)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={procid}".encode()}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if not proc.name.isdigit() or b"fne_dist.train" not in (proc / "cmdline").read_bytes():
                continue
            if want <= set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
    return None


def _until(ready, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    return bool(ready())


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 120)
def test_kill_a_rank_on_one_node_then_resubmit_resumes(
    two_nodes: SlurmCluster, tmp_path: Path
) -> None:
    """Invariant: rank 1 (on n2) killed mid-run after a checkpoint exists ends the job; a
    resubmission with checkpoint.resume=latest resumes on both nodes from that complete
    checkpoint and logs the remaining steps, continuing the step sequence to the end."""
    env = job_env(two_nodes, tmp_path, "ddp")
    env["FNE_ARGS"] = env["FNE_ARGS"].replace("train.epochs=0.02", "train.epochs=0.05")
    env["FNE_ARGS"] += " train.log_every=1 checkpoint.every_steps=2 checkpoint.keep_last=0"
    opts = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=0", "--cpus-per-task=1"]
    run_dir = tmp_path / "out" / "tiny"
    job, rc = _submit(env, tmp_path / "first.out", opts, wait=False)
    assert rc == 0 and job.isdigit(), job
    first = run_dir / "checkpoints" / "step-00000002" / "meta.json"
    assert _until(first.is_file, JOB_TIMEOUT_S), (tmp_path / "first.out").read_text()[-3000:]
    pid = _task_pid(job, 1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)
    assert _until(lambda: not two_nodes.scontrol("show", "job", job).count("RUNNING"), 120)
    before = (run_dir / "train_log.jsonl").read_text().splitlines()
    assert json.loads(before[-1])["step"] < 10, before[-1]

    env["FNE_ARGS"] += " checkpoint.resume=latest"
    _, rc = _submit(env, tmp_path / "second.out", opts, wait=True)
    second = (tmp_path / "second.out").read_text()
    assert rc == 0, second[-3000:]
    resumed = [ln for ln in second.splitlines() if "resumed from" in ln]
    assert resumed, second[-3000:]
    step = int(resumed[0].split("optimizer step ")[1].split(",")[0])
    assert step <= json.loads(before[-1])["step"], (step, before[-1])
    # the lines of steps the resumed run redid were dropped, so every step is there once
    after = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in after] == list(range(1, 11))
    print(f"\nrank 1 killed after step {json.loads(before[-1])['step']}; {resumed[0].strip()}")
    print(f"steps logged: {[h['step'] for h in after]}")


def _job_processes(job_id: str) -> list[int]:
    """PIDs of a job's live processes on this machine: its tasks (by SLURM_JOB_ID in their
    environment) and its slurmstepd daemons (by their title)."""
    title, var = f"slurmstepd: [{job_id}.".encode(), f"SLURM_JOB_ID={job_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if not proc.name.isdigit():
                continue
            ours = (proc / "cmdline").read_bytes().startswith(title) or var in (
                proc / "environ"
            ).read_bytes().split(b"\0")
            if ours and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(proc.name))
    return pids


@pytest.mark.timeout(240)
def test_teardown_cancels_running_jobs_before_stopping_the_daemons(tmp_path: Path) -> None:
    """Invariant: this module's teardown (``stop``) of a cluster on which a job still runs a
    step on both nodes (what a test that failed mid-way leaves) cancels the job by its id
    before it stops the daemons, within its bound: none of the job's processes (tasks,
    slurmstepd) outlive the cluster. (Anything left is killed by PID here, so a failure
    leaves nothing behind either.)"""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing)")
    cluster = start_two_nodes()
    job = ""
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", f"--output={tmp_path / 'job.out'}", TIME_LIMIT,
             "--nodes=2", "--ntasks-per-node=1", "--wrap", "srun sleep 600"],
            env={**os.environ, **cluster.env}, cwd=tmp_path, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        job = done.stdout.strip().split(";")[0]
        assert done.returncode == 0 and job.isdigit(), done.stderr
        sleeping = lambda: sum(  # noqa: E731
            b"sleep" in Path(f"/proc/{p}/cmdline").read_bytes()
            for p in _job_processes(job)
            if Path(f"/proc/{p}/cmdline").exists()
        )
        assert _until(lambda: sleeping() >= 2, 90), (tmp_path / "job.out").read_text()
    finally:
        t0 = time.monotonic()
        stop(cluster)
        stop_s = time.monotonic() - t0
        shutil.rmtree(cluster.base, ignore_errors=True)
    _until(lambda: not _job_processes(job), 5)  # the last ones exiting
    left = _job_processes(job)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    print(f"\nteardown with job {job} running on both nodes: {stop_s:.1f} s, {len(left)} left")
    assert not left, f"job {job} outlived the cluster: PIDs {left}"
