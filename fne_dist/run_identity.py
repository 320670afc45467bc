"""Run identity: a new submission never silently becomes an old run.

The policy, in one place:

* A restart of the SAME run resumes from its newest checkpoint by itself: Ray Train's
  restart of a worker group after a failure (Ray hands the checkpoint back), a Slurm job
  requeued after preemption or a node failure (same job id, ``SLURM_RESTART_COUNT`` > 0), a
  torchrun elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0).
* Anything else resumes only when ``checkpoint.resume`` says so.
* A new submission whose run directory already holds a run (checkpoints, a finished run's
  metrics.json, or Ray's storage for that name) and that does not ask to resume fails before
  anything starts, with one line naming the directory and both ways out (resume it, or pick
  another run.name). It never starts over on top of the old run, and never resumes it unasked.
* A launcher's restart of a run that wrote no checkpoint yet (a Slurm job pre-empted before its
  first one) starts it afresh.
* A resumed run may change only the settings its checkpoint's state does not depend on:
  ``RESUME_MUST_MATCH`` lists the others (each refused in one line naming both values), and
  the data position is reused only for the same training shards (``shard_fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint.format import CheckpointError
from .config import Config, ConfigError, config_to_dict, load_config
from .paths import writable_dir_problem

RESTART_VARS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


def restart_of_same_run(environ: Mapping[str, str] | None = None) -> str | None:
    """The variable saying this process is a launcher's restart of the same run, else None."""
    env = os.environ if environ is None else environ
    for var in RESTART_VARS:
        if env.get(var, "0").strip().isdigit() and int(env.get(var, "0")) > 0:
            return var
    return None


