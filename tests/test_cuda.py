"""Checks that need a CUDA device (skipped without one; bench/gpu.sh runs them on a GPU box).

They import only torch and the project (no Ray, DeepSpeed, webdataset or model hub), so a
bare GPU machine with a copy of the tree can run them. ``FNE_CUDA_TESTS_DEVICE=cpu`` runs them
on the CPU instead (a dry run of the script: the sync check then checks nothing).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from fne_dist.config import ModelConfig
from fne_dist.fne import FneConfig, SimilarityStats, stats_of
from fne_dist.fne.loss import _compiled_dense
from fne_dist.fne.rules import FNE
from fne_dist.fne.sampling import step_uniforms
from fne_dist.fne.selection import CandidateLabels, Rows, select_dense
from fne_dist.memory import MomentumMemory
from fne_dist.model import DualEncoder
from fne_dist.momentum import ema_update, make_momentum_copy
from fne_dist.step import StepPosition, forward_step

CUDA = torch.device(os.environ.get("FNE_CUDA_TESTS_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)


@contextlib.contextmanager
def no_device_syncs():
    """Any synchronising CUDA call inside raises (on the CPU dry run: nothing to check)."""
    if CUDA.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _open_gaussians(mu_pos: float, device: torch.device):
    """Fitted from 300 positives / 600 negatives: the gate is open, so the Bayes part runs."""
    g = torch.Generator().manual_seed(1)
    stats = SimilarityStats(device=device)
    pos = mu_pos + 0.05 * torch.randn(300, generator=g, dtype=torch.float64)
    neg = mu_pos - 0.4 + 0.05 * torch.randn(600, generator=g, dtype=torch.float64)
    stats.add(stats_of(pos.to(device), neg.to(device)))
    return stats.gaussians()


@pytest.mark.system  # torch.compile starts compiler worker processes
@pytest.mark.parametrize("hard_cut", [True, False])
def test_cuda_compiled_dense_sampler_equals_eager(hard_cut: bool) -> None:
    """Invariant: on CUDA the dense selector fused by torch.compile (``fne.compile``) picks the
    same candidates as the eager one, for every anchor, with and without the hard cut."""
    gen = torch.Generator().manual_seed(0)
    b, n, d = 64, 4096, 64
    img = F.normalize(torch.randn(b, d, generator=gen), dim=1).to(CUDA)
    cand = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(CUDA)
    ids_N = torch.cat([torch.arange(b), torch.randint(0, 10 * n, (n - b,), generator=gen)]).to(CUDA)
    sim_BN = img @ cand.T
    # μ⁺ where ~5 % of the similarities lie in the window, so both window and fallback rows occur
    gauss = _open_gaussians(float(torch.quantile(sim_BN.flatten()[::7].double().cpu(), 0.95)), CUDA)
    cfg = FneConfig(hard_cut=hard_cut, compile=True)
    u = step_uniforms(3407, 0, b).to(CUDA)
    rows = Rows(sim_BN, torch.arange(b, device=CUDA), ids_N[:b], u[0])
    labels = CandidateLabels(ids_N)
    eager = select_dense(rows, labels, gauss, cfg, FNE)
    compiled = _compiled_dense()(rows, labels, gauss, cfg, FNE)
    assert torch.equal(eager.index_bk, compiled.index_bk)


@pytest.mark.parametrize("posterior", ["paper", "intra_mixture"])
def test_cuda_fne_step_syncs_nothing(posterior: str) -> None:
    """Invariant: on CUDA a training step's FNE path (forward, gather, statistics, the FNE loss
    and draws, backward, EMA, enqueue, the statistics' commit) never waits for the device:
    ``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call."""
    torch.manual_seed(0)
    model = DualEncoder(None, None, 32, 32, ModelConfig(embed_dim=16, head="mlp")).to(CUDA)
    momentum, memory = make_momentum_copy(model), MomentumMemory(256, 16, seed=0, device=CUDA)
    extra = {"stats_source": "all_pairs", "fallback": "unflagged"} if posterior != "paper" else {}
    cfg = FneConfig(gate_size=8, posterior=posterior, **extra)
    stats = SimilarityStats(device=CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):  # step 0 is the warm-up loss; the memory fills and wraps later
        batch = {
            "img_feat": torch.randn(32, 32, generator=gen),
            "txt_feat": torch.randn(32, 32, generator=gen),
            "ids": torch.arange(32) + 32 * step,
            "groups": torch.full((32,), -1),
        }
        batch = {k: v.to(CUDA) for k, v in batch.items()}
        with no_device_syncs():
            at = StepPosition(0, step, step == 0)
            out = forward_step(model, momentum, batch, memory, stats, cfg, at)
            out.loss.backward()
            stats.add_step(out.stat_sums, cfg.mixture_decay)
            ema_update(momentum, model, 0.99)
            g = out.gathered
            memory.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
        opt.step()  # outside: torch's optimizer is not ours
        opt.zero_grad(set_to_none=True)
    assert memory.writes == 6 * 32
    assert torch.isfinite(out.loss).item()
