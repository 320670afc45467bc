"""The rank environment, the rendezvous, device binding and the three timeouts.

Unit tests on environments written out as dicts (no launcher runs): torch-style variables,
an srun step's variables, an sbatch script's own shell (not a step), nothing at all. Two small
real checks start processes: a rank whose peer never comes gives up after the rendezvous
timeout, and a long barrier outlasts the per-step collective timeout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fne_dist.config import ConfigError, load_config
from fne_dist.distributed import launch
from fne_dist.distributed.device import cuda_index
from fne_dist.distributed.launch import (
    RankEnv,
    RendezvousError,
    Timeouts,
    free_port,
    init_process_group,
    rank_env,
    rendezvous,
)
from fne_dist.distributed.slurm import expand_hostlist, expand_tasks_per_node, job_port
from fne_dist.train import check_accelerate_world, check_launch, check_ray_job_paths

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def srun_env(procid: int, ntasks: int = 4, **extra: str) -> dict[str, str]:
    """What `srun` puts in each task of step 0 of job 4242 on gpu[01-02] (2 tasks per node)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % 2),
        "SLURM_NODEID": str(procid // 2),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_JOB_NODELIST": "gpu[01-02],login1",
        "SLURM_STEP_NODELIST": "gpu[01-02]",
        "SLURM_TASKS_PER_NODE": "2(x2),1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Slurm notations


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("node1", ["node1"]),
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("x[1,3],y[05-06]", ["x1", "x3", "y05", "y06"]),
    ],
)
def test_hostlist_expansion(text: str, hosts: list[str]) -> None:
    """Invariant: a Slurm host list expands to Slurm's hosts in Slurm's order (zero padding
    kept, several groups and bracketed names mixed), without calling scontrol."""
    assert expand_hostlist(text) == hosts


