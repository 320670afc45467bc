"""How many times the step reads a tensor's value on the host.

On a GPU each such read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, an
op whose output size depends on values such as ``nonzero``) waits for every kernel queued so
far. docs/monitoring.md ("Host syncs") lists the ones a GPU run has; this test pins the count
of our own step code on its GPU path (the dense selector) by recording those calls through a
torch function mode, on the CPU, so it needs no GPU.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fne_dist.config import ModelConfig, load_config
from fne_dist.fne import FneConfig, SimilarityStats
from fne_dist.fne import detection as detection_module
from fne_dist.fne import host as host_module
from fne_dist.fne import loss as loss_module
from fne_dist.fne import selection as selection_module
from fne_dist.fne.selection import select_dense
from fne_dist.memory import MomentumMemory
from fne_dist.model import DualEncoder
from fne_dist.momentum import ema_update, make_momentum_copy
from fne_dist.monitoring.similarities import SimilaritySamples
from fne_dist.state import TrainState
from fne_dist.step import StepPosition, forward_step
from fne_dist.train import DEFAULT_CONFIG

HOST_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
}


class HostReads(TorchFunctionMode):
    """Counts the calls that read tensor values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls[HOST_READS[func]] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_host_reads() -> None:
    """Invariant: the recorder counts each kind of host read, so the test below can fail."""
    t = torch.tensor([1.0, 2.0])
    with HostReads() as reads:
        t.sum().item(), float(t[0]), bool(t[0] > 0), t.tolist(), t.nonzero()
    assert reads.calls == {"item": 1, "float": 1, "bool": 1, "tolist": 1, "nonzero": 1}


@pytest.mark.parametrize("warmup", [True, False])
def test_a_gpu_step_reads_nothing_on_the_host(
    monkeypatch: pytest.MonkeyPatch, warmup: bool
) -> None:
    """Invariant: phases 1-5, 7 and 8 of a step (forward, gather, statistics, FNE loss and
    draws, EMA, enqueue, the diagnostics' sums, the pictures' samples) on the GPU path read no
    tensor value on the host, in the warm-up and with the FNE loss over a full memory, with the
    default run's sampler (``fne`` of the packaged default.yaml: the intra_mixture posterior,
    all_pairs statistics, the unflagged fallback; a gate small enough to open here). The
    loop's only reads are at log windows (TrainState.take_window), outside this path."""
    monkeypatch.setattr(
        loss_module, "_selector", lambda _d, _c, _g, cfg, *_: (select_dense, 64, None)
    )
    # detection's host-only shortcut for unlabelled anchors: on a GPU it answers False without
    # a read (tests/test_fn_detection.py), which is the path this test pins
    for module in (detection_module, selection_module):
        monkeypatch.setattr(module, "known_unlabelled", lambda _groups: False)
    monkeypatch.setattr(host_module, "on_host", lambda _t: False)  # dense histogram, both fits
    torch.manual_seed(0)
    model = DualEncoder(None, None, 6, 6, ModelConfig(embed_dim=4, head="linear"))
    momentum, memory = make_momentum_copy(model), MomentumMemory(20, 4, seed=0)
    cfg = replace(load_config(DEFAULT_CONFIG).fne, gate_size=4)
    assert (cfg.posterior, cfg.stats_source, cfg.fallback) == (
        "intra_mixture",
        "all_pairs",
        "unflagged",
    ), "the default changed: update docs/monitoring.md (Host syncs) and this test"
    stats, state = SimilarityStats(), TrainState()
    samples = SimilaritySamples()
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        batch = {
            "img_feat": torch.randn(8, 6, generator=gen),
            "txt_feat": torch.randn(8, 6, generator=gen),
            "ids": torch.arange(8) + 8 * step,
            "groups": torch.full((8,), -1),
        }
        with HostReads() as reads:
            out = forward_step(
                model, momentum, batch, memory, stats, cfg, StepPosition(0, step, warmup)
            )
            stats.add_step(out.stat_sums, cfg.mixture_decay)  # the loop's commit
            out.loss.backward()
            ema_update(momentum, model, 0.99)
            g = out.gathered
            memory.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
            samples.offer(g.img_ND, g.txt_ND, g.ids_N)  # the pictures' rows (rank 0)
            state.add_diagnostics(out.loss, out.diagnostics)
        assert reads.calls == {}, (step, dict(reads.calls))
    assert memory.writes == 32  # the memory filled and wrapped: the FNE path saw candidates
    if not warmup:  # the CPU path (select_listed, taken by the paper's quadratic posterior)
        # does read: the recorder reaches the step
        monkeypatch.undo()
        paper, fresh = FneConfig(gate_size=4), SimilarityStats()
        with HostReads() as reads:
            forward_step(model, momentum, batch, memory, fresh, paper, StepPosition(0, 4, warmup))
        assert reads.calls, "the CPU selector's reads were not seen"
