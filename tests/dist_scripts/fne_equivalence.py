"""One rank of the gloo runs behind tests/test_distributed_equivalence.py (CPU, no DeepSpeed).

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python fne_equivalence.py MODE OUT

Every rank builds the same model, momentum copy, memory and data from fixed seeds, then runs
the loop's step order by hand: ``forward_step`` → backward → gradients averaged over ranks
(all_reduce / W, what DeepSpeed does) → plain SGD → ``ema_update`` → ``memory.enqueue``.
Rank r of a step takes rows r·B .. (r+1)·B − 1 of that step's global batch, so W ranks × B see
the same pairs as 1 rank × W·B. Each rank writes what the test compares to OUT/rank{r}.pt.

Modes:
  memory  2 warm-up + 6 FNE steps; writes the final memory (and the pairs enqueued).
  equiv   3 FNE steps from a pre-filled memory and pre-loaded statistics that open the gate;
          writes per step the candidates, the statistics added, the picks, the loss, the
          averaged gradients and the updated parameters, and the loss the loop would log for
          the 3 steps (``TrainState.take_window``, ``close_epoch``). At world size 1 the
          statistics the step adds are replaced by the block-wise ones of the W = 2 split (see
          BlockStats), and the process also runs one plain ``forward_step`` with and then
          without a process group (check c).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from fne_dist import distributed as D
from fne_dist.config import ModelConfig
from fne_dist.fne import Candidates, FneConfig, SimilarityStats, mutual_top1_stats, stats_of
from fne_dist.fne.rules import FNE
from fne_dist.fne.sampling import step_uniforms
from fne_dist.fne.selection import CandidateLabels, Rows, select_listed
from fne_dist.memory import MomentumMemory
from fne_dist.model import DualEncoder
from fne_dist.momentum import ema_update, make_momentum_copy
from fne_dist.state import TrainState
from fne_dist.step import StepPosition, forward_step

SEED = 7
N_IMAGES, CAPTIONS_PER_IMAGE = 40, 2  # two captions share an image id: same-id masking matters
FEAT, EMBED = 12, 8
LR, EMA_M = 0.5, 0.9
# Global batch 2·B per step in every mode; memories whose size does not divide it (wrap-around).
GLOBAL_BATCH = {"memory": 12, "equiv": 16}
MEMORY_SIZE = {"memory": 40, "equiv": 28}
STEPS = {"memory": 8, "equiv": 3}
WARMUP_STEPS = {"memory": 2, "equiv": 0}
# Large prior and ε so that P_fn > ε happens: with an open gate the Bayes part is used.
FNE_CFG = FneConfig(prior=0.2, eps=0.05)


def make_data() -> dict[str, Tensor]:
    """Fixed cached-feature pairs: captions are noisy copies of their image's feature."""
    gen = torch.Generator().manual_seed(SEED)
    img_feat = torch.randn(N_IMAGES, FEAT, generator=gen)
    image_of = torch.arange(N_IMAGES).repeat_interleave(CAPTIONS_PER_IMAGE)
    txt_feat = img_feat[image_of] + 1.2 * torch.randn(len(image_of), FEAT, generator=gen)
    return {
        "img_feat": img_feat[image_of],
        "txt_feat": txt_feat,
        "ids": 1000 + image_of,
        "groups": image_of // 4,  # families of four images
    }


def global_rows(step: int, global_batch: int) -> Tensor:
    """Pair indices of a step's global batch (the same on every rank)."""
    n_pairs = N_IMAGES * CAPTIONS_PER_IMAGE
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(SEED * 100 + step))
    return order[:global_batch]


def local_batch(data: dict[str, Tensor], step: int, global_batch: int, rank: int, world: int):
    B = global_batch // world
    rows = global_rows(step, global_batch)[rank * B : (rank + 1) * B]
    return {k: v[rows] for k, v in data.items()}


def make_model() -> DualEncoder:
    """Linear heads (no batch-dependent layer); the text head starts as a copy of the image
    head, so a pair's embeddings are similar and mutual top-1 pairs exist."""
    torch.manual_seed(SEED)
    model = DualEncoder(None, None, FEAT, FEAT, ModelConfig(embed_dim=EMBED, head="linear"))
    model.text_head.load_state_dict(model.image_head.state_dict())
    return model


