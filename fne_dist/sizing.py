"""Launch-time size checks: a memory or batch that cannot fit fails before it is allocated, and
settings that do nothing on this data are named.

Legend: K memory.size, D model.embed_dim, B local batch, G = W·B global batch, S image side.

What a rank holds at least (float32 = 4 bytes, int64 = 8), a lower bound on its peak:

* the memory: image and text embeddings (2·K·D·4) plus ids, groups and write order (3·K·8);
  the loss reads it through one concatenated candidate block [gathered batch ; memory] per step,
  a second copy (2·(K+G)·D·4 + 2·(K+G)·8). So memory bytes ≈ K·D·4·4 + K·40: "4 copies".
* the step's similarities: one B×(K+G) float32 matrix per direction (the loss keeps several
  temporaries of that size; two are counted).
* the input images: B·3·S²·4 (the encoder's activations come on top and depend on the model).

The memory is built on the host (seeded ``torch.randn``) and then moved, so the host needs its
embeddings once per local rank even when training runs on a GPU; the GPU check reads
``torch.cuda.mem_get_info`` only when the run's device is CUDA.

A sharded memory (``memory.sharded``) holds ⌈K/W⌉ slots per rank and is scored in place (no
concatenated copy; a float32 copy of the shard when stored in bf16); its similarities are
``fne.block_rows`` gathered anchors × ⌈K/W⌉ at a time; its host copy is generated a chunk at a
time.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from .config import Config, ConfigError

GIB = 2**30


@dataclass(frozen=True)
class Need:
    """Bytes one rank needs at least, by part (see the module docstring)."""

    memory: int
    similarities: int
    images: int

    @property
    def total(self) -> int:
        return self.memory + self.similarities + self.images


def rank_needs(cfg: Config, world: int = 1) -> Need:
    """The lower bound of one rank's peak (module docstring), from the config alone."""
    K, D, B = cfg.memory.size, cfg.model.embed_dim, cfg.train.batch_size
    G, S = B * world, cfg.model.image.image_size
    images = B * 3 * S * S * 4
    if cfg.memory.sharded:
        k = -(-K // world)
        stored = 2 if cfg.memory.dtype == "bfloat16" else 4
        memory = 2 * k * D * stored + 3 * k * 8 + (2 * k * D * 4 if stored == 2 else 0)
        rows = min(G, cfg.fne.block_rows)
        return Need(memory=memory, similarities=2 * rows * (k + G) * 4, images=images)
    memory = 2 * K * D * 4 + 3 * K * 8 + 2 * (K + G) * D * 4 + 2 * (K + G) * 8
    return Need(memory=memory, similarities=2 * B * (K + G) * 4, images=images)


def host_needs(cfg: Config, world: int = 1) -> int:
    """Host bytes a rank needs transiently even on a GPU: the memory's seeded embeddings (its
    shard, when sharded)."""
    K = -(-cfg.memory.size // world) if cfg.memory.sharded else cfg.memory.size
    return 2 * K * cfg.model.embed_dim * 4


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def available_bytes(device: torch.device) -> int:
    """Free bytes where the run's tensors live: the CUDA device's free memory, else the host's
    available memory (psutil: what can be allocated without swapping)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def check_fits(
    cfg: Config,
    device: torch.device,
    world: int = 1,
    local_ranks: int = 1,
    free: int | None = None,
    host_free: int | None = None,
) -> None:
    """ConfigError (one line: what is needed vs available) when this rank's tensors cannot fit
    on ``device``, or the memories of the ``local_ranks`` ranks of this host cannot be built in
    its RAM. ``free``/``host_free`` override the measured free bytes (tests)."""
    need = rank_needs(cfg, world)
    on_host = device.type != "cuda"
    free = available_bytes(device) if free is None else free
    ranks = local_ranks if on_host else 1  # each GPU rank has its own device
    if need.total * ranks > free:
        where = "host memory" if on_host else f"free on {device}"
        share = f" for {ranks} ranks on this host" if ranks > 1 else ""
        raise ConfigError(
            f"memory.size={cfg.memory.size} × model.embed_dim={cfg.model.embed_dim} with "
            f"train.batch_size={cfg.train.batch_size} at {cfg.model.image.image_size}px needs at "
            f"least {_gib(need.total * ranks)}{share} (memory {_gib(need.memory)}, similarities "
            f"{_gib(need.similarities)}, images {_gib(need.images)} per rank), "
            f"{_gib(free)} {where} available: lower memory.size or train.batch_size"
        )
    if not on_host:
        check_host(cfg, local_ranks, host_free, world)


def check_host(cfg: Config, local_ranks: int, host_free: int | None = None, world: int = 1) -> None:
    """ConfigError unless the host can build the memories of its ``local_ranks`` GPU ranks
    (seeded on the host, then moved to the device) of ``world``."""
    host_free = int(psutil.virtual_memory().available) if host_free is None else host_free
    if host_needs(cfg, world) * local_ranks > host_free:
        raise ConfigError(
            f"memory.size={cfg.memory.size} × model.embed_dim={cfg.model.embed_dim} is built on "
            f"the host first: needs {_gib(host_needs(cfg, world) * local_ranks)} for {local_ranks} "
            f"rank(s), {_gib(host_free)} host memory available: lower memory.size"
        )


def check_local_workers(cfg: Config, workers: int, host_free: int | None = None) -> None:
    """The Ray driver's check before it starts a local Ray instance, whose ``workers`` share this
    host: their memories and batches on the CPU, or (``dist.use_gpu``) the host side of their
    memories; each worker checks its own GPU when it starts."""
    if cfg.dist.use_gpu:
        check_host(cfg, workers, host_free)
    else:
        check_fits(cfg, torch.device("cpu"), workers, workers, free=host_free)


def launch_warnings(
    cfg: Config, train_pairs: int, steps_per_epoch: int, total_steps: int
) -> list[str]:
    """One line per setting that this training split makes meaningless.

    * a memory larger than the whole split: it holds the same pairs again (and random vectors in
      never-written slots for the first epoch); the reference keeps it at most half the split;
    * a warm-up longer than one epoch of this data (``train.warmup_steps`` counts optimizer
      steps, so a value tuned on one dataset is a different share of another): the reference
      warms up for exactly one epoch, so one epoch is not warned about;
    * a warm-up that covers the whole run: the configured loss never trains.

    ``steps_per_epoch``: micro steps per epoch; ``total_steps``: optimizer steps of the run.
    """
    out = []
    if cfg.memory.size > train_pairs:
        out.append(
            f"warning: memory.size={cfg.memory.size} exceeds the training split "
            f"({train_pairs} pairs): the memory holds earlier steps' pairs again; the reference "
            f"keeps it at most half the split"
        )
    warm = cfg.train.warmup_steps
    epoch = max(1, steps_per_epoch // cfg.engine.grad_accum)
    if warm >= total_steps:
        out.append(
            f"warning: train.warmup_steps={warm} covers the whole run ({total_steps} optimizer "
            f"steps): fne.loss={cfg.fne.loss} never trains, only the in-batch vse_pp warm-up"
        )
    elif warm > epoch:
        out.append(
            f"warning: train.warmup_steps={warm} is {warm / epoch:.2f} epochs of this data "
            f"({epoch} optimizer steps per epoch; the reference warms up for one epoch)"
        )
    return out
