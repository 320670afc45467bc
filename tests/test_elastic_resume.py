"""A checkpoint of 2 ranks resumed on 1 and on 3 ranks, with the global batch kept by
``train.global_batch_size``, under ZeRO-0, ZeRO-2 and ZeRO-3. Every rank is its own process
with the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), forked from
one process that imported torch, DeepSpeed and fne_dist once (tests/forked_runs.py: the
imports were ~5 s of each rank's ~6 s of CPU; 18 ranks here), except the ZeRO-3 resume on 3
ranks, which torchrun itself launches (``torchrun --standalone --nproc_per_node 3``). torchrun
re-forming after a lost node: tests/test_multinode_torchrun.py's elastic test (2 nodes -> 1).

One 2-rank run per engine is resumed from its step-4 checkpoint on 1 and on 3 ranks; the tests
share the nine runs (module-scoped). The three engines' 2-rank runs go at once, then the six
resumes (each engine's runs have their own directory; a resume only reads its checkpoint and
feature cache). Tiny synthetic shards (42 pairs: 7 steps of 6 per epoch),
frozen towers (cached features: no batch norm over a rank's batch, which would tie the loss
to the split), FNE statistics over the gathered batch (``fne.stats_scope=global``: the per-rank
mutual-top-1 rule sees a rank's block, another block on another split).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .forked_runs import ForkedRun, fork_server
from .shard_factory import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
pytestmark = [pytest.mark.system, pytest.mark.slow]

# ZeRO-3 partitions parameters, gradients and optimizer state (the most a resume on another
# world size re-partitions), ZeRO-2 gradients and optimizer state, ZeRO-0 nothing (the whole
# state in DeepSpeed's own files: the consolidated route).
ENGINES = ["engine.zero_stage=0", "engine.zero_stage=2", "engine.zero_stage=3"]
# Relative tolerance of a resumed step's global loss against the uninterrupted run's. The
# global batches hold the same samples in the same order, so the loss is the same function of
# the same state; only the split differs: each rank's mean over its rows, averaged over the
# ranks, and the gradients' all-reduce, sum in another order than one rank's batch, which
# moves fp32 results by a few ulps (~1e-7 relative; measured ≤ 3e-7 over 6 steps and three
# engines). 1e-5 leaves 30× for Adam to carry that through the resumed steps and stays far
# below what a wrong sample, a reset optimizer or a lost memory moves (≥ 1e-3 here).
RTOL = 1e-5
# The one resume that torchrun's agent launches (the others are forked with its variables):
# the most re-partitioning engine, on more ranks than wrote it
TORCHRUN = ("engine.zero_stage=3", 3)
STEPS = 7  # one epoch: steps 5..7 continue the epoch the checkpoint interrupted


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train(start: Callable | None, tmp: Path, ranks: int, name: str, *overrides: str) -> list:
    """Start one run of ``ranks`` processes (forked by ``start``: tests/forked_runs.py; with
    ``start`` None, by torchrun itself: its agent starts the ranks); its output goes to
    ``tmp/name.log``."""
    from fne_dist.distributed.launch import free_port

    data = f"{tmp / 'data'}/*.tar"
    args = [
        "--config",
        str(TINY),
        f"run.output_dir={tmp}",
        f"run.name={name}",
        f"data.cache_dir={tmp / 'cache'}",
        f"data.train={data}",
        f"data.val={data}",
        f"data.test={data}",
        "run.threads=1",
        "model.image.frozen=true",
        "model.text.frozen=true",
        "memory.size=20",
        "fne.stats_scope=global",
        "train.global_batch_size=6",
        "train.epochs=1",
        "train.log_every=1",
        "train.log_sample_ids=true",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=0",
        *overrides,
    ]
    if start is None:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*torchrun, f"--nproc_per_node={ranks}", "-m", "fne_dist.train", *args]
        with (tmp / f"{name}.log").open("ab") as log:  # the agent and its ranks write there
            agent = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=log)
        return [agent]
    port = str(free_port())
    envs = [
        {**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
         "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        for r in range(ranks)
    ] if ranks > 1 else [_env()]  # fmt: skip
    return [start(args, env, tmp / f"{name}.log") for env in envs]


def _ok(tmp: Path, name: str, run: list[ForkedRun | subprocess.Popen]) -> str:
    """Wait for ``run``'s processes; its output (the test fails with its tail if one failed)."""
    try:
        codes = [p.wait(timeout=400) for p in run]
    finally:
        for p in run:
            if p.poll() is None:
                p.kill()
    out = (tmp / f"{name}.log").read_text()
    assert codes == [0] * len(run), out[-3000:]
    return out


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every engine's uninterrupted 2-rank run (the three at once), then every engine's step-4
    checkpoint resumed on 1 and on 3 ranks (the six at once); engine → its runs."""
    tmps = {e: tmp_path_factory.mktemp("elastic") for e in ENGINES}
    for tmp in tmps.values():
        write_dataset(tmp / "data", [17, 11, 14])  # 42 pairs: 7 global batches of 6
    with fork_server(_env()) as start:
        return _all_runs(start, tmps)


def _all_runs(start: Callable, tmps: dict[str, Path]) -> dict:
    t0 = time.monotonic()
    started = {(e, 2): _train(start, tmps[e], 2, "two", e) for e in ENGINES}
    try:
        for e in ENGINES:
            _ok(tmps[e], "two", started[e, 2])
        t1 = time.monotonic()
        for e in ENGINES:
            step4 = tmps[e] / "two" / "checkpoints" / "step-00000004"
            for n in (1, 3):
                how = None if (e, n) == TORCHRUN else start
                started[e, n] = _train(how, tmps[e], n, f"on{n}", e, f"checkpoint.resume={step4}")
        logs = {
            key: _ok(tmps[key[0]], f"on{key[1]}", started[key]) for key in started if key[1] != 2
        }
    finally:
        for run in started.values():  # the others, when one failed
            for p in run:
                if p.poll() is None:
                    p.kill()
    t2 = time.monotonic()
    print(f"\nthe 2-rank runs {t1 - t0:.1f} s, the resumes on 1 and 3 {t2 - t1:.1f} s")
    return {
        e: {"tmp": tmps[e], "engine": e, "logs": {n: logs[e, n] for n in (1, 3)}} for e in ENGINES
    }


@pytest.fixture(params=ENGINES)
def runs(request: pytest.FixtureRequest, all_runs: dict) -> dict:
    return all_runs[request.param]


def _steps(run_dir: Path) -> dict[int, tuple[float, list[int]]]:
    """step → (global loss: the ranks' mean of their equal-sized batches' means, the global
    batch's sample ids in rank order), from every rank's sample_ids log."""
    rows: dict[int, list[dict]] = {}
    for path in sorted(run_dir.glob("sample_ids-rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["step"], []).append(row)
    return {
        s: (sum(r["loss"] for r in rs) / len(rs), [i for r in rs for i in r["ids"]])
        for s, rs in rows.items()
    }


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("ranks", [1, 3])
def test_resume_on_another_world_size_repeats_the_uninterrupted_steps(
    runs: dict, ranks: int
) -> None:
    """Invariant: a 2-rank checkpoint (mid-epoch) resumed on 1 or 3 ranks with the global batch
    kept trains steps 5..7 on the uninterrupted run's global batches (the same sample ids in
    the same order) with the same losses within RTOL (model, optimizer state, lr schedule,
    momentum encoders, memory and statistics all carried over), and says how it resumed."""
    tmp = runs["tmp"]
    straight, resumed = _steps(tmp / "two"), _steps(tmp / f"on{ranks}")
    assert sorted(resumed) == [5, 6, 7]
    print(f"\n{runs['engine']}, 2 -> {ranks} rank(s): step, loss uninterrupted, resumed, rel. diff")
    for s in sorted(resumed):
        diff = abs(resumed[s][0] - straight[s][0]) / abs(straight[s][0])
        print(f"  {s}  {straight[s][0]:.9f}  {resumed[s][0]:.9f}  {diff:.1e}  ids {resumed[s][1]}")
        assert resumed[s][1] == straight[s][1], s
        assert resumed[s][0] == pytest.approx(straight[s][0], rel=RTOL), s
    line = f"resuming on {ranks} rank(s) × {6 // ranks} a checkpoint of 2 rank(s) × 3"
    assert line in runs["logs"][ranks]
    assert "follows the 2-rank data plan" in runs["logs"][ranks]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("ranks", [1, 3])
def test_no_sample_of_the_epoch_is_seen_twice(runs: dict, ranks: int) -> None:
    """Invariant: the epoch trained by 2 ranks up to the checkpoint and by the new world after
    it covers the plan's samples once each (42 pairs, 7 × 6, none dropped)."""
    tmp = runs["tmp"]
    before = [i for s, (_, ids) in _steps(tmp / "two").items() if s <= 4 for i in ids]
    after = [i for _, ids in _steps(tmp / f"on{ranks}").values() for i in ids]
    assert len(before + after) == len(set(before + after)) == 42
    print(
        f"\n2 -> {ranks}: {len(before)} ids before the checkpoint + {len(after)} after, all unique"
    )


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("ranks", [1, 3])
def test_memory_statistics_and_weights_match_the_uninterrupted_run(runs: dict, ranks: int) -> None:
    """Invariant: at the end of the epoch (step 7) the resumed run's memory (ids and write
    order exactly, embeddings within tolerance), FNE statistics, momentum encoders and
    weights equal the uninterrupted run's: what the checkpoint held was carried over, not
    re-initialised."""
    tmp = runs["tmp"]
    a_dir = tmp / "two" / "checkpoints" / "step-00000007"
    b_dir = tmp / f"on{ranks}" / "checkpoints" / "step-00000007"
    for name in ("memory", "stats", "momentum", "model"):
        a = load_file(str(a_dir / f"{name}.safetensors"))
        b = load_file(str(b_dir / f"{name}.safetensors"))
        assert a.keys() == b.keys(), name
        for k in a:
            exact = not a[k].is_floating_point()
            tol = {"rtol": 0, "atol": 0} if exact else {"rtol": RTOL, "atol": 1e-6}
            torch.testing.assert_close(b[k], a[k], equal_nan=True, msg=f"{name}/{k}", **tol)
