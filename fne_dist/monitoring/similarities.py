"""Similarity samples for the FNE picture: a small bounded reservoir of
the positive and negative similarities the statistics are fitted on, and the JSON snapshot of
one evaluation (samples + the current Gaussians) that ``fne_dist.plot`` draws.

Legend: G rows of the gathered momentum block, P positives, Q negatives.

No new host sync on the step path: ``offer`` queues the rule on the step's gathered block
(a G × G product on the device, rank 0 only) and keeps the G × 4 result there; ``sample`` runs
at log windows only, where the loop already waits for the device
(``TrainState.take_window``), and brings the window's rows to the host in one copy. The samples
follow the statistics' mutual-top-1 rule (docs/algorithm.md §3) on the gathered *momentum*
block (G × G, the same on every rank), a close proxy of the per-rank online matrices the
statistics see (m = 0.995), available after the step without touching it.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..fne import Gaussians

CAPACITY = 4000  # samples kept per side between two evaluations


def mutual_top1_samples(sim_BB: Tensor, ids_B: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The positive (P) and negative (Q = 2P) samples ``fne.mutual_top1_stats`` sums, as
    values: A_ii of the mutual-top-1 pairs, and each pair's hardest other caption and hardest
    other image (same-id items excluded, ties to the diagonal). Tests hold their sums equal to
    ``mutual_top1_stats``."""
    rows_B4 = mutual_top1_rows(sim_BB, ids_B)
    sel_B = rows_B4[:, 3].bool()
    return rows_B4[sel_B, 0], torch.cat([rows_B4[sel_B, 1], rows_B4[sel_B, 2]])


def mutual_top1_rows(sim_BB: Tensor, ids_B: Tensor | None = None) -> Tensor:
    """Per row i (B × 4, float64): A_ii, the hardest other caption, the hardest other image,
    and 1 where the pair is mutual top-1 (else 0): fixed-size, so one copy brings it to the
    host without knowing how many pairs were selected."""
    a_BB = sim_BB.detach().to(torch.float64)
    B = a_BB.shape[0]
    eye_BB = torch.eye(B, dtype=torch.bool, device=a_BB.device)
    same_BB = eye_BB if ids_B is None else (ids_B[:, None] == ids_B[None, :]) | eye_BB
    neg_BB = a_BB.masked_fill(same_BB, -math.inf)
    hard_row_B, hard_col_B = neg_BB.amax(dim=1), neg_BB.amax(dim=0)
    diag_B = a_BB.diagonal()
    sel_B = (diag_B >= hard_row_B) & (diag_B >= hard_col_B)
    sel_B &= torch.isfinite(hard_row_B) & torch.isfinite(hard_col_B)
    return torch.stack([diag_B, hard_row_B, hard_col_B, sel_B.to(torch.float64)], dim=1)


class Reservoir:
    """A uniform sample of at most ``capacity`` values from a stream (Vitter's algorithm R),
    seeded: the same stream gives the same sample."""

    def __init__(self, capacity: int = CAPACITY, seed: int = 0) -> None:
        self.capacity, self.seen = capacity, 0
        self.values: list[float] = []
        self.rng = random.Random(seed)

    def extend(self, values: list[float]) -> None:
        for v in values:
            self.seen += 1
            if len(self.values) < self.capacity:
                self.values.append(v)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.capacity:
                    self.values[j] = v

    def clear(self) -> None:
        """Start a new sample (a new list: a snapshot holding the old one keeps it)."""
        self.values, self.seen = [], 0


class SimilaritySamples:
    """Positive and negative reservoirs, fed at log windows with every step's rows since."""

    def __init__(self, capacity: int = CAPACITY, seed: int = 0) -> None:
        self.pos, self.neg = Reservoir(capacity, seed), Reservoir(capacity, seed + 1)
        self.pending: list[Tensor] = []  # G × 4 row blocks on the device, not yet read
        self.pending_rows = 0

    def offer(self, img_GD: Tensor, txt_GD: Tensor, ids_G: Tensor) -> None:
        """The step's gathered momentum block: its mutual-top-1 rows are computed on the
        device (queued kernels, no sync) and kept until the next log window; beyond
        ``capacity`` rows the oldest blocks go (a window's later steps are as good)."""
        with torch.no_grad():
            rows_G4 = mutual_top1_rows(img_GD.detach() @ txt_GD.detach().T, ids_G)
        self.pending.append(rows_G4)
        self.pending_rows += rows_G4.shape[0]
        while self.pending_rows - self.pending[0].shape[0] >= self.pos.capacity:
            self.pending_rows -= self.pending.pop(0).shape[0]

    def sample(self) -> None:
        """At a log window: the rows offered since the last one into the reservoirs."""
        if not self.pending:
            return
        rows = torch.cat(self.pending).tolist()  # one device→host copy
        self.pending, self.pending_rows = [], 0
        picked = [r for r in rows if r[3]]
        self.pos.extend([r[0] for r in picked])
        self.neg.extend([r[1] for r in picked] + [r[2] for r in picked])

    def snapshot(self, step: int, g: Gaussians) -> dict[str, Any]:
        """The samples since the last snapshot and the current Gaussians, as JSON values;
        the reservoirs start again."""
        data = {
            "step": step,
            "gaussians": gaussians_to_dict(g),
            "pos": self.pos.values,
            "neg": self.neg.values,
            "pos_seen": self.pos.seen,
            "neg_seen": self.neg.seen,
        }
        self.pos.clear()
        self.neg.clear()
        return data


def gaussians_to_dict(g: Gaussians) -> dict[str, Any]:
    """The fitted statistics as plain numbers (host values of 0-dim tensors)."""
    return {
        "mu_pos": float(g.mu_pos),
        "var_pos": float(g.var_pos),
        "mu_neg": float(g.mu_neg),
        "var_neg": float(g.var_neg),
        "n_pos": float(g.n_pos),
        "has_mu_pos": bool(g.has_mu_pos),
        "gate_open": bool(g.gate_open),
        "variance": g.variance,
    }


def gaussians_from_dict(d: dict[str, Any]) -> Gaussians:
    """``gaussians_to_dict`` back to 0-dim float64 tensors the fne functions take."""

    def t(x: float | bool) -> Tensor:
        return torch.tensor(x, dtype=torch.bool if isinstance(x, bool) else torch.float64)

    keys = ("mu_pos", "var_pos", "mu_neg", "var_neg", "n_pos", "has_mu_pos", "gate_open")
    return Gaussians(**{k: t(d[k]) for k in keys}, variance=d["variance"])


def write_snapshot(directory: Path, data: dict[str, Any]) -> Path:
    """``fne-step-<step>.json`` in ``directory`` (the plot's source; regenerable pictures)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fne-step-{data['step']:08d}.json"
    path.write_text(json.dumps(data) + "\n")
    return path
