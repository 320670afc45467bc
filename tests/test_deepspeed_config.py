"""Your own DeepSpeed config (engine.deepspeed_config): merged with the keys our config owns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fne_dist.config import ConfigError, load_config
from fne_dist.engine import deepspeed_config
from fne_dist.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
# a subprocess run is a fresh single process, whatever launched pytest
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

ZERO3_OFFLOAD = {
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "stage3_param_persistence_threshold": 0,
        "overlap_comm": False,
    },
    "bf16": {"enabled": False, "immediate_grad_update": True},
    "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.98], "torch_adam": True}},
}


def _cfg(tmp_path: Path, user: dict | str, *overrides: str, name: str = "ds.json"):
    path = tmp_path / name
    path.write_text(user if isinstance(user, str) else json.dumps(user))
    return load_config(TINY, [f"engine.deepspeed_config={path}", *overrides])


def test_user_settings_pass_through_and_ours_fill_the_rest(tmp_path: Path) -> None:
    """Invariant: every DeepSpeed setting of the user's file reaches DeepSpeed unchanged
    (offload, bf16 options, ZeRO-3 settings, its optimizer and betas), merged key by key with
    ours; the keys our config owns take our values (batch, accumulation, clipping, precision,
    lr, weight decay: DeepSpeed's AdamW would otherwise decay by 0.01)."""
    cfg = _cfg(tmp_path, ZERO3_OFFLOAD, "engine.zero_stage=3", "engine.grad_accum=2")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {**ZERO3_OFFLOAD["zero_optimization"], "stage": 3}
    assert ds["bf16"] == {"enabled": False, "immediate_grad_update": True}
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"betas": [0.9, 0.98], "torch_adam": True, "lr": 1e-3, "weight_decay": 0.0},
    }
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 2.0 and ds["fp16"] == {"enabled": False}
    assert ds["timers"] == {"throughput": {"enabled": False}}  # ours, not overridden


def test_offload_without_an_optimizer_gets_deepspeeds_adamw_with_our_lr(tmp_path: Path) -> None:
    """Invariant: an offloaded optimizer must be DeepSpeed's own (it refuses a torch one), so a
    file that offloads without naming an optimizer gets AdamW with optim.lr and
    optim.weight_decay; YAML files read like JSON ones."""
    text = "zero_optimization:\n  stage: 2\n  offload_optimizer: {device: cpu}\n"
    cfg = _cfg(tmp_path, text, "engine.zero_stage=2", "optim.weight_decay=0.05", name="ds.yaml")
    assert deepspeed_config(cfg)["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-3, "weight_decay": 0.05},
    }
    plain = _cfg(tmp_path, {"zero_optimization": {"stage": 0, "overlap_comm": True}})
    assert "optimizer" not in deepspeed_config(plain)  # ours: a torch AdamW passed in


@pytest.mark.parametrize(
    ("user", "overrides", "line"),
    [
        (
            {"bf16": {"enabled": True}},
            [],
            "bf16.enabled=true conflicts with engine.precision=fp32",
        ),
        (
            {"train_micro_batch_size_per_gpu": 8},
            [],
            "train_micro_batch_size_per_gpu=8 conflicts with train.batch_size=16",
        ),
        (
            {"zero_optimization": {"stage": 3}},
            [],
            "zero_optimization.stage=3 conflicts with engine.zero_stage=0",
        ),
        (
            {"gradient_clipping": 1.0},
            [],
            "gradient_clipping=1.0 conflicts with optim.grad_clip=2.0",
        ),
        (
            {"optimizer": {"type": "Adam", "params": {"lr": 3e-4}}},
            [],
            "optimizer.params.lr=0.0003 conflicts with optim.lr=0.001",
        ),
        (
            {"train_batch_size": 32},
            ["engine.grad_accum=2"],
            "train_batch_size=32 conflicts with train.batch_size × engine.grad_accum × ranks "
            "= 16 × 2 × 2",
        ),
        (
            {"scheduler": {"type": "WarmupLR"}},
            [],
            'scheduler={"type": "WarmupLR"} conflicts with optim.schedule=cosine',
        ),
    ],
)
def test_a_conflict_is_one_line_naming_both_values(
    tmp_path: Path, user: dict, overrides: list[str], line: str
) -> None:
    """Invariant: a setting our config owns that the user's file sets to another value is
    refused in one line naming the file, the DeepSpeed key with its value and our key with
    ours; values that agree (2 and 2.0, true and true) are no conflict."""
    cfg = _cfg(tmp_path, user, *overrides)
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg, world_size=2)
    message = str(err.value)
    assert "\n" not in message and line in message, message
    assert message.startswith(f"engine.deepspeed_config={tmp_path / 'ds.json'}: ")
    agree = _cfg(tmp_path, {"gradient_clipping": 2, "bf16": {"enabled": False}})
    assert deepspeed_config(agree, world_size=2)["gradient_clipping"] == 2


