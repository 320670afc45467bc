"""W ranks × B equals 1 rank × W·B (docs/algorithm.md §5): real gloo processes on the CPU.

Each test launches ``tests/dist_scripts/fne_equivalence.py`` once per rank (plain subprocesses
joined through MASTER_ADDR/MASTER_PORT, 30 s collective timeout, killed on failure or timeout);
every rank writes its records to a file and the test compares them here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fne_dist.distributed.launch import free_port
from fne_dist.memory import EMPTY_ID, MomentumMemory

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "fne_equivalence.py"
LAUNCH_TIMEOUT_S = 90.0

_spec = importlib.util.spec_from_file_location("fne_equivalence_worker", SCRIPT)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def launch(mode: str, world: int, out_dir: Path) -> list[dict]:
    """Run ``world`` ranks of the worker; return each rank's records. Every process is killed
    if one fails or the launch outlives LAUNCH_TIMEOUT_S."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    try:
        for rank in range(world):
            log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), mode, str(out_dir)],
                    cwd=ROOT,
                    env=_rank_env(rank, world, port),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * world:
        tails = "\n".join(
            f"--- rank {r} (exit {c}) ---\n{(out_dir / f'rank{r}.log').read_text()[-3000:]}"
            for r, c in enumerate(codes)
        )
        pytest.fail(f"{mode} run with {world} rank(s) failed:\n{tails}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def equiv_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    """The equiv set-up run once with 2 ranks × B and once with 1 rank × 2B."""
    base = tmp_path_factory.mktemp("equiv")
    return {world: launch("equiv", world, base / f"w{world}") for world in (2, 1)}


def test_memories_bit_identical_across_ranks_after_wraparound(tmp_path: Path) -> None:
    """Invariant: every rank enqueues the same gathered block at the same pointer, so after
    N steps (warm-up, then FNE; K = 40 does not divide G = 12, so the ring wraps) the memories
    are bit-identical on all ranks without any broadcast, after every step: embeddings, ids,
    groups, write order, pointer. The ids are those of the global batches in rank order (the
    newest write of each slot), and the online and momentum models (averaged gradients) are
    identical too."""
    r0, r1 = launch("memory", 2, tmp_path)
    for step, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"], strict=True)):
        for key in s0["memory"]:  # after every step, partly initial slots included
            assert torch.equal(s0["memory"][key], s1["memory"][key]), (step, key)
    m0, m1 = r0["memory"], r1["memory"]
    for key in m0:
        assert torch.equal(m0[key], m1[key]), f"memory '{key}' differs between ranks"

    G, K = worker.GLOBAL_BATCH["memory"], worker.MEMORY_SIZE["memory"]
    fne_steps = range(worker.WARMUP_STEPS["memory"], worker.STEPS["memory"])
    assert K % G != 0 and len(fne_steps) * G > K  # wrap-around, not at a block boundary
    data = worker.make_data()
    enqueued_ids = torch.cat([data["ids"][worker.global_rows(s, G)] for s in fne_steps])
    enqueued_groups = torch.cat([data["groups"][worker.global_rows(s, G)] for s in fne_steps])
    expected_ids = torch.full((K,), EMPTY_ID, dtype=torch.long)
    expected_groups = expected_ids.clone()
    for t in range(len(enqueued_ids)):  # a plain one-row-at-a-time ring
        expected_ids[t % K], expected_groups[t % K] = enqueued_ids[t], enqueued_groups[t]
    assert torch.equal(m0["ids"], expected_ids)
    assert torch.equal(m0["groups"], expected_groups)
    n = len(enqueued_ids)
    assert m0["ptr_writes"].tolist() == [n % K, n]
    initial = MomentumMemory(K, worker.EMBED, seed=worker.SEED)
    assert not torch.isclose(m0["img"], initial.img_KD).all(dim=1).any()  # every slot rewritten

    last0, last1 = r0["steps"][-1], r1["steps"][-1]
    for key in ("params", "momentum"):
        for name in last0[key]:
            assert torch.equal(last0[key][name], last1[key][name]), f"{key} {name} differs"


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_two_ranks_equal_one_rank_with_double_batch(equiv_runs: dict[int, list[dict]]) -> None:
    """Invariant (FNE phase, gate open, memory pre-filled): 2 ranks × B and 1 rank × 2B on the
    same pairs, weights, memory and statistics see the same candidates [gathered batch ;
    memory]; the all-reduced statistics are mutual_top1(block 0) + mutual_top1(block 1) (each
    rank's own B×B matrix, not the 2B×2B one); rank r draws exactly the negatives that the
    1-rank run draws for rows r·B..(r+1)·B−1; the mean of the two rank losses equals the 1-rank
    loss over 2B anchors (no rescaling), and so do the averaged gradients and one SGD update."""
    r0, r1 = equiv_runs[2]
    (single,) = equiv_runs[1]
    B = worker.GLOBAL_BATCH["equiv"] // 2
    stats_discriminate = False
    report = []
    for s, (a, b0, b1) in enumerate(zip(single["steps"], r0["steps"], r1["steps"], strict=True)):
        # candidates: same ids/groups exactly, embeddings to float rounding
        for key in ("ids", "groups", "n_batch"):
            assert torch.equal(a["cand"][key], b0["cand"][key]), (s, key)
            assert torch.equal(a["cand"][key], b1["cand"][key]), (s, key)
        assert int(a["cand"]["n_batch"]) == 2 * B
        for key in ("img", "txt"):
            _close(b0["cand"][key], a["cand"][key])
            assert torch.equal(b0["cand"][key], b1["cand"][key])
        # statistics: all-reduced per-rank blocks, the same on both ranks
        assert torch.equal(b0["stats_added"], b1["stats_added"])
        blocks = a["block_stats"][0] + a["block_stats"][1]
        _close(a["stats_added"], blocks, rtol=1e-12, atol=1e-12)  # the double added the blocks
        assert a["stats_added"][0] > 0  # mutual top-1 pairs exist: the check has content
        assert b0["stats_added"][[0, 3]].tolist() == blocks[[0, 3]].tolist()  # counts exact
        _close(b0["stats_added"], blocks, rtol=1e-6, atol=1e-9)
        stats_discriminate |= not torch.allclose(a["stats_forward_step"], blocks)
        # the Bayes part is in use
        for rec in (a, b0, b1):
            assert float(rec["diagnostics"]["gate_open"]) == 1.0
            assert float(rec["diagnostics"]["frac_pfn_gt_eps"]) > 0.0
        # draws: rank r's picks are rows r·B..(r+1)·B−1 of the 1-rank picks
        for key in ("i2t_index", "t2i_index", "i2t_valid", "t2i_valid", "i2t_n_fn", "t2i_n_fn"):
            stacked = torch.cat([b0["picks"][key], b1["picks"][key]])
            assert torch.equal(stacked, a["picks"][key]), (s, key)
        assert (a["picks"]["i2t_index"] >= 2 * B).any()  # memory candidates were drawn
        # the recomputed picks are the ones forward_step used
        for rec in (a, b0, b1):
            _close(rec["picks"]["loss"], rec["loss"].double(), rtol=1e-6, atol=1e-7)
        # loss: mean over ranks of local means == the 1-rank mean over 2B anchors
        mean_2x = (b0["loss"] + b1["loss"]) / 2
        _close(mean_2x, a["loss"])
        # averaged gradients, one SGD update, the EMA
        grad_diff = 0.0
        for name, g in a["grads"].items():
            assert torch.equal(b0["grads"][name], b1["grads"][name]), name
            _close(b0["grads"][name], g)
            grad_diff = max(grad_diff, float((b0["grads"][name] - g).abs().max()))
        assert set(a["grads"]) == set(b0["grads"]) and a["grads"]
        for key in ("params", "momentum"):
            for name, p in a[key].items():
                _close(b0[key][name], p)
        report.append(
            f"step {s}: loss 1×2B {float(a['loss']):.9f} | 2×B mean {float(mean_2x):.9f} "
            f"(ranks {float(b0['loss']):.6f}, {float(b1['loss']):.6f}) | "
            f"max |Δgrad| {grad_diff:.2e} | draws equal"
        )
    assert stats_discriminate, "block-wise and 2B×2B statistics never differed: weak check"
    assert torch.equal(r0["memory"]["ids"], single["memory"]["ids"])
    _close(r0["memory"]["img"], single["memory"]["img"])
    print("\n" + "\n".join(report))


def test_logged_loss_is_the_global_batchs_on_every_rank(equiv_runs: dict[int, list[dict]]) -> None:
    """Invariant: the loss the loop logs (``TrainState.take_window``: the console line and
    train_log.jsonl; ``close_epoch``: metrics.json) is the global batch's, so 2 ranks × B log
    what 1 rank × 2B logs (to float rounding), on both ranks alike; not rank 0's own loss over
    its B anchors. The same for the per-direction losses."""
    r0, r1 = equiv_runs[2]
    (single,) = equiv_runs[1]
    for key in ("loss", "loss_i2t", "loss_t2i"):
        for what in ("window", "epoch_row"):
            assert torch.equal(r0[what][key], r1[what][key]), (what, key)  # one value, every rank
            _close(r0[what][key], single[what][key], rtol=1e-6, atol=1e-7)
    # the check has content: rank 0's own mean is far from the global one
    own = torch.stack([s["loss"] for s in r0["steps"]]).double().mean()
    assert abs(float(own) - float(single["window"]["loss"])) > 1e-3, float(own)
    print(
        f"\nlogged loss: 1×2B {float(single['window']['loss']):.9f} | 2×B rank 0 "
        f"{float(r0['window']['loss']):.9f}, rank 1 {float(r1['window']['loss']):.9f} "
        f"(rank 0's own {float(own):.9f})"
    )


def test_world_size_one_without_group_equals_group_of_one(
    equiv_runs: dict[int, list[dict]],
) -> None:
    """Invariant: without a process group the collectives are identities, so forward_step at
    world size 1 gives exactly (bitwise) the loss, diagnostics, gathered block and statistics of
    a 1-rank gloo process group."""
    (single,) = equiv_runs[1]
    with_group, without = single["plain_with_group"], single["plain_without_group"]
    assert bool(with_group["group"]) and not bool(without["group"])
    assert int(with_group["world_size"]) == int(without["world_size"]) == 1
    assert torch.equal(with_group["loss"], without["loss"])
    assert torch.equal(with_group["gathered_img"], without["gathered_img"])
    assert torch.equal(with_group["stats"], without["stats"])
    assert with_group["diagnostics"].keys() == without["diagnostics"].keys()
    for key, value in with_group["diagnostics"].items():
        assert torch.equal(value, without["diagnostics"][key]), key
    print(f"\nworld size 1: loss {float(with_group['loss']):.9f} with and without a group")
