"""cluster/accelerate: the multi-node config starts every rank it asks for, and the
`accelerate launch --cpu --num_processes 2` form (which starts ONE process) is refused in one
line instead of training alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fne_dist.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = ROOT / "cluster" / "accelerate" / "multi_node.yaml"

pytestmark = pytest.mark.system


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "SLURM_", "MASTER_", "ACCELERATE_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    }
    env.update(
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        PYTHONPATH=str(ROOT),
        HF_HOME=str(tmp_path / "hf"),  # no user default_config.yaml
        HF_HUB_OFFLINE="1",
        GLOO_SOCKET_IFNAME="lo",
        DS_ACCELERATOR="cpu",
    )
    return env


def _train_args(tmp_path: Path) -> list[str]:
    return [
        "-m",
        "fne_dist.train",
        "--config",
        "tests/configs/tiny.yaml",
        f"run.output_dir={tmp_path}/out",
        f"data.cache_dir={tmp_path}/cache",
        "run.threads=1",
        "train.batch_size=8",
        "train.epochs=0.02",  # 4 steps at world size 2 (3 warm-up): launch paths, not training
        "engine.kind=ddp",
        "engine.device=cpu",
        "dist.rendezvous_timeout_s=120",
    ]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_multi_node_config_launches_two_ranks(tmp_path: Path) -> None:
    """Invariant: cluster/accelerate/multi_node.yaml with --num_machines 1 --num_processes 2
    starts 2 ranks that train together (world size 2 in metrics.json), on the CPU too."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIG)]
    cmd += ["--num_machines", "1", "--num_processes", "2", "--machine_rank", "0"]
    cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    out = subprocess.run(
        [*cmd, *_train_args(tmp_path)],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=360,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "rank 0/2 on cpu" in log and "on 2 rank(s)" in log, log[-4000:]
    assert (tmp_path / "out" / "tiny" / "metrics.json").is_file()


@pytest.mark.timeout(180)
def test_accelerate_cpu_with_two_processes_is_refused(tmp_path: Path) -> None:
    """Invariant: `accelerate launch --cpu --num_processes 2` (accelerate's simple launcher:
    one process) exits non-zero with one line naming the working forms, before training."""
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = subprocess.run(
        [*cmd, *_train_args(tmp_path)],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=150,
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(errors) == 1 and "--multi_gpu" in errors[0], out.stderr[-3000:]
    assert not (tmp_path / "out" / "tiny").exists()  # nothing started
