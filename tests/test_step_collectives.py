"""How many collectives a 2-rank training step makes (gloo, the real loop)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fne_dist.distributed.launch import free_port
from fne_dist.nonfinite import grads_finite, poisoned

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "step_collectives.py"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
NAN_STEP = 6  # 1-based: a warm-up step (3) and a few FNE steps come before it
LOG_EVERY = 4  # a log window after micro steps 4, 8, ...: its all-reduce comes before the next


def _run(out: Path, *overrides: str, nan_rank: int | None = None) -> list[list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [
        f"run.output_dir={out}", "run.name=count", "run.threads=1", "dist.workers=2",
        "engine.kind=ddp", "train.batch_size=8", "train.epochs=0.05",
        f"train.log_every={LOG_EVERY}", "train.eval_every=0", "checkpoint.at_epoch_end=false",
        *overrides,
    ]  # fmt: skip
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        )  # fmt: skip
        if nan_rank is not None:
            env.update(NAN_RANK=str(nan_rank), NAN_STEP=str(NAN_STEP))
        cmd = [sys.executable, str(SCRIPT), str(out), str(TINY), *args]
        procs.append(
            subprocess.Popen(
                cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    deadline = time.monotonic() + 240
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [p.stdout.read()[-3000:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.system
@pytest.mark.timeout(300)
def test_a_ddp_step_makes_one_gather_and_one_all_reduce(tmp_path: Path) -> None:
    """Invariants (2 ranks, DDP, grad_accum 1, gloo): a finite step's own collectives are the
    packed gather and the statistics' all-reduce (the non-finite flag rides on DDP's gradient
    all-reduce, which is not counted here; the next step's data agreement rides on the
    gather); between two steps of an epoch there is nothing, and after a log window its one
    all-reduce (the global loss); a NaN loss on one rank only is still skipped on both ranks
    (the NaN reaches the other through the gradient all-reduce; one extra all-reduce on that
    skip path only), and the weights stay finite. Any further collective fails it."""
    ranks = _run(tmp_path, nan_rank=1)
    assert [s["weights"] for s in ranks[0]] == [s["weights"] for s in ranks[1]]
    for steps in ranks:
        assert len(steps) >= NAN_STEP + 3, len(steps)
        assert steps[0]["between"][-1:] == ["all_reduce"], steps[0]  # the first step agrees alone
        for s in steps[1:]:  # the first step's "between" holds the run's start-up
            logged = s["micro"] % LOG_EVERY == 0  # the step before it closed a log window
            assert s["between"] == ["all_reduce"] * (1 if logged else 0), s
        for s in steps:
            assert s["weights_finite"], s
            if s["micro"] + 1 == NAN_STEP:
                assert s["skipped"] == 1, s
                assert s["inside"] == ["all_gather", "all_reduce", "all_reduce"], s
            else:
                assert s["inside"] == ["all_gather", "all_reduce"], s
                assert s["skipped"] == (1 if s["micro"] + 1 > NAN_STEP else 0), s


@pytest.mark.system
@pytest.mark.timeout(300)
def test_ddp_with_infonce_trains_the_temperature_after_the_warm_up(tmp_path: Path) -> None:
    """Invariant: with infonce the temperature gets no gradient in the warm-up (vse_pp) and one
    after it: DDP neither waits for it nor leaves it out (its ranks' weights stay equal, and
    the temperature moves once the warm-up is over). With the other losses it is left out of
    DDP's all-reduce (the test above: its ranks' weights stay equal too)."""
    ranks = _run(tmp_path, "fne.loss=infonce")
    assert [s["weights"] for s in ranks[0]] == [s["weights"] for s in ranks[1]]
    temperature = [s["temperature"] for s in ranks[0]]  # after each step; 3 warm-up steps
    start = float(torch.tensor([0.07]))  # the model's initial value, in float32
    assert temperature[:3] == [start] * 3 and temperature[-1] != start, temperature


def test_ddp_waits_only_for_gradients_that_come() -> None:
    """Invariant (``engine.ddp_unused_parameters``): the temperature is the only parameter a
    step can leave without a gradient: under every loss but infonce (which never reads it) DDP
    leaves it out, in both spellings DDP compares (``temperature``, ``.temperature``), and
    does not search for unused parameters; infonce searches only when a warm-up can leave it
    without one; a model without a temperature needs neither."""
    from fne_dist.config import load_config
    from fne_dist.engine import ddp_unused_parameters

    class WithTemperature(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(2, 2)
            self.temperature = torch.nn.Parameter(torch.tensor([0.07]))

    model = WithTemperature()
    ignored = ["temperature", ".temperature"]
    for loss in ("fne", "vse_pp", "vse0"):
        cfg = load_config(TINY, [f"fne.loss={loss}"])
        assert ddp_unused_parameters(model, cfg) == (False, ignored), loss
    for warmup, search in ((3, True), (0, False)):
        cfg = load_config(TINY, ["fne.loss=infonce", f"train.warmup_steps={warmup}"])
        assert ddp_unused_parameters(model, cfg) == (search, [])
    assert ddp_unused_parameters(torch.nn.Linear(2, 2), load_config(TINY)) == (False, [])


def test_a_poisoned_loss_keeps_finite_gradients_bit_for_bit_and_spreads_nan() -> None:
    """Invariants: ``poisoned(loss)`` of a finite loss has the loss's value and gradients bit
    for bit (x·1 = x); of a non-finite loss, every gradient is NaN, even when the NaN did not
    come through the weights (an added constant), so the gradient check sees it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    x = torch.randn(9, 5)

    def grads(transform) -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        loss = transform(net(x).square().mean() * 3.7)
        loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads(lambda loss: loss)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads(poisoned), strict=True))
    assert torch.equal(poisoned(torch.tensor(2.5)), torch.tensor(2.5))
    assert grads_finite(net)
    for bad in (float("nan"), float("inf")):
        nan = grads(lambda loss, b=bad: poisoned(loss + b))
        assert all(g.isnan().all() for g in nan) and not grads_finite(net)


def test_threads_per_rank_splits_the_cores_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: run.threads wins; unset (null), the user's OMP_NUM_THREADS; else the usable
    cores split over the node's ranks, at least one each."""
    from fne_dist.distributed import device

    monkeypatch.setattr(device.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert device.threads_per_rank(3, 2) == 3
    assert [device.threads_per_rank(None, n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert device.threads_per_rank(None, 2) == 5 and device.threads_per_rank(1, 2) == 1


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_openmp_threads_wait_passively_unless_told(
    given: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: a process that starts in fne_dist (``python -m fne_dist.train``, the ranks of
    every launcher) has OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP, which reads it only
    then (a spinning waiter holds a shared core): the package sets it on import, and imports
    nothing that could load torch first; a user's own value is kept."""
    import ast
    import importlib

    import fne_dist

    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    importlib.reload(fne_dist)
    assert os.environ["OMP_WAIT_POLICY"] == (given or "PASSIVE")
    tree = ast.parse(Path(fne_dist.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported == {"os"}
