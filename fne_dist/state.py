"""The training loop's state: what it carries from one step to the next, and the part of it a
checkpoint holds (``rank-<r>.json``'s counters and data position; the RNG states, engine,
memory and statistics are saved next to it by ``checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import distributed as dist_ops
from .checkpoint.format import CheckpointError, RankState
from .data.stream import RankPosition
from .run_summary import RATIOS, EpochDiagnostics, ratios_of_sums

GLOBAL_KEYS = ("loss", "loss_i2t", "loss_t2i")
"""The sums reported as the global batch's (the mean over ranks of each rank's mean over its
B anchors: the loss DDP/DeepSpeed average the gradients of), not this rank's own. The other
diagnostics stay this rank's."""


def mean_over_ranks(sums: dict[str, Tensor | float], device: torch.device) -> None:
    """Replace each of ``GLOBAL_KEYS`` in ``sums`` by its mean over ranks, in ONE all-reduce of
    a fixed-length vector (a key absent here sends 0 and stays absent). Every rank must call it
    at the same point (log windows and epoch ends are agreed); an identity at world size 1."""
    world = dist_ops.world_size()
    if world == 1:
        return
    local = [
        torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64, device=device) for k in GLOBAL_KEYS
    ]
    total = dist_ops.all_reduce_sum(torch.stack(local)) / world
    for i, key in enumerate(GLOBAL_KEYS):
        if key in sums:
            sums[key] = total[i]