def resume_request(cfg: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """What to resume from, by policy: ``checkpoint.resume`` when given; ``latest`` when a
    launcher restarted this same run (Slurm requeue, torchrun restart); else nothing.
    (Ray's own restart is recognised by the checkpoint Ray hands back, in the loop.)"""
    if cfg.checkpoint.resume:
        return cfg.checkpoint.resume
    return "latest" if restart_of_same_run(environ) else None


def previous_run_evidence(cfg: Config) -> list[str]:
    """What in the run's directories shows that a run with this name already ran there."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    found = []
    if (run_dir / "metrics.json").is_file():
        found.append(str(run_dir / "metrics.json"))
    if "://" not in str(cfg.checkpoint.dir or "") and ckpt_dir.is_dir():
        found += [str(p) for p in sorted(ckpt_dir.glob("step-*"))[-1:]]
    ray_dir = Path(cfg.run.output_dir) / "ray" / cfg.run.name
    if ray_dir.is_dir() and any(ray_dir.iterdir()):
        found.append(str(ray_dir))
    return found


def check_new_run(cfg: Config, environ: Mapping[str, str] | None = None) -> None:
    """Refuse (one line) a new run whose name already holds a run and that does not resume."""
    if resume_request(cfg, environ) is not None:
        return
    found = previous_run_evidence(cfg)
    if found:
        raise ConfigError(
            f"run.name={cfg.run.name} already holds a run in {cfg.run.output_dir} "
            f"({', '.join(found)}): pass checkpoint.resume=latest to continue it, or a new "
            "run.name to start another"
        )


def check_writable(cfg: Config) -> None:
    """Refuse (one line) a run whose run directory or local checkpoint.dir cannot be written,
    at launch: otherwise it trains and fails at its first checkpoint or at the very end."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    targets = [("run.output_dir", cfg.run.output_dir, run_dir)]
    if "://" not in str(cfg.checkpoint.dir or ""):
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        targets.append(("checkpoint.dir", str(ckpt_dir), ckpt_dir))
    for key, value, path in targets:
        problem = writable_dir_problem(path)
        if problem is not None:
            where = "" if str(path) == value else f" (the run directory {path})"
            raise ConfigError(f"{key}={value} is not a writable directory{where}: {problem}")


# What a resumed run may change, in one table. A setting listed here (or in a listed section)
# must equal the checkpoint's: the restored state was built for that value, and a new one would
# be silently ignored or misapplied. Every other setting takes its new value from the next step
# on: the loss and FNE settings, memory.momentum, train.epochs and the lr schedule's shape
# (optim.schedule, milestones, gamma, warmup_steps: the schedule is rebuilt from the config and
# continues at the checkpoint's step), logging, evaluation, checkpointing, monitoring, paths,
# timeouts. (train.batch_size, engine.grad_accum, data.loader_workers, the world size and
# memory.size are checked against the checkpoint's layout when it loads.) engine.deepspeed_config
# names a file: its path may change (a moved copy) and so may its other settings (bucket sizes,
# communication options), but the settings of DEEPSPEED_MUST_MATCH, read from the resolved
# DeepSpeed config, must equal the checkpoint's (meta.json ``deepspeed``).
RESUME_MUST_MATCH: dict[str, str] = {
    "model": "the weights are of that architecture",
    "optim.lr": "the optimizer and its schedule resume with the checkpoint's peak lr",
    "optim.weight_decay": "the optimizer resumes with the checkpoint's",
    "engine.kind": "the engine state is of that kind",
    "engine.zero_stage": "the optimizer state is partitioned for that stage",
    "engine.precision": "the optimizer state and loss scale are of that precision",
    "run.seed": "the data order and sampling continue the checkpoint's",
    "data.mode": "the data position belongs to that epoch plan",
    "data.train_weights": "the data position belongs to that epoch plan",
    "data.samples_per_epoch": "the data position belongs to that epoch plan",
    "data.shuffle_buffer": "the data position includes that shuffle buffer",
}


DEEPSPEED_MUST_MATCH: dict[str, str] = {
    "zero_optimization.stage": "the optimizer state is partitioned for that stage",
    "zero_optimization.offload_optimizer.device": (
        "the optimizer state was saved by the optimizer of that placement (an offloaded one is "
        "DeepSpeed's own CPU optimizer)"
    ),
    "zero_optimization.offload_param.device": "ZeRO-3's parameters were partitioned for it",
    "optimizer.type": "the optimizer state is that optimizer's",
}
"""The settings of the resolved DeepSpeed config (``engine.deepspeed_config`` merged over ours)
whose value a checkpoint's engine state was written for. Absent: ``none`` (no offload), and
``torch AdamW`` for the optimizer (ours, passed to DeepSpeed when the file names none)."""

ABSENT = {"optimizer.type": "torch AdamW"}


def deepspeed_identity(cfg: Config) -> dict[str, Any] | None:
    """What a checkpoint records of its DeepSpeed settings (meta.json ``deepspeed``): each of
    ``DEEPSPEED_MUST_MATCH`` in the resolved config; None for the DDP engine. Reads the user's
    file (one ConfigError line if it is not readable)."""
    if cfg.engine.kind != "deepspeed":
        return None
    from .engine import deepspeed_config

    resolved = deepspeed_config(cfg)
    found = {}
    for key in DEEPSPEED_MUST_MATCH:
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        found[key] = ABSENT.get(key, "none") if node is None else node
    return found


def _check_deepspeed(directory: Path, cfg: Config, saved: Mapping[str, Any]) -> None:
    """Refuse (one line) a resume whose resolved DeepSpeed config changes a setting of
    ``DEEPSPEED_MUST_MATCH`` from the checkpoint's (``saved``)."""
    here = deepspeed_identity(cfg)
    if here is None:
        return  # engine.kind changed: RESUME_MUST_MATCH has refused it already
    for key, reason in DEEPSPEED_MUST_MATCH.items():
        if key not in saved or saved[key] == here[key]:
            continue
        where = cfg.engine.deepspeed_config
        source = f"engine.deepspeed_config={where}" if where else "no engine.deepspeed_config"
        raise ConfigError(
            f"resume from {directory}: the DeepSpeed config ({source}) has {key}={here[key]}, "
            f"the checkpoint's had {key}={saved[key]} ({reason}): resume with a DeepSpeed "
            "config that has the checkpoint's value, or export its weights (python -m "
            "fne_dist.export) and start a new run from them"
        )


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _rule(key: str) -> str | None:
    for name, reason in RESUME_MUST_MATCH.items():
        if key == name or key.startswith(name + "."):
            return reason
    return None


def shard_fingerprint(urls: Sequence[str], sizes: Sequence[int]) -> str:
    """The training shards as a data position sees them: each shard's name, sample count and
    (local files) byte size, in order. Moving the shards elsewhere keeps it; adding, removing,
    reordering or rewriting one changes it."""
    items = []
    for url, samples in zip(urls, sizes, strict=True):
        path = Path(url)
        items.append([path.name, samples, path.stat().st_size if path.is_file() else None])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def check_resume_config(
    directory: Path,
    cfg: Config,
    data: Mapping[str, Any] | None,
    deepspeed: Mapping[str, Any] | None = None,
) -> None:
    """Refuse (one line, ConfigError) resuming ``directory`` with a setting of
    ``RESUME_MUST_MATCH`` changed, with a DeepSpeed config whose settings of
    ``DEEPSPEED_MUST_MATCH`` differ from ``deepspeed`` (meta.json's; None: a checkpoint of
    the DDP engine, or written before it was recorded), or with other training shards than
    the checkpoint's (``data``: meta.json's ``{"train": pattern, "fingerprint": ...}`` against
    this run's)."""
    try:
        saved = load_config(directory / "config.yaml")
    except ConfigError as err:
        raise CheckpointError(f"{directory}: its config.yaml is not readable ({err})") from None
    old, new = _flat(config_to_dict(saved)), _flat(config_to_dict(cfg))
    for key in sorted(new):
        reason = _rule(key)
        if reason is None or key not in old or old[key] == new[key]:
            continue
        raise ConfigError(
            f"resume from {directory}: {key}={new[key]} differs from the checkpoint's "
            f"{key}={old[key]} ({reason}): resume with {key}={old[key]}, or export its weights "
            "(python -m fne_dist.export) and start a new run from them"
        )
    if isinstance(deepspeed, Mapping):
        _check_deepspeed(directory, cfg, deepspeed)
    if data is None or not isinstance(data, Mapping):
        return  # written before the fingerprint existed: nothing to compare
    here = data_identity(cfg)
    if data.get("fingerprint") != here["fingerprint"]:
        same = data.get("train") == here["train"]
        raise ConfigError(
            f"resume from {directory}: data.train={here['train']} holds other shards than the "
            f"checkpoint's data.train={data.get('train')}"
            + (" (the files behind the pattern changed)" if same else "")
            + ": its data position would skip or repeat the wrong samples; resume with the "
            "checkpoint's shards, or export its weights (python -m fne_dist.export) and start "
            "a new run from them"
        )


def data_identity(cfg: Config) -> dict[str, str]:
    """What a checkpoint records of its training shards (meta.json ``data``)."""
    from .data.sources import shard_list

    shards = shard_list(cfg.data.train, "data.train", cfg.data.allow_pipe)
    return {"train": cfg.data.train, "fingerprint": shard_fingerprint(shards.urls, shards.sizes)}
