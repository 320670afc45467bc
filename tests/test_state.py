"""The loop's state and the checkpoint's state writer, in one process (no training run)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fne_dist.checkpoint.format import RankState, load_state, save_state
from fne_dist.data.stream import ConsumerPosition, RankPosition
from fne_dist.state import TrainState


def _state_after_some_steps() -> TrainState:
    state = TrainState.fresh(torch.device("cpu"), warm=False)
    state.opt_step, state.n_micro, state.epoch, state.micro = 7, 14, 0, 13
    state.stale += torch.tensor([0.1, 3.0], dtype=torch.float64)
    for k in range(3):  # sums that float64 cannot hold exactly (0.1 + 0.2 ...)
        state.add_diagnostics(torch.tensor(0.1 * (k + 1)), {"n_pos": torch.tensor(k / 3)})
    state.history.append({"step": 5, "loss": 0.25})
    state.last_logged = {"loss": 0.25}
    state.position = RankPosition(0, 14, [ConsumerPosition(0, 1, 5, 14, "a.tar")], 11)
    return state


def test_train_state_round_trips_through_a_checkpoint_file() -> None:
    """Invariant: the state written to a checkpoint (through JSON, as rank-<r>.json holds it)
    and read back continues bit-identically: the next window's means, counters, staleness and
    data position are the same as the uninterrupted state's."""
    a = _state_after_some_steps()
    saved = a.to_rank_state(global_batch=16, with_history=True)
    loaded = json.loads(json.dumps({"c": saved.counters, "p": saved.data_position}))
    b = TrainState.from_rank_state(RankState(loaded["c"], loaded["p"]), torch.device("cpu"), 100, 3)
    assert (b.opt_step, b.n_micro, b.epoch, b.micro) == (a.opt_step, a.n_micro, a.epoch, a.micro)
    assert b.position == a.position and b.history == a.history
    assert b.saved_at == 7 and b.warm is False  # past the 3 warm-up steps
    for s in (a, b):
        s.add_diagnostics(torch.tensor(0.7), {"n_pos": torch.tensor(1.0)})
    assert a.take_window() == b.take_window()  # exact float equality, not approx
    # the epoch's diagnostics continue too: the resumed epoch's means equal the uninterrupted
    assert a.close_epoch() == b.close_epoch() and a.close_epoch() == {}
    assert b.epoch_diag.epochs[-1]["epoch"] == 0 and b.epoch_diag.epochs[-1]["steps"] == 4
    assert a.staleness() == b.staleness()
    assert saved.counters["samples_seen"] == 14 * 16


def test_train_state_starts_a_new_epoch_after_an_epoch_end_checkpoint() -> None:
    """Invariant: a checkpoint written at an epoch's last batch resumes with epoch −1, so the
    next batch starts the next epoch (and the loop resets the statistics), as an uninterrupted
    run does; a mid-epoch one keeps its epoch."""
    saved = _state_after_some_steps().to_rank_state(16, with_history=False)
    assert saved.counters["history"] == []  # only rank 0 keeps the history
    at_end = TrainState.from_rank_state(saved, torch.device("cpu"), 14, 3)  # 14 of 14 steps
    mid = TrainState.from_rank_state(saved, torch.device("cpu"), 15, 3)
    assert at_end.epoch == -1 and mid.epoch == 0


def test_save_state_round_trips_an_optimizer_and_schedule(tmp_path: Path) -> None:
    """Invariant: ``checkpoint.save_state`` keeps an AdamW + LambdaLR state exactly (integer
    parameter ids, tuple betas, tensors, None), so an optimizer restored from it takes the
    same next step bit for bit as the one that was saved; and it writes no pickle."""

    def make(model: torch.nn.Module):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    def step(model, opt, sched, seed: int) -> None:
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    opt_a, sched_a = make(a)
    for seed in range(3):
        step(a, opt_a, sched_a, seed)
    state = {"model": a.state_dict(), "optimizer": opt_a.state_dict(), "scheduler": None}
    state["scheduler"] = sched_a.state_dict()
    save_state(tmp_path, "state", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]

    b = torch.nn.Linear(3, 2)
    opt_b, sched_b = make(b)
    loaded = load_state(tmp_path, "state")
    assert list(loaded["optimizer"]["state"]) == [0, 1]  # integer ids, not "0", "1"
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    b.load_state_dict(loaded["model"])
    opt_b.load_state_dict(loaded["optimizer"])
    sched_b.load_state_dict(loaded["scheduler"])
    step(a, opt_a, sched_a, 9)
    step(b, opt_b, sched_b, 9)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert sched_a.get_last_lr() == sched_b.get_last_lr()