def preloaded_stats(open_gate: bool) -> SimilarityStats:
    """Statistics as if 300 mutual top-1 pairs had been seen this epoch (gate_size 200)."""
    stats = SimilarityStats()
    if open_gate:
        gen = torch.Generator().manual_seed(SEED + 1)
        pos = 0.45 + 0.15 * torch.randn(300, generator=gen, dtype=torch.float64)
        neg = 0.15 + 0.2 * torch.randn(600, generator=gen, dtype=torch.float64)
        stats.add(stats_of(pos, neg))
    return stats


def build_state(mode: str, data: dict[str, Tensor]):
    """Model, momentum copy, memory and statistics, identical in every process."""
    model = make_model()
    momentum = make_momentum_copy(model)
    memory = MomentumMemory(MEMORY_SIZE[mode], EMBED, seed=SEED)
    if mode == "equiv":  # fill the memory with momentum embeddings of earlier global batches
        for step in (-2, -1):
            batch = local_batch(data, step, GLOBAL_BATCH[mode], 0, 1)
            with torch.no_grad():
                m_img, m_txt, _ = momentum(batch)
            memory.enqueue(m_img, m_txt, batch["ids"], batch["groups"])
    return model, momentum, memory, preloaded_stats(mode == "equiv")


class BlockStats(SimilarityStats):
    """Test double: records every batch statistic added (``forward_step``'s view of the step,
    then the loop's commit of it) and, when ``replacement`` is set, adds that instead.

    At W = 2 each rank applies the mutual-top-1 rule to its own B×B block and the sums are
    all-reduced; one rank with the 2B batch would apply it to the 2B×2B matrix, a different
    (documented) quantity. The 1-rank reference therefore adds block0 + block1.
    """

    def __init__(self, base: SimilarityStats) -> None:
        super().__init__()
        self.totals = base.totals.clone()
        self.replacement: Tensor | None = None
        self.added: list[Tensor] = []

    def add(self, batch_stats: Tensor) -> None:
        self.added.append(batch_stats.clone())
        super().add(batch_stats if self.replacement is None else self.replacement)


def recompute_picks(model, batch, cands: Candidates, stats, step, rank, world) -> dict:
    """The draws of this rank's anchors, recomputed outside ``forward_step`` with the same
    Gaussians and uniforms, and the loss they imply."""
    B = batch["ids"].shape[0]
    g = stats.gaussians(FNE_CFG.gate_size, FNE_CFG.var_floor, FNE_CFG.variance)
    u = step_uniforms(SEED, step, B * world, FNE_CFG.negatives, rank, B)
    pos_col = rank * B + torch.arange(B)
    out: dict = {}
    loss = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        img, txt, _ = model(batch)
        for name, anchor, cand, u_Bk in (
            ("i2t", img, cands.txt_ND, u[0]),
            ("t2i", txt, cands.img_ND, u[1]),
        ):
            sim = anchor @ cand.T
            rows = Rows(sim, pos_col, batch["ids"], u_Bk)
            p = select_listed(rows, CandidateLabels(cands.ids_N, cands.groups_N), g, FNE_CFG, FNE)
            pos = sim.gather(1, pos_col[:, None])
            hinge = (FNE_CFG.margin + p.sim_bk - pos).clamp_min(0) * p.valid_bk
            loss += (hinge.sum(1) / p.valid_bk.sum(1).clamp_min(1)).mean().double()
            out[f"{name}_index"] = p.index_bk
            out[f"{name}_valid"] = p.valid_bk
            out[f"{name}_n_fn"] = p.count("fn")
    out["loss"] = loss
    out["gate_open"] = g.gate_open
    return out


