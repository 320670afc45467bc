"""A bf16 DeepSpeed run with a trained batch-norm tower, end to end on the CPU: it trains,
evaluates, checkpoints and resumes exactly (`python -m fne_dist.train`, real DeepSpeed).

CI time: ZeRO-0 only (two runs of 6 steps, ~10 s of CPU each). ZeRO-1 (DeepSpeed's ZeRO
optimizer, whose checkpoints also hold the whole optimizer state) runs with FNE_ALL_ENGINES=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
pytestmark = pytest.mark.system

STAGES = [0, 1] if os.environ.get("FNE_ALL_ENGINES") == "1" else [0]


def _train(tmp: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    """6 steps of 16 pairs in bf16 (3 warm-up steps), checkpoints at 3 and 6, an evaluation at
    step 4 and the final one; the tiny image tower's first block (conv + batch norm) frozen, so
    a batch-norm layer reads its running statistics in every training step too."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return subprocess.run(
        [
            sys.executable, "-m", "fne_dist.train", "--config", str(TINY),
            f"run.output_dir={tmp}", f"run.name={name}", f"data.cache_dir={tmp / 'cache'}",
            "engine.precision=bf16", "model.image.train_blocks=1", "train.epochs=0.03",
            "train.log_every=1", "train.eval_every=4", "checkpoint.every_steps=3",
            "checkpoint.keep_last=0", *overrides,
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)  # two runs; a loaded machine slows them many times
@pytest.mark.parametrize("stage", STAGES)
def test_bf16_run_trains_evaluates_and_resumes_exactly(tmp_path: Path, stage: int) -> None:
    """Invariant: under engine.precision=bf16 (DeepSpeed casts the parameters to bf16, the
    batch-norm statistics stay fp32) a run with a trained tower trains with finite losses,
    evaluates at step 4 and at the end, saves checkpoints (at ZeRO-0 DeepSpeed's fp32 master
    weights are whole in its own files, so no whole-optimizer file; at ZeRO-1 the whole state
    is written), and resuming from step 3 in a new process repeats the losses of steps 4..6,
    the final weights and memory bit for bit; the weights and statistics saved are fp32."""
    zero = f"engine.zero_stage={stage}"
    run = _train(tmp_path, "straight", zero)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    straight = tmp_path / "straight"
    log = _log(straight)
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    metrics = json.loads((straight / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"] if "val" in h] == [4]  # then the final one
    assert metrics["test"]["rsum"] > 0
    step3 = straight / "checkpoints" / "step-00000003"
    assert (step3 / "optimizer.safetensors").is_file() == (stage > 0)
    weights = load_file(str(straight / "model.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    assert "image_backbone.trunk.1.running_mean" in weights  # the frozen block's statistics

    run = _train(tmp_path, "resumed", zero, f"checkpoint.resume={step3}")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    resumed = tmp_path / "resumed"
    again = {r["step"]: r["loss"] for r in _log(resumed) if "loss" in r}
    assert sorted(again) == [4, 5, 6]
    assert all(losses[s] == again[s] for s in again), (losses, again)
    for name in ("model.safetensors", "checkpoints/step-00000006/memory.safetensors"):
        x, y = load_file(str(straight / name)), load_file(str(resumed / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
