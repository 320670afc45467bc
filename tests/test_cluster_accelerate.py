"""cluster/accelerate: the `accelerate launch --cpu --num_processes 2` form (which starts ONE
process) is refused in one line instead of training alone. The multi-node config
(cluster/accelerate/multi_node.yaml) starts its 2 ranks in tests/test_launchers.py, where its
run must equal every other launcher's bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

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