@dataclass
class TrainState:
    """Counters, sums and history of one rank's run."""

    opt_step: int = 0  # optimizer steps taken
    n_micro: int = 0  # micro-batches trained on (in every process of this run)
    epoch: int = -1  # epoch of the last micro-batch; −1: the next batch starts a new one
    # (sum of cosines, count) of this rank's anchors found in the memory, since the start
    stale: Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    # diagnostics summed since the last log line, and "_n" the micro-batches summed
    sums: dict[str, Tensor | float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # log lines and evaluations
    last_logged: dict[str, float] = field(default_factory=dict)
    position: RankPosition | None = None  # data position after the last batch
    micro: int = -1  # the last micro step run (−1: none yet)
    skipped_nonfinite: int = 0  # micro steps skipped for a non-finite loss (never applied)
    # every step's diagnostics since the epoch began, and one row of means per finished epoch
    epoch_diag: EpochDiagnostics = field(default_factory=EpochDiagnostics)
    diag_epoch: int = -1  # the epoch epoch_diag's open sums belong to
    # this process only, never in a checkpoint:
    warm: bool = True  # whether the last step was a warm-up step
    saved_at: int = -1  # optimizer step of the last checkpoint written or resumed from
    checkpoint_s: float | None = None  # seconds the last checkpoint written here took
    nonfinite_in_row: int = 0  # micro steps skipped in a row for a non-finite loss

    @classmethod
    def fresh(cls, device: torch.device, warm: bool) -> TrainState:
        return cls(stale=torch.zeros(2, dtype=torch.float64, device=device), warm=warm, saved_at=0)

    def add_diagnostics(self, loss: Tensor, diagnostics: dict[str, Tensor]) -> None:
        """Sum one micro-batch's loss and diagnostics (float64, on the device: no host sync)."""
        for key, value in {"loss": loss.detach(), **diagnostics}.items():
            if key in RATIOS:  # recomputed from its sums in take_window
                continue
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().to(torch.float64)
        self.sums["_n"] = self.sums.get("_n", 0.0) + 1.0
        self.epoch_diag.add({"loss": loss, **diagnostics})
        self.diag_epoch = self.epoch

    def close_epoch(self) -> dict[str, Any]:
        """The finished epoch's mean diagnostics (appended to ``epoch_diag.epochs``); its loss
        is the global batch's (one all-reduce per epoch, every rank calls this)."""
        if self.epoch_diag.steps:
            mean_over_ranks(self.epoch_diag.sums, self.stale.device)  # type: ignore[arg-type]
        return self.epoch_diag.close_epoch(self.diag_epoch)

    def take_window(self) -> dict[str, float]:
        """The means of the sums since the last log line; the sums start again. The loss is
        the global batch's (``mean_over_ranks``: one all-reduce per log window, not per step;
        every rank calls this at the same log windows)."""
        n = float(self.sums.pop("_n"))  # a host float: one per micro step
        mean_over_ranks(self.sums, self.stale.device)
        keys = list(self.sums)
        # one device→host copy for every mean (a float() each would be one read per key)
        values = torch.stack([torch.as_tensor(self.sums[k]) for k in keys]).tolist() if keys else []
        self.sums.clear()
        return ratios_of_sums({k: v / n for k, v in zip(keys, values, strict=True)})

    def staleness(self) -> float | None:
        """Mean cosine between an anchor's momentum embedding and its entry in the memory."""
        total, count = self.stale.tolist()  # one device→host copy
        return total / count if count > 0 else None

    def to_rank_state(self, global_batch: int, with_history: bool) -> RankState:
        """The checkpoint's counters (``rank-<r>.json``) and data position."""
        counters = {
            "opt_step": self.opt_step,
            "n_micro": self.n_micro,
            "micro": self.micro,
            "epoch": self.epoch,
            "stale": self.stale.tolist(),
            "sums": {k: float(v) for k, v in self.sums.items()},
            "history": self.history if with_history else [],
            "last_logged": self.last_logged,
            "epoch_diag": {
                "epoch": self.diag_epoch,
                "steps": self.epoch_diag.steps,
                "sums": {k: float(v) for k, v in self.epoch_diag.sums.items()},
                "epochs": self.epoch_diag.epochs,
            },
            "samples_seen": self.n_micro * global_batch,
            "skipped_nonfinite": self.skipped_nonfinite,
        }
        return RankState(counters, self.position.to_dict() if self.position else None)

    @classmethod
    def from_rank_state(
        cls,
        saved: RankState,
        device: torch.device,
        steps_per_epoch: int,
        warmup_steps: int,
        source: str = "the rank file",
    ) -> TrainState:
        """The state ``to_rank_state`` saved, continuing in this process; a saved state of
        another shape (a re-hashed, edited rank file) is one CheckpointError naming ``source``."""
        try:
            return cls._from_rank_state(saved, device, steps_per_epoch, warmup_steps)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            what = f"no {err}" if isinstance(err, KeyError) else " ".join(str(err).split())[:200]
            raise CheckpointError(f"{source} is malformed ({what})") from None

    @classmethod
    def _from_rank_state(
        cls, saved: RankState, device: torch.device, steps_per_epoch: int, warmup_steps: int
    ) -> TrainState:
        c = saved.counters
        position = RankPosition.from_dict(saved.data_position)
        return cls(
            opt_step=c["opt_step"],
            n_micro=c["n_micro"],
            # saved at an epoch's end: the next batch starts an epoch (the statistics reset)
            epoch=-1 if position.step >= steps_per_epoch else c["epoch"],
            stale=torch.tensor(c["stale"], dtype=torch.float64, device=device),
            sums={
                k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in c["sums"].items()
            },
            history=c["history"],
            last_logged=c["last_logged"],
            position=position,
            micro=c["micro"],
            skipped_nonfinite=c.get("skipped_nonfinite", 0),  # older checkpoints: none
            epoch_diag=_epoch_diag(c.get("epoch_diag"), device),
            diag_epoch=c.get("epoch_diag", {}).get("epoch", -1),
            warm=c["opt_step"] < warmup_steps,
            saved_at=c["opt_step"],
        )


def _epoch_diag(saved: dict[str, Any] | None, device: torch.device) -> EpochDiagnostics:
    """The per-epoch diagnostics a checkpoint holds (none in checkpoints before they existed)."""
    diag = EpochDiagnostics()
    if saved:
        diag.steps = saved["steps"]
        diag.sums = {
            k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in saved["sums"].items()
        }
        diag.epochs = saved["epochs"]
    return diag
