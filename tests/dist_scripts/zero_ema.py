"""One rank of the ZeRO EMA check behind tests/test_zero_ema.py (CPU, gloo, DeepSpeed).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 zero_ema.py STAGE

Builds a small DualEncoder with trainable backbones inside ``build_engine`` at ZeRO ``STAGE``,
runs 3 training steps with the loop's step order (``forward_step`` → backward → step → EMA under
``gathered_parameters`` → enqueue) and checks after every step, on every rank, that the momentum
copy equals a reference EMA computed from the full fp32 parameters that DeepSpeed's optimizer
holds (``safe_get_full_fp32_param``: an independent path that does not use
``gathered_parameters``). At stage 3 it also checks that the module really is partitioned
outside forward (so the test covers the classic empty ``p.data`` bug) and that the momentum
copy is whole and non-zero. Exits 0 only if every rank passed.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported

import sys
import traceback

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fne_dist import distributed as D
from fne_dist.config import load_config
from fne_dist.distributed.launch import init_process_group, rank_env
from fne_dist.engine import build_engine, gathered_parameters
from fne_dist.fne import SimilarityStats
from fne_dist.memory import MomentumMemory
from fne_dist.model import DualEncoder
from fne_dist.momentum import ema_update, make_momentum_copy
from fne_dist.step import StepPosition, forward_step

PIXELS, VOCAB, HIDDEN, TOKENS = 24, 2048, 64, 6  # the embedding table (131k) exceeds ZeRO-3's
# default persistence threshold (1e5 elements), so it is really partitioned at stage 3.
STEPS, B, M = 3, 4, 0.9


class ImageTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.GELU())

    def forward(self, pixels: Tensor) -> Tensor:
        return self.net(pixels)


class TextTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask[..., None].float()
        mean = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.proj(mean)


def batch_of(step: int, rank: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randperm(1000, generator=gen)[:B] + 10_000 * rank
    return {
        "pixels": torch.randn(B, PIXELS, generator=gen),
        "input_ids": torch.randint(0, VOCAB, (B, TOKENS), generator=gen),
        "attention_mask": torch.ones(B, TOKENS, dtype=torch.long),
        "ids": ids,
        "groups": ids // 3,
    }


def check(ok: bool, message: str, failures: list[str]) -> None:
    if not ok:
        failures.append(message)
        print(f"rank {D.rank()}: FAIL {message}", flush=True)


def full_parameters(engine) -> list[Tensor]:
    """Whole fp32 parameters from the optimizer's master copy (collective at stage 3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        full = safe_get_full_fp32_param(p)
        assert full is not None, "no fp32 master copy: is ZeRO enabled?"
        out.append(full.detach().clone().float().cpu())
    return out


def run(stage: int) -> list[str]:
    cfg = load_config(
        None,
        [
            f"engine.zero_stage={stage}",
            "engine.device=cpu",
            "dist.collective_timeout_s=60",
            f"train.batch_size={B}",
            "memory.size=20",
            f"memory.momentum={M}",
            "optim.lr=0.01",
            "optim.schedule=constant",
            "model.embed_dim=8",
            "model.head=mlp",
            "run.threads=1",
        ],
    )
    torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = DualEncoder(ImageTower(), TextTower(), HIDDEN, HIDDEN, cfg.model)
    momentum = make_momentum_copy(model)  # replicated, whole, float32 (as the loop does)
    reference = make_momentum_copy(model)
    initial = [p.detach().clone() for p in momentum.parameters()]
    shapes = [tuple(p.shape) for p in model.parameters()]
    engine = build_engine(model, cfg, total_steps=STEPS)
    memory = MomentumMemory(cfg.memory.size, cfg.model.embed_dim, seed=cfg.run.seed)
    stats = SimilarityStats()
    failures: list[str] = []
    check(engine.zero_optimization_stage() == stage, "engine runs another ZeRO stage", failures)
    for step in range(STEPS):
        warm = step == 0
        out = forward_step(
            engine,
            momentum,
            batch_of(step, D.rank()),
            memory,
            stats,
            cfg.fne,
            StepPosition(0, step, warm),
        )
        stats.add_step(out.stat_sums, cfg.fne.mixture_decay)  # the loop's commit
        engine.backward(out.loss)
        engine.step()
        if stage == 3:
            empty = [n for n, p in engine.module.named_parameters() if p.data.numel() == 0]
            check(bool(empty), "ZeRO-3 left every parameter whole: the test is vacuous", failures)
        with gathered_parameters(engine, trained_only=True):
            ema_update(momentum, engine.module, cfg.memory.momentum)
            gathered = [p.detach().clone() for p in engine.module.parameters()]
        full = full_parameters(engine)  # independent of gathered_parameters
        with torch.no_grad():
            for r, f in zip(reference.parameters(), full, strict=True):
                r.mul_(M).add_(f, alpha=1.0 - M)
        for (name, p_m), r, f, g, shape, p0 in zip(
            momentum.named_parameters(),
            reference.parameters(),
            full,
            gathered,
            shapes,
            initial,
            strict=True,
        ):
            where = f"stage {stage} step {step} {name}"
            check(tuple(f.shape) == shape, f"{where}: full parameter has shape {f.shape}", failures)
            check(torch.equal(g, f), f"{where}: gathered != optimizer fp32 copy", failures)
            check(tuple(p_m.shape) == shape, f"{where}: momentum shape {p_m.shape}", failures)
            check(bool(p_m.abs().sum() > 0), f"{where}: momentum is all zeros", failures)
            err = float((p_m - r).abs().max()) if p_m.shape == r.shape else float("inf")
            check(torch.equal(p_m, r), f"{where}: EMA differs from reference by {err}", failures)
            if "temperature" not in name:  # the only parameter without gradient here
                check(not torch.equal(p_m, p0), f"{where}: momentum never moved", failures)
        if not warm:
            g = out.gathered
            memory.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
    # the replicated momentum copies must be bit-identical across ranks
    flat = torch.cat([p.flatten() for p in momentum.parameters()])
    both = D.all_gather_no_grad(flat[None])
    check(torch.equal(both[0], both[-1]), "momentum copies differ between ranks", failures)
    return failures


def main() -> int:
    stage = int(sys.argv[1])
    env = rank_env()
    init_process_group(env, "gloo", 60.0)
    try:
        failures = run(stage)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait in a collective the other rank will never join
    ok = torch.tensor([0 if failures else 1])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank must pass
    print(f"rank {env.rank}: stage {stage}: {len(failures)} failure(s)", flush=True)
    dist.barrier()  # nobody tears down while the other rank still talks
    dist.destroy_process_group()
    return 0 if int(ok) == 1 else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip C++ static destructors: a gloo/DeepSpeed worker thread torn down at interpreter exit
    # aborted a passing run once ("terminate called without an active exception").
    os._exit(code)
