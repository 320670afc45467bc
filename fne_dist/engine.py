"""The training engine: DeepSpeed (imported here and, for its checkpoint types, in
``checkpoint/pickle_safety.py``), its plain-DDP twin, and the learning-rate schedules. The twin
writes its state in the checkpoint's own format (``checkpoint.format``); nothing of the
checkpoint imports back up except the collective save, which sits above the engine."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .checkpoint.format import load_state, save_state
from .config import Config, ConfigError, OptimConfig, deep_merge, parse_yaml
from .distributed import rank, world_size
from .nonfinite import grad_norm, grads_finite

log = logging.getLogger("fne_dist")

# DeepSpeed's CPU accelerator JIT-loads this op at every start (deepspeed.comm's TorchBackend).
SHM_OP = "deepspeed_shm_comm"


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the peak lr at optimizer step s (0-based)."""

    def step_schedule(s: int) -> float:
        return cfg.gamma ** sum(s >= m for m in (cfg.milestones or []))

    def cosine(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - cfg.warmup_steps) / span)))

    return {"step": step_schedule, "cosine": cosine, "constant": lambda s: 1.0}[cfg.schedule]


def deepspeed_config(cfg: Config, world_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this run: ours, derived from the typed config, merged with the
    user's own file (``engine.deepspeed_config``) when one is given (``merged_config``).
    ``world_size`` (when known) checks a ``train_batch_size`` the file sets."""
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.engine.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "fp16": {"enabled": cfg.engine.precision == "fp16"},
        "steps_per_print": 10**9,  # our own progress reporting
        "wall_clock_breakdown": False,
        # Its throughput timer (on by default) calls torch.cuda.synchronize() when the forward
        # starts and when step() ends: two full device syncs per micro step on a GPU, for a
        # samples/s figure only its steps_per_print log shows. Ours come from host clocks.
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.engine.deepspeed_config is None:
        return ours
    path = cfg.engine.deepspeed_config
    return merged_config(ours, read_mapping(path, "engine.deepspeed_config"), cfg, world_size)


def owned_values(cfg: Config, world_size: int | None) -> list[tuple[str, str, Any]]:
    """(DeepSpeed key, our key, our value) of every DeepSpeed setting our config decides: a
    user file may repeat them, but only with our value."""
    precision = f"engine.precision={cfg.engine.precision}"
    owned: list[tuple[str, str, Any]] = [
        ("train_micro_batch_size_per_gpu", "train.batch_size", cfg.train.batch_size),
        ("gradient_accumulation_steps", "engine.grad_accum", cfg.engine.grad_accum),
        ("gradient_clipping", "optim.grad_clip", cfg.optim.grad_clip),
        ("zero_optimization.stage", "engine.zero_stage", cfg.engine.zero_stage),
        ("bf16.enabled", precision, cfg.engine.precision == "bf16"),
        ("fp16.enabled", precision, cfg.engine.precision == "fp16"),
        ("optimizer.params.lr", "optim.lr", cfg.optim.lr),
        ("optimizer.params.weight_decay", "optim.weight_decay", cfg.optim.weight_decay),
    ]
    if world_size is not None:
        global_batch = cfg.train.batch_size * cfg.engine.grad_accum * world_size
        what = (
            f"train.batch_size × engine.grad_accum × ranks = {cfg.train.batch_size} × "
            f"{cfg.engine.grad_accum} × {world_size}"
        )
        owned.append(("train_batch_size", what, global_batch))
    return owned


def _lookup(tree: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _json_text(value: Any) -> str:
    return json.dumps(value)


def merged_config(
    ours: dict[str, Any], user: dict[str, Any], cfg: Config, world_size: int | None
) -> dict[str, Any]:
    """``user`` (DeepSpeed's schema) over ``ours``: every key the user sets passes through
    (offload, bf16/fp16 options, ZeRO-3 settings, its optimizer: DeepSpeed validates them),
    except that a setting our config owns (``owned_values``) must hold our value, and the lr
    schedule stays ours. A conflict raises one ``ConfigError`` line naming both values."""
    where = f"engine.deepspeed_config={cfg.engine.deepspeed_config}"
    user = dict(user)
    if "bfloat16" in user:  # DeepSpeed's older name of the section
        if "bf16" in user:
            raise ConfigError(f"{where}: sets both bf16 and bfloat16 (DeepSpeed reads one)")
        user["bf16"] = user.pop("bfloat16")
    if "scheduler" in user:
        raise ConfigError(
            f"{where}: scheduler={_json_text(user['scheduler'])} conflicts with "
            f"optim.schedule={cfg.optim.schedule}: the lr schedule is ours (optim.schedule, "
            "optim.warmup_steps); remove scheduler from the file"
        )
    for ds_key, our_key, value in owned_values(cfg, world_size):
        found, theirs = _lookup(user, ds_key)
        if found and (theirs != value or isinstance(theirs, bool) != isinstance(value, bool)):
            shown = our_key if "=" in our_key else f"{our_key}={_json_text(value)}"
            raise ConfigError(
                f"{where}: {ds_key}={_json_text(theirs)} conflicts with {shown}: remove it "
                "from the file, or set ours to the same value"
            )
    zero = user.get("zero_optimization", {})
    offload = isinstance(zero, dict) and any(
        isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"
        for k in ("offload_optimizer", "offload_param")
    )
    merged = deep_merge(ours, user)
    if "optimizer" in user or offload:
        # DeepSpeed builds the optimizer: an offloaded one must be its own (its CPU Adam unless
        # the file says otherwise); the file's optimizer takes our lr and weight decay.
        optimizer = merged.setdefault("optimizer", {"type": "AdamW"})
        params = optimizer.setdefault("params", {})
        params.setdefault("lr", cfg.optim.lr)
        params.setdefault("weight_decay", cfg.optim.weight_decay)
    return merged


def read_mapping(path: str, key: str) -> dict[str, Any]:
    """A JSON (``.json``) or YAML file holding a mapping; one ``ConfigError`` line otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}={path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if file.suffix.lower() == ".json" else parse_yaml(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{key}={path}: not a readable JSON/YAML file ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}={path}: must hold a mapping of DeepSpeed settings")
    return data


def build_engine(model: nn.Module, cfg: Config, total_steps: int):
    """Wrap ``model`` in a DeepSpeed engine with Adam(W), the lr schedule and clipping (or, with
    ``engine.kind=ddp``, in the plain-DDP twin below). Rank 0 writes the DeepSpeed config it
    used, resolved, to the run directory (``deepspeed_config.json``).

    A torch optimizer is passed in (not DeepSpeed's fused ones, which need compiled ops) unless
    the user's DeepSpeed config names an optimizer or offloads one: then DeepSpeed builds it.
    """
    if cfg.engine.kind == "ddp":
        return DDPEngine(model, cfg, total_steps)
    import deepspeed  # imported late: the accelerator must be chosen first (distributed.device)

    ds_config = deepspeed_config(cfg, world_size())
    if rank() == 0:
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(cfg.optim, total_steps)
    optimizer = scheduler = None
    if "optimizer" in ds_config:

        def scheduler(opt):  # DeepSpeed calls it with the optimizer it built
            return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    preload_jit_ops()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    keep_grad_norm(engine)
    return engine


def time_gradient_reduction(engine, timer) -> None:
    """Time DeepSpeed's gradient reduction as the ``grad_reduce`` part of the step
    (``train.profile_phases``): ``allreduce_gradients``, which ``engine.backward`` calls after
    autograd's backward (ZeRO-0: the one all-reduce of all gradients; ZeRO-1 without
    ``overlap_comm``: its bucketed reduction; ZeRO-1 with it and ZeRO-2: the last bucket and
    the wait for those reduced in backward hooks, which stay inside ``backward``). The DDP
    twin reduces in its buckets' hooks only: nothing to time apart."""
    reduce = getattr(engine, "allreduce_gradients", None)
    if reduce is None:
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer.part("grad_reduce"):
            return reduce(*args, **kwargs)

    engine.allreduce_gradients = timed


def keep_grad_norm(engine) -> None:
    """Make ``engine.get_global_grad_norm()`` answer at ZeRO stage 0 in fp32 too, and clip
    there with no collective and one pass over the gradients.

    There DeepSpeed clips through ``clip_fp32_gradients`` → ``clip_grad_norm_``, which drops
    the global norm it computes, and averages that norm over the data-parallel group with an
    all-reduce (for MoE parameters, whose gradients differ by rank): at ZeRO-0 every rank
    holds the same all-reduced gradients, so that was one collective per step that changed
    nothing (x·½ + x·½ = x at 2 ranks). The norm is DeepSpeed's (``nonfinite.grad_norm``),
    taken from the loop's gradient check of this step when it made one
    (``checked_grads_finite``), else computed here; the gradients are scaled as DeepSpeed
    scales them. Bit for bit DeepSpeed's clipped gradients at 1 and 2 ranks (its average
    may move the norm's last bit at other world sizes); no host sync (the loop reads the
    norm at log windows)."""
    if not hasattr(engine, "clip_fp32_gradients") or getattr(engine, "mpu", None) is not None:
        return  # (model parallelism, which this package never sets up, needs DeepSpeed's)
    engine.fne_checked_norm = None

    def clip_and_keep() -> None:
        norm, engine.fne_checked_norm = engine.fne_checked_norm, None
        if norm is None:
            norm = grad_norm(engine.module)
        if norm is None:  # no gradients
            return
        max_norm = torch.tensor([float(engine.gradient_clipping())], device=norm.device)
        coef = torch.min(torch.ones(1, device=norm.device), max_norm / (norm + 1e-6))
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if norm.device.type == "cpu":  # torch's CPU foreach has no fused kernel: no faster
            for g in grads:
                g.mul_(coef.reshape(()))
        else:
            torch._foreach_mul_(grads, coef.reshape(()))
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_and_keep


def checked_grads_finite(engine) -> bool:
    """``nonfinite.grads_finite`` of the gradients the coming ``engine.step()`` applies (at
    ZeRO-0 / DDP they are the all-reduced ones); a finite norm is handed to that step's
    clipping at DeepSpeed ZeRO-0 fp32 (``keep_grad_norm``): the check and the clip read the
    gradients once, not twice."""
    norm = grad_norm(engine.module)
    finite = grads_finite(engine.module, norm)
    if hasattr(engine, "fne_checked_norm"):
        engine.fne_checked_norm = norm if finite else None
    return finite


def preload_jit_ops() -> None:
    """Load DeepSpeed's CPU comm op under ``jit_build_guard`` before ``deepspeed.initialize``,
    which then finds it in DeepSpeed's cache of loaded ops. Only the load is guarded: the
    initialisation runs collectives, and a rank holding the lock there would wait for a rank
    waiting for the lock."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    with jit_build_guard(SHM_OP):
        builder.load(verbose=False)


@contextlib.contextmanager
def jit_build_guard(op: str) -> Iterator[None]:
    """Hold an flock around a torch JIT extension load, and remove a stale build lock under it.

    torch builds and loads JIT ops under a file baton (``<extensions dir>/<op>/lock``) that
    only its creator removes: a process killed mid-build leaves it, and every later start on the
    machine waits forever without a word. An flock is released by the
    kernel when its holder dies, so while we hold ours, a baton left by another of our processes
    belongs to no live build: it is removed, with a warning naming it.
    """
    from torch.utils.cpp_extension import _get_build_directory  # torch's own path rule

    build_dir = Path(_get_build_directory(op, verbose=False))
    with open(build_dir.parent / f"{op}.fne_dist.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits for a live build only; released on death
        try:
            baton = build_dir / "lock"
            if baton.exists():
                log.warning("removing a stale build lock left by a killed process: %s", baton)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gathered_parameters(engine, trained_only: bool = False):
    """Context in which ``engine.module``'s parameters (``trained_only``: those that train,
    all the EMA reads) are whole on every rank.

    Under ZeRO-3 each rank holds a shard and ``p.data`` is empty outside forward: gather them
    (read-only) for the EMA. Stages 0-2 keep full parameters: nothing to do.
    """
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = [p for p in engine.module.parameters() if p.requires_grad or not trained_only]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def ddp_unused_parameters(model: nn.Module, cfg: Config) -> tuple[bool, list[str]]:
    """(``find_unused_parameters``, parameter names DDP leaves out) for ``model`` under ``cfg``.

    Every trained parameter gets a gradient at every step except infonce's temperature: the
    other losses never read it (so it never trains, and DDP must not wait for its gradient:
    it is left out), and infonce reads it only after the in-batch warm-up (DDP then has to
    find it unused during the warm-up: ``find_unused_parameters``, one walk over the autograd
    graph per step, only in that case). DDP compares the names in two spellings: the
    constructor with ``named_parameters()``'s (``temperature``), the reducer with
    ``f"{module_name}.{param_name}"``, which is ``.temperature`` for a parameter of the top
    module; both are listed, so it is left out of both."""
    if not any(name == "temperature" for name, _ in model.named_parameters()):
        return False, []
    if cfg.fne.loss == "infonce":
        return cfg.train.warmup_steps > 0, []
    return False, ["temperature", ".temperature"]


class DDPEngine:
    """Plain torch DDP behind the small part of DeepSpeed's engine interface the loop uses
    (call, ``module``, ``backward``, ``step``, ``get_lr``, ``zero_optimization_stage``,
    ``save_checkpoint``/``load_checkpoint``): the comparison twin of ``engine.kind=ddp``.

    Same optimizer (AdamW), schedule, clipping and gradient accumulation (the loss is divided
    by the accumulation steps, as DeepSpeed does); DDP averages gradients over ranks like
    DeepSpeed. Its checkpoint goes through ``checkpoint.save_state`` (safetensors + JSON, no
    pickle) into the engine's directory of the one checkpoint layout.
    """

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        self.module = model
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        find_unused, ignored = ddp_unused_parameters(model, cfg)
        if active and ignored:
            model._ddp_params_and_buffers_to_ignore = ignored  # read by DDP's constructor
        # Gradients are views of the all-reduce buckets (no copy of them after the reduction).
        self.wrapped = (
            DistributedDataParallel(
                model, find_unused_parameters=find_unused, gradient_as_bucket_view=True
            )
            if active
            else model
        )
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.optim, total_steps)
        )
        self.accum, self.clip, self.micro = cfg.engine.grad_accum, cfg.optim.grad_clip, 0
        self.grad_norm: torch.Tensor | None = None  # of the last optimizer step (clipping on)

    def __call__(self, batch):
        return self.wrapped(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            return
        if self.clip:  # the norm stays a device tensor until a log window reads it
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> torch.Tensor | None:
        """The last optimizer step's gradient norm before clipping (None without clipping)."""
        return self.grad_norm

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def zero_optimization_stage(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, schedule and accumulation counter: what a checkpoint restores."""
        scheduler = self.scheduler.state_dict()
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler,  # its lr_lambdas are plain functions: stored as None
            "micro": self.micro,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        """Rank 0 writes ``state_dict()`` through the checkpoint's own writer (safetensors +
        JSON, no pickle) as ``<tag>/state.*``; every rank holds the same state under DDP."""
        if rank() == 0:
            save_state(Path(save_dir) / tag, "state", self.state_dict())

    def load_checkpoint(self, load_dir: str, tag: str, **_: object) -> tuple[str | None, dict]:
        src = Path(load_dir) / tag
        if not (src / "state.json").is_file():
            return None, {}
        self.load_state_dict(load_state(src, "state"))
        return str(src), {}


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The model's fp32 weights, whole (ZeRO-3 gathers them: a collective on every rank)."""
    with gathered_parameters(engine):
        return {
            k: v.detach().float().cpu().clone().contiguous()
            for k, v in engine.module.state_dict().items()
        }


# Adam(W)'s per-parameter state, whole: what a resume on another world size re-partitions.
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def partitioned_optimizer(engine) -> bool:
    """Whether the optimizer state is split over the ranks: its engine files then fit only the
    world size that wrote them. ZeRO 1-3 split it, and so does DeepSpeed's ``BF16_Optimizer``
    (fp32 master weights partitioned like ZeRO-1), which DeepSpeed chooses for bf16 at ZeRO-0
    up to 0.17 and at ZeRO-1 with ``data_types.grad_accum_dtype: fp32``. At ZeRO-0 from 0.18
    bf16 and fp16 go through ``FP16_UnfusedOptimizer`` / ``FP16_Optimizer``: whole fp32 master
    weights on every rank, saved whole in the engine files like fp32 ZeRO-0's (and without the
    parameter-to-partition mapping the whole-state accessors read: they answer None)."""
    if engine.zero_optimization_stage() > 0:
        return True
    if not getattr(engine, "bfloat16_enabled", lambda: False)():
        return False
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(engine.optimizer, BF16_Optimizer)


def full_optimizer_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Under ZeRO 1-3, the optimizer state by parameter name, whole (``fp32/<name>``, the
    master weights, and ``exp_avg/<name>``, ``exp_avg_sq/<name>``), and as JSON the step, the
    lr schedule's state and the engine's counters; every rank calls it (DeepSpeed gathers the
    partitions with collectives). ZeRO-0's and the DDP twin's files hold it whole already."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tensors: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        master = safe_get_full_fp32_param(p)
        if master is None:  # an optimizer partitioned_optimizer does not know
            raise RuntimeError(
                f"DeepSpeed's {type(engine.optimizer).__name__} gives no whole fp32 weights for "
                f"{name}: the whole-optimizer checkpoint cannot be written"
            )
        tensors[f"fp32/{name}"] = master.detach().float().cpu().clone()
        for key in ADAM_KEYS:
            try:
                full = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
            except (KeyError, ValueError):  # no optimizer step yet (all skipped): AdamW's zeros
                full = torch.zeros_like(tensors[f"fp32/{name}"])
            tensors[f"{key}/{name}"] = full
    base = engine.optimizer.optimizer  # the torch AdamW over the partitions
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    meta = {
        "step": max(steps) if steps else 0.0,
        "scheduler": engine.lr_scheduler.state_dict(),  # its lr_lambdas are stored as None
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
    }
    return tensors, meta


def load_full_state(
    engine, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Put ``full_optimizer_state``'s whole state (and the whole model ``weights``) into an
    engine of any world size: each rank keeps its own partition of it (every rank calls)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = list(engine.module.parameters())
    modify = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        if engine.zero_optimization_stage() == 3
        else contextlib.nullcontext()
    )
    with modify:  # ZeRO-3: rank 0's whole weights are partitioned out when it closes
        engine.module.load_state_dict(weights)
    opt = engine.optimizer
    base = opt.optimizer
    # the fp32 partitions AdamW steps; ZeRO-3 lends them to its param_groups only in a step
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or [
        flat for group in base.param_groups for flat in group["params"]
    ]
    step = torch.tensor(float(meta["step"]))
    for flat in flats:  # AdamW creates its state lazily, at the first step
        state = base.state[flat]
        for key in ADAM_KEYS:
            state.setdefault(key, torch.zeros_like(flat))
        state["step"] = step.clone()
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        # ZeRO 1-2 map each parameter to its slice of the partition's state once, at the
        # first step; the state created here must be mapped now, before it is set
        opt._hp_optimizer_states_linked = False
        link()
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        for key in (None, *ADAM_KEYS):
            value = tensors[f"{key or 'fp32'}/{name}"].to(p.device)
            if hasattr(p, "ds_id"):
                _set_zero3_partition(opt, p, value, key)
            elif key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
    engine.lr_scheduler.load_state_dict(dict(meta["scheduler"]))
    for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    engine.skipped_steps = meta["skipped_steps"]


def _set_zero3_partition(opt, param, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of ``value`` (whole) into ZeRO-3's fp32 partition of ``param`` (the
    master weights, or the optimizer state ``key``). DeepSpeed's own setter reads past the
    end of the whole tensor for the ranks whose partition is padding: the padding stays 0."""
    part, _ = opt._get_fp32_opt_state_partition(
        param, release_swap_buffers=False, optim_state_key=key
    )
    n = part.numel()
    start = n * opt._get_param_partition_rank(param)
    flat = value.flatten().to(part.dtype)
    chunk = torch.zeros(n, dtype=part.dtype, device=part.device)
    k = max(0, min(n, flat.numel() - start))
    chunk[:k] = flat[start : start + k]
    part.data.copy_(chunk)
