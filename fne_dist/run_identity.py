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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .config import Config, ConfigError

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
