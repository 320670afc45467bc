"""``python -m fne_dist.train [--config FILE] [key=value ...]``: the main job.

Without ``--config`` it runs the packaged ``default.yaml`` (``fne_dist/configs/``, also reached as
``configs/`` in a clone: the run tuned for the embedded emoji data; its deviations from the
paper's values are commented there), so an installed wheel finds it too.

Exit codes (docs/checkpoints.md): 0 success; 1 internal error (a traceback: a bug to report);
2 user error (config, paths, data: missing, empty or unreadable shards, too many bad samples;
run directory or checkpoint.dir in use or not writable, unusable checkpoint, a resume changing a
setting the checkpoint depends on, a checkpoint or the final weights that cannot be written); 3
training diverged (``optim.max_nonfinite_steps`` non-finite steps in a row); 75 interrupted by
SIGINT/SIGTERM (also during the feature-cache build), resumable with ``checkpoint.resume=latest``
(or, with no checkpoint yet, by running the same command again).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .checkpoint.format import CheckpointError
from .config import Config, ConfigError, check_world_range, load_config, resolve_batch
from .data.sources import DataError
from .distributed.launch import RendezvousError, rank_env, rendezvous
from .encoders import EncoderUnavailable
from .interrupt import EXIT_INTERRUPTED, Interrupted
from .monitoring import check_monitor
from .nonfinite import TrainingDiverged
from .reporters import TENSORBOARD_MISSING, tensorboard_available
from .run_identity import check_new_run, check_writable

# Shipped inside the package (package data), so an installed wheel finds it, not only a clone.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_DIVERGED = 0, 1, 2, 3
# One line on stderr and an exit code for each failure a user can cause (the rest: tracebacks).
EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], str, int], ...] = (
    ((Interrupted,), "interrupted", EXIT_INTERRUPTED),
    ((TrainingDiverged,), "error", EXIT_DIVERGED),
    (
        (ConfigError, DataError, EncoderUnavailable, CheckpointError, RendezvousError),
        "error",
        EXIT_USER,
    ),
)


DESCRIPTION = """\
Train an image-text matching model with FNE, then evaluate it on val and test.

Runs in this process, as one rank of torchrun / deepspeed / srun / accelerate launch (from the
variables they set), or as dist.workers Ray Train workers. Writes the run directory
run.output_dir/run.name: config.yaml, train_log.jsonl, metrics.json, model.safetensors,
checkpoints/ and plots/."""

EPILOG = """\
examples:
  %(prog)s
  %(prog)s --config configs/reference.yaml run.name=ref-1
  %(prog)s --config configs/reference.yaml run.name=ref-1 fne.prior=1e-3 -v
  %(prog)s --config configs/reference.yaml run.name=ref-1 checkpoint.resume=latest

Every key, its default and valid range: fne-dist config keys (docs/configuration.md).

exit status: 0 done; 1 internal error (a traceback: please report it); 2 a problem with the
config, data, paths or a checkpoint (one line says which); 3 training diverged (too many
non-finite steps in a row); 75 interrupted by SIGINT/SIGTERM, resume with
checkpoint.resume=latest."""


def build_parser(prog: str = "python -m fne_dist.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML config file (default: the packaged {DEFAULT_CONFIG.name})",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, applied over the file, e.g. fne.prior=1e-3",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print every logged metric in the progress line (report.console=full)",
    )
    # The deepspeed launcher (and torch.distributed.launch) append --local_rank=N to the command;
    # LOCAL_RANK in the environment says the same and is what distributed.launch reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(prog) if prog else build_parser()
    # intermixed: `a=1 -v b=2` (or a launcher's --local_rank between overrides) is one list
    args = parser.parse_intermixed_args(argv)
    if args.verbose:
        args.overrides = [*args.overrides, "report.console=full"]
    return args


def choose_launcher(cfg: Config, environ: dict[str, str] | None = None) -> str:
    """ "inplace" when a launcher set rank variables, else "ray" for several workers, else
    "local" (``dist.launcher`` forces local or ray)."""
    if cfg.dist.launcher != "auto":
        return cfg.dist.launcher
    if rank_env(environ).source != "none":
        return "inplace"
    return "ray" if cfg.dist.workers > 1 else "local"


def check_launch(cfg: Config, launcher: str, environ: dict[str, str] | None = None) -> None:
    """What ``Config.check`` cannot know, checked before any worker starts (one-line
    ConfigErrors): the world size an in-place launcher chose, and this machine's devices.

    Devices are not checked for a Ray cluster given by address: its workers may have GPUs that
    the driver lacks.
    """
    world = {"inplace": rank_env(environ).world_size, "ray": cfg.dist.workers}.get(launcher, 1)
    cfg = resolve_batch(cfg, world)  # one line now when the world size does not divide it
    if launcher == "ray" and cfg.dist.min_workers:
        check_world_range(cfg, cfg.dist.min_workers, cfg.dist.workers)
    if 0 < cfg.memory.size < cfg.train.batch_size * world:
        raise ConfigError(
            f"memory.size={cfg.memory.size} is smaller than the global batch "
            f"({cfg.train.batch_size} × {world} ranks): one step would overwrite itself"
        )
    if cfg.engine.kind == "deepspeed" and cfg.engine.deepspeed_config is not None:
        from .engine import deepspeed_config

        deepspeed_config(cfg, world)  # the user's file read and merged now: one line if not
    env = os.environ if environ is None else environ
    if launcher == "inplace" and world > 1:
        rendezvous(rank_env(env), env)  # none for a multi-process launch: one line, now
    check_ray_job_paths(cfg, env)
    check_accelerate_world(env)
    check_new_run(cfg, env)  # a new submission never silently becomes an old run
    check_monitor(cfg, launcher, env)  # the /metrics address and the discovery file
    check_accelerate_precision(cfg, env)
    if cfg.report.tensorboard and not tensorboard_available():
        raise ConfigError(TENSORBOARD_MISSING)
    if launcher == "ray" and (cfg.dist.ray_address or env.get("RAY_ADDRESS")):
        return  # the cluster's workers write, on their own filesystems
    check_writable(cfg)  # now, not at the first checkpoint or the final weights
    cuda = torch.cuda.is_available()
    ray_gpu = launcher == "ray" and cfg.dist.use_gpu
    if not cuda and (cfg.engine.device == "cuda" or ray_gpu):
        key = "dist.use_gpu=true" if ray_gpu else "engine.device=cuda"
        raise ConfigError(f"{key} but no CUDA device is visible (use engine.device=auto or cpu)")
    if cfg.engine.precision == "fp16" and (cfg.engine.device == "cpu" or not cuda):
        raise ConfigError(
            "engine.precision=fp16 is not supported on the CPU and no CUDA device is visible "
            "(use bf16 or fp32)"
        )


# Set by Ray's job supervisor for the entrypoint of `ray job submit` (its JobConfig as JSON).
RAY_JOB_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def output_paths(cfg: Config) -> dict[str, str]:
    """Where the run writes: its directory, checkpoints, and the feature cache."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    return {
        "run.output_dir": str(run_dir),
        "checkpoint.dir": cfg.checkpoint.dir or str(run_dir / "checkpoints"),
        "data.cache_dir": cfg.data.cache_dir,
    }