def test_the_conflict_stops_the_launch_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: `python -m fne_dist.train` refuses a conflicting file before anything starts:
    exit 2, one line on stderr naming both values; a missing file is one line too."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    args = ["--config", str(TINY), f"run.output_dir={tmp_path}", f"engine.deepspeed_config={path}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: engine.deepspeed_config={path}: bf16.enabled=true conflicts with "
        "engine.precision=fp32: remove it from the file, or set ours to the same value"
    ]
    assert main([*args[:-1], f"engine.deepspeed_config={tmp_path / 'none.json'}"]) == 2
    assert capsys.readouterr().err.strip().endswith("none.json: no such file")
    ddp = [*args, "engine.kind=ddp"]
    assert main(ddp) == 2
    assert "needs engine.kind=deepspeed" in capsys.readouterr().err


def _train(tmp: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m fne_dist.train` on the tiny config (6 steps of 16; the first 3 warm up)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return subprocess.run(
        [
            sys.executable, "-m", "fne_dist.train", "--config", str(TINY),
            f"run.output_dir={tmp}", f"run.name={name}", f"data.cache_dir={tmp / 'cache'}",
            "train.epochs=0.03", "train.log_every=1", "checkpoint.every_steps=3",
            "checkpoint.keep_last=0", *overrides,
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.system
@pytest.mark.timeout(1200)  # two runs; a loaded machine slows them many times
def test_zero3_with_cpu_offload_from_a_user_json_resumes_exactly(tmp_path: Path) -> None:
    """Invariant: a ZeRO-3 run whose optimizer is offloaded to the CPU by the user's own
    DeepSpeed JSON (and whose optimizer DeepSpeed builds from it) saves the resolved DeepSpeed
    config in its run directory, and resuming from its step-3 checkpoint in a new process
    repeats the losses of steps 4..6, the final weights and the memory bit for bit, as the
    built-in stages do (tests/test_checkpoint.py)."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps(ZERO3_OFFLOAD))
    common = (f"engine.deepspeed_config={user}", "engine.zero_stage=3")
    run = _train(tmp_path, "straight", *common)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    straight = tmp_path / "straight"
    resolved = json.loads((straight / "deepspeed_config.json").read_text())
    assert resolved["zero_optimization"]["offload_optimizer"] == {
        "device": "cpu",
        "pin_memory": False,
    }
    assert resolved["optimizer"]["params"]["lr"] == 1e-3
    engine_files = {p.name for p in (straight / "checkpoints" / "step-00000003").rglob("*.pt")}
    assert "zero_pp_rank_0_mp_rank_00_model_states.pt" in engine_files  # ZeRO-3's layout
    start = straight / "checkpoints" / "step-00000003"
    run = _train(tmp_path, "resumed", *common, f"checkpoint.resume={start}")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    a, b = _losses(straight), _losses(tmp_path / "resumed")
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [4, 5, 6]
    assert all(a[s] == b[s] for s in b), (a, b)
    for name in ("model.safetensors", "checkpoints/step-00000006/memory.safetensors"):
        x, y = load_file(str(straight / name)), load_file(str(tmp_path / "resumed" / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