@pytest.mark.system
@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
@pytest.mark.parametrize("text", ["gpu[01-03,07]", "a,b[1-2],c", "gpu[098-101]", "n[1-2]-x[3-4]"])
def test_hostlist_expansion_agrees_with_scontrol(text: str, tmp_path: Path) -> None:
    """Invariant: our expansion equals `scontrol show hostnames` (Slurm's own; offline, it
    only needs a slurm.conf to read)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n")
    out = subprocess.run(
        ["scontrol", "show", "hostnames", text],
        capture_output=True,
        text=True,
        timeout=30,
        env={"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert expand_hostlist(text) == out.stdout.split()


@pytest.mark.parametrize("text", ["gpu[01-03", "gpu01-03]", "gpu[a-b]", "gpu[3-1]"])
def test_bad_hostlist_is_refused(text: str) -> None:
    """Invariant: a malformed host list is an error, never a wrong first host."""
    with pytest.raises(ValueError, match="Slurm host list"):
        expand_hostlist(text)


def test_tasks_per_node_expansion() -> None:
    """Invariant: `2(x3),1` means 2 tasks on each of 3 nodes then 1."""
    assert expand_tasks_per_node("2(x3)") == [2, 2, 2]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


# ---------------------------------------------------------------------------------------------
# rank environment


def test_torch_variables_win() -> None:
    """Invariant: torchrun/deepspeed/accelerate variables define the ranks, even inside an srun
    step (torchrun.sbatch runs torchrun under srun)."""
    env = {
        **srun_env(1),
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
    }
    assert rank_env(env) == RankEnv(5, 8, 1, "torch", 4, node_rank=1)  # 5 // 4 per node


def test_srun_step_variables() -> None:
    """Invariant: an srun task is rank SLURM_PROCID of SLURM_STEP_NUM_TASKS; its node's task
    count comes from the (step's) tasks-per-node list at SLURM_NODEID."""
    assert rank_env(srun_env(3)) == RankEnv(3, 4, 1, "slurm", 2, node_rank=1)  # SLURM_NODEID
    six = srun_env(4, 7, SLURM_NODEID="3", SLURM_STEP_TASKS_PER_NODE="2(x3),1")
    assert rank_env(six).local_world_size == 1
    six["SLURM_NODEID"] = "2"
    assert rank_env(six).local_world_size == 2


def test_sbatch_shell_is_not_a_rank() -> None:
    """Invariant: a process started directly in an sbatch script (SLURM_PROCID=0, SLURM_NTASKS=2
    but no srun step) is one process, not rank 0 of 2 waiting forever for rank 1."""
    env = srun_env(0, 2)
    del env["SLURM_STEP_NUM_TASKS"], env["SLURM_STEP_ID"]
    assert rank_env(env) == RankEnv(0, 1, 0, "none")
    assert rank_env({}) == RankEnv(0, 1, 0, "none")


# ---------------------------------------------------------------------------------------------
# rendezvous


@pytest.fixture
def fake_scontrol(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Node names resolve to 10.0.0.<n> as `scontrol show node` would say (NodeAddr)."""
    asked: list[str] = []

    def address(host: str) -> str:
        asked.append(host)
        return f"10.0.0.{int(host[-2:])}"

    monkeypatch.setattr(launch, "_node_address", address)
    return asked


def test_srun_rendezvous_is_derived_alike_on_every_rank(fake_scontrol: list[str]) -> None:
    """Invariant: without MASTER_*, every task of an srun step derives the same rendezvous: the
    first host of the step's node list at Slurm's address for it, a port from the job id in
    20000-29999 (below the ephemeral range)."""
    seen = {rendezvous(rank_env(srun_env(r)), srun_env(r)) for r in range(4)}
    assert len(seen) == 1
    (where,) = seen
    assert (where.addr, where.source) == ("10.0.0.1", "slurm")
    assert set(fake_scontrol) == {"gpu01"}
    assert 20000 <= where.port < 30000
    assert where.port == job_port("4242", "0") != job_port("4242", "1") != job_port("4243", "0")


def test_srun_rendezvous_respects_exported_variables(fake_scontrol: list[str]) -> None:
    """Invariant: an exported MASTER_ADDR / MASTER_PORT overrides the derived one."""
    env = srun_env(0, MASTER_ADDR="head", MASTER_PORT="1234")
    assert rendezvous(rank_env(env), env) == launch.Rendezvous("head", 1234, "environment")
    env = srun_env(0, MASTER_PORT="1234")
    assert rendezvous(rank_env(env), env).addr == "10.0.0.1"


def test_rendezvous_falls_back_to_the_node_name_without_scontrol(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Invariant: with no scontrol on PATH the first host's name is the address."""
    monkeypatch.setenv("PATH", "/nonexistent")
    launch._node_address.cache_clear()
    env = srun_env(0)
    assert rendezvous(rank_env(env), env).addr == "gpu01"


def test_multi_process_launch_without_rendezvous_fails_in_one_line() -> None:
    """Invariant: RANK/WORLD_SIZE for 2 processes without MASTER_* stops check_launch (before
    anything starts) with one line naming what is missing; a single process needs nothing."""
    cfg = load_config(TINY)
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    with pytest.raises(ConfigError) as err:
        check_launch(cfg, "inplace", env)
    assert "MASTER_ADDR and MASTER_PORT not set" in str(err.value)
    assert "\n" not in str(err.value)
    same_host = {**env, "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29400"}
    assert rendezvous(rank_env(same_host), same_host).addr == "127.0.0.1"
    check_launch(cfg, "local", {})  # one process: nothing to meet
    where = rendezvous(rank_env({}), {})
    assert where.source == "local" and where.port > 0


def test_one_task_srun_step_needs_no_derived_port() -> None:
    """Invariant: a one-task srun step (nobody to meet) takes a free loopback port, not the
    job-derived one that another one-task step of the same job might hold."""
    env = srun_env(0, 1)
    assert rendezvous(rank_env(env), env).source == "local"


def test_srun_step_without_node_list_fails_in_one_line() -> None:
    env = srun_env(0)
    del env["SLURM_STEP_NODELIST"], env["SLURM_JOB_NODELIST"]
    with pytest.raises(ConfigError, match="cannot derive the rendezvous"):
        rendezvous(rank_env(env), env)


# ---------------------------------------------------------------------------------------------
# devices, timeouts, launch-time checks


def test_cuda_index_when_a_task_sees_one_device() -> None:
    """Invariant: a rank binds to a device it can see: local_rank % visible (device 0 when it
    sees one, as under `srun --gpus-per-task=1`); no device at all is an error."""
    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [cuda_index(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError):
        cuda_index(0, 0)


def test_timeouts_come_from_their_own_config_fields() -> None:
    """Invariant: rendezvous, collective and long-barrier timeouts are three config fields."""
    cfg = load_config(
        TINY,
        [
            "dist.rendezvous_timeout_s=11",
            "dist.collective_timeout_s=22",
            "dist.barrier_timeout_s=33",
        ],
    )
    assert Timeouts.from_config(cfg) == Timeouts(11.0, 22.0, 33.0)
    default = Timeouts.from_config(load_config(TINY))
    assert default.collective_s < default.barrier_s
    with pytest.raises(ConfigError, match=r"dist\.barrier_timeout_s"):
        load_config(TINY, ["dist.barrier_timeout_s=0"])


def test_relative_outputs_under_a_ray_job_are_refused() -> None:
    """Invariant: under `ray job submit` (Ray's job variable set) a relative output, checkpoint
    or cache path is refused in one line naming each and what to pass; absolute ones pass; the
    same config outside a Ray job passes."""
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}
    cfg = load_config(TINY)
    with pytest.raises(ConfigError) as err:
        check_ray_job_paths(cfg, job)
    msg = str(err.value)
    assert "run.output_dir=runs" in msg and "data.cache_dir=.cache/features" in msg
    assert "absolute" in msg and "\n" not in msg
    check_ray_job_paths(cfg, {})
    ok = load_config(TINY, ["run.output_dir=/shared/runs", "data.cache_dir=/shared/cache"])
    check_ray_job_paths(ok, job)
    url = load_config(TINY, ["run.output_dir=/s/r", "data.cache_dir=/s/c", "checkpoint.dir=ck"])
    with pytest.raises(ConfigError, match=r"checkpoint.dir=ck"):
        check_ray_job_paths(url, job)


def test_accelerate_cpu_simple_launcher_with_several_processes_is_refused() -> None:
    """Invariant: the one process that `accelerate launch --cpu --num_processes 2` starts
    (MASTER_* and ACCELERATE_USE_CPU, no rank variables) refuses to train alone; one
    process (no MASTER_PORT) and real ranks (RANK/WORLD_SIZE) pass."""
    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(ConfigError, match="--multi_gpu"):
        check_accelerate_world(simple)
    check_accelerate_world({"ACCELERATE_USE_CPU": "True"})
    check_accelerate_world({**simple, "RANK": "0", "WORLD_SIZE": "2"})


def test_accelerate_mixed_precision_must_be_engine_precision() -> None:
    """Invariant: the mixed_precision that `accelerate launch` hands the process (from its
    config file or flag: ACCELERATE_MIXED_PRECISION) is never silently ignored: 'no' leaves
    engine.precision in charge, bf16/fp16 pass only when engine.precision says the same, and
    anything else is refused, each refusal naming engine.precision. The shipped
    cluster/accelerate/multi_node.yaml passes with the default config."""
    import yaml

    from fne_dist.train import ACCELERATE_PRECISION_VAR, check_accelerate_precision

    fp32, bf16 = load_config(TINY), load_config(TINY, ["engine.precision=bf16"])
    check_accelerate_precision(fp32, {})
    check_accelerate_precision(bf16, {ACCELERATE_PRECISION_VAR: "no"})
    check_accelerate_precision(bf16, {ACCELERATE_PRECISION_VAR: "bf16"})
    with pytest.raises(ConfigError, match=r"mixed_precision=bf16 .*engine.precision=bf16"):
        check_accelerate_precision(fp32, {ACCELERATE_PRECISION_VAR: "bf16"})
    with pytest.raises(ConfigError, match=r"mixed_precision=fp8 is not supported.*engine"):
        check_accelerate_precision(bf16, {ACCELERATE_PRECISION_VAR: "fp8"})
    shipped = yaml.safe_load((ROOT / "cluster" / "accelerate" / "multi_node.yaml").read_text())
    check_accelerate_precision(fp32, {ACCELERATE_PRECISION_VAR: shipped["mixed_precision"]})


def test_tensorboard_without_its_package_fails_at_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: report.tensorboard=true without the tensorboard package stops before any
    worker starts, with one line naming the extra to install."""
    from fne_dist import train

    monkeypatch.setattr(train, "tensorboard_available", lambda: False)
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "report.tensorboard=true"])
    with pytest.raises(ConfigError, match=r"fne_dist\[tensorboard\]"):
        check_launch(cfg, "local", {})


_TWO_RANKS = textwrap.dedent(
    """
    import sys, time
    import torch.distributed as dist
    from fne_dist import distributed as D
    from fne_dist.distributed.launch import RankEnv, Timeouts, init_process_group
    rank, port, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    init_process_group(RankEnv(rank, 2, rank, "torch", 2), "gloo", Timeouts(30, 2, 60))
    if rank == 0:
        time.sleep(5)  # longer than the collective timeout, shorter than the barrier one
    try:
        D.long_barrier() if kind == "long" else D.barrier()
        print("passed", flush=True)
    except Exception as err:
        print("timed out:", type(err).__name__, flush=True)
    os._exit(0)  # no teardown handshake with a peer that may have left
    """
)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_long_barrier_outlasts_the_collective_timeout(tmp_path: Path) -> None:
    """Invariant: a long barrier (cache build, upload) waits dist.barrier_timeout_s while a
    plain barrier gives up after dist.collective_timeout_s: rank 0 arrives 5 s late with a 2 s
    collective and a 60 s barrier timeout. (The two pairs of ranks run side by side.)"""
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS)
    env = {"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "PATH": "/usr/bin:/bin"}
    pairs = {}
    for kind in ("long", "plain"):
        port = str(free_port())
        pairs[kind] = [
            subprocess.Popen(
                [sys.executable, str(script), str(r), port, kind],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(2)
        ]
    outs = {kind: [p.communicate(timeout=100)[0] for p in procs] for kind, procs in pairs.items()}
    assert "passed" in outs["long"][1], outs
    assert "timed out" in outs["plain"][1], outs


@pytest.mark.timeout(60)
def test_missing_peer_fails_after_the_rendezvous_timeout() -> None:
    """Invariant: a rank whose rank 0 never comes gives up after dist.rendezvous_timeout_s (2 s
    here, not the 300 s collective timeout) with one RendezvousError line naming the address."""
    import os

    port = free_port()
    old = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t0 = time.monotonic()
    try:
        with pytest.raises(RendezvousError) as err:
            init_process_group(RankEnv(1, 2, 1, "torch", 2), "gloo", Timeouts(2.0, 300.0, 600.0))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)
    assert time.monotonic() - t0 < 60
    assert f"127.0.0.1:{port}" in str(err.value) and "\n" not in str(err.value)