def check_ray_job_paths(cfg: Config, environ: dict[str, str] | None = None) -> None:
    """Under ``ray job submit`` the entrypoint runs inside Ray's temporary copy of the working
    dir, which Ray deletes: a relative output, checkpoint or cache path would write there and be
    lost (the cache rebuilt by every job). Refuse it, naming what to pass instead."""
    env = os.environ if environ is None else environ
    if RAY_JOB_VAR not in env:
        return
    given = {
        "run.output_dir": cfg.run.output_dir,
        "checkpoint.dir": cfg.checkpoint.dir,
        "data.cache_dir": cfg.data.cache_dir,
    }
    relative = [
        f"{key}={value}"
        for key, value in given.items()
        if value and "://" not in value and not Path(value).is_absolute()
    ]
    if relative:
        raise ConfigError(
            f"under a Ray job the working dir is Ray's temporary copy ({Path.cwd()}), deleted "
            f"after the job: {', '.join(relative)} would be lost; pass absolute paths on "
            "storage every node sees, e.g. run.output_dir=/shared/fne/runs "
            "data.cache_dir=/shared/fne/cache"
        )


def check_accelerate_world(environ: dict[str, str] | None = None) -> None:
    """``accelerate launch --cpu --num_processes N`` (N > 1) starts ONE plain process (its
    simple launcher; N CPU processes would need its mpirun path), which would then train alone
    as if one rank had been asked for. That launcher's only trace of N > 1 is MASTER_ADDR/PORT
    next to ACCELERATE_USE_CPU without any rank variable: refuse it."""
    env = os.environ if environ is None else environ
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    if (
        env.get("ACCELERATE_USE_CPU", "").lower() == "true"
        and env.get("MASTER_PORT")
        and rank_env(env).source == "none"
        and not mpi
    ):
        raise ConfigError(
            "accelerate launch --cpu --num_processes N starts one process, not N: for N ranks "
            "on the CPU use `accelerate launch --multi_gpu --num_processes N ...` with "
            "engine.device=cpu (or cluster/accelerate/*.yaml), or torchrun"
        )


# accelerate launch hands its config's (or --mixed_precision's) choice to the process here.
ACCELERATE_PRECISION_VAR = "ACCELERATE_MIXED_PRECISION"


def check_accelerate_precision(cfg: Config, environ: dict[str, str] | None = None) -> None:
    """fne_dist does not train through accelerate's Accelerator: the precision is
    engine.precision (DeepSpeed's). A ``mixed_precision`` that accelerate launch was given
    (config file or flag) and that engine.precision does not match would be silently ignored:
    refuse it, naming the key that sets it."""
    env = os.environ if environ is None else environ
    asked = env.get(ACCELERATE_PRECISION_VAR, "no").strip().lower()
    wanted = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(asked)
    if wanted is None:
        raise ConfigError(
            f"accelerate launch mixed_precision={asked} is not supported: use 'no', bf16 or fp16 "
            "(fne_dist's precision is engine.precision)"
        )
    if asked != "no" and wanted != cfg.engine.precision:
        raise ConfigError(
            f"accelerate launch asks for mixed_precision={asked} but engine.precision="
            f"{cfg.engine.precision}: fne_dist trains at engine.precision, so pass "
            f"engine.precision={wanted} (or mixed_precision 'no' to accelerate launch)"
        )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    try:
        cfg = load_config(path, args.overrides)
        launcher = choose_launcher(cfg)
        check_launch(cfg, launcher)
        if RAY_JOB_VAR in os.environ and rank_env().rank == 0:
            print(
                "outputs: " + ", ".join(f"{k}={v}" for k, v in output_paths(cfg).items()),
                flush=True,
            )
        if launcher == "ray":
            from .distributed.ray_launcher import run_with_ray

            run_with_ray(cfg)
        else:  # in place: a plain process, or one rank of torchrun/deepspeed/accelerate/srun
            from .loop import train

            train(cfg)
    except tuple(t for types, _, _ in EXIT_CODES for t in types) as err:
        prefix, code = next((p, c) for types, p, c in EXIT_CODES if isinstance(err, types))
        print(f"{prefix}: {err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler was installed
        msg = "SIGINT outside the training loop: resume from the newest checkpoint"
        print(f"interrupted: {msg}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
