"""The momentum EMA under DeepSpeed ZeRO 1, 2 and 3 (docs/algorithm.md §5, "EMA under ZeRO-3").

Each stage runs ``tests/dist_scripts/zero_ema.py`` with ``torchrun --nproc_per_node 2`` on the
CPU (gloo, ``DS_ACCELERATOR=cpu``). The script does the checks on every rank and exits non-zero
if any rank failed. DeepSpeed's JIT-compiled comm op goes to the default torch-extensions cache,
shared by every run (~40 s cold, a few seconds warm).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fne_dist.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "zero_ema.py"
RUN_TIMEOUT_S = 150


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.system
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ema_matches_full_parameters_under_zero(stage: int) -> None:
    """Invariant: at ZeRO stage 1, 2 and 3, after every optimizer step of the training loop's
    step order, ``ema_update`` inside ``gathered_parameters(engine)`` gives on every rank a
    whole, non-zero momentum copy equal (bitwise) to p̂ ← m·p̂ + (1−m)·p computed from the full
    fp32 parameters held by DeepSpeed's optimizer, and identical across ranks. At stage 3 the
    module must really be partitioned outside forward (empty ``p.data``), so the test covers
    the bug where the EMA reads shards instead of whole parameters."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    cmd = [
        *_torchrun(),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        str(stage),
    ]
    # A session of its own, so that on timeout the launcher and both workers are killed.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"ZeRO-{stage} run timed out after {RUN_TIMEOUT_S} s:\n{output[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in output.splitlines() if "Warning" not in line]
    assert proc.returncode == 0, f"ZeRO-{stage} EMA check failed:\n" + "\n".join(lines[-60:])
    assert output.count(f"stage {stage}: 0 failure(s)") == 2, output[-4000:]