def average_gradients(model: torch.nn.Module, world: int) -> None:
    for p in model.parameters():
        if p.grad is not None and world > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def run(mode: str, rank: int, world: int, block_reference: bool) -> dict:
    """The training steps of ``mode``; returns the per-step records of this rank."""
    data = make_data()
    model, momentum, memory, base_stats = build_state(mode, data)
    stats = BlockStats(base_stats)
    G = GLOBAL_BATCH[mode]
    steps = []
    logged = TrainState.fresh(torch.device("cpu"), warm=False)  # what the loop logs
    logged.epoch = logged.diag_epoch = 0
    for step in range(STEPS[mode]):
        warm = step < WARMUP_STEPS[mode]
        batch = local_batch(data, step, G, rank, world)
        rec: dict = {}
        if block_reference:  # 1 rank × 2B: the statistics of the two B-blocks of the W=2 run
            with torch.no_grad():
                img, txt, _ = model(batch)
            half = G // 2
            blocks = [slice(0, half), slice(half, G)]
            rec["block_stats"] = [
                mutual_top1_stats(img[s] @ txt[s].T, batch["ids"][s]) for s in blocks
            ]
            stats.replacement = rec["block_stats"][0] + rec["block_stats"][1]
        totals_before = stats.totals.clone()
        model.zero_grad(set_to_none=True)
        out = forward_step(
            model, momentum, batch, memory, stats, FNE_CFG, StepPosition(SEED, step, warm)
        )
        stats.add_step(out.stat_sums, FNE_CFG.mixture_decay)  # the loop's commit
        rec["stats_added"] = stats.totals - totals_before
        rec["stats_forward_step"] = stats.added[-1]  # what forward_step computed and reduced
        rec["loss"] = out.loss.detach().clone()
        rec["diagnostics"] = {k: v.detach().clone() for k, v in out.diagnostics.items()}
        logged.add_diagnostics(out.loss, out.diagnostics)
        if not warm:
            cands = Candidates.concat(out.gathered, memory.candidates())
            rec["cand"] = {
                "img": cands.img_ND.clone(),
                "txt": cands.txt_ND.clone(),
                "ids": cands.ids_N.clone(),
                "groups": cands.groups_N.clone(),
                "n_batch": torch.tensor(cands.n_batch),
            }
            rec["picks"] = recompute_picks(model, batch, cands, stats, step, rank, world)
        out.loss.backward()
        average_gradients(model, world)
        rec["grads"] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(LR * p.grad)
        ema_update(momentum, model, EMA_M)
        if not warm:
            g = out.gathered
            memory.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
        rec["memory"] = memory.state_dict()
        rec["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        rec["momentum"] = {n: p.detach().clone() for n, p in momentum.named_parameters()}
        steps.append(rec)
    # the loop's log window and epoch row over these steps (every rank: they all-reduce)
    window, epoch_row = logged.take_window(), logged.close_epoch()
    return {
        "steps": steps,
        "memory": memory.state_dict(),
        "world": torch.tensor(world),
        "window": {k: torch.tensor(v) for k, v in window.items()},
        "epoch_row": {k: torch.tensor(v) for k, v in epoch_row.items() if k.startswith("loss")},
    }


def plain_first_step() -> dict:
    """One ``forward_step`` of the equiv set-up with the real statistics (check c)."""
    data = make_data()
    model, momentum, memory, stats = build_state("equiv", data)
    batch = local_batch(data, 0, GLOBAL_BATCH["equiv"], 0, 1)
    out = forward_step(model, momentum, batch, memory, stats, FNE_CFG, StepPosition(SEED, 0, False))
    stats.add_step(out.stat_sums, FNE_CFG.mixture_decay)  # the loop's commit
    return {
        "loss": out.loss.detach().clone(),
        "diagnostics": {k: v.detach().clone() for k, v in out.diagnostics.items()},
        "gathered_img": out.gathered.img_ND.clone(),
        "stats": stats.totals.clone(),
        "world_size": torch.tensor(D.world_size()),
        "group": torch.tensor(dist.is_initialized()),
    }


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)  # same thread count everywhere: bitwise-comparable kernels
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )  # MASTER_ADDR / MASTER_PORT from the environment
    assert D.world_size() == world and D.rank() == rank
    result = run(mode, rank, world, block_reference=mode == "equiv" and world == 1)
    if mode == "equiv" and world == 1:
        result["plain_with_group"] = plain_first_step()
    dist.barrier()
    dist.destroy_process_group()
    if mode == "equiv" and world == 1:
        result["plain_without_group"] = plain_first_step()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"rank{rank}.pt.tmp"
    torch.save(result, tmp)
    tmp.replace(out_dir / f"rank{rank}.pt")
    print(f"rank {rank}/{world} {mode}: done", flush=True)


if __name__ == "__main__":
    main()
