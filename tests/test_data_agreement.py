"""Ranks agree on every step: a rank that runs out of samples (bad samples) or whose data fails
never leaves the other blocked in a collective. Two real gloo processes."""

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

from .shard_factory import sample_members, write_tar

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "data_agreement.py"
pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]


def _shards(root: Path) -> str:
    """Two shards of 16 samples: with W=2, B=4 each rank reads one whole shard (4 steps);
    shard b has 3 corrupt images, so its rank has only 3 full batches."""
    good = [(f"a{k:03d}", sample_members(k)) for k in range(16)]
    write_tar(root / "part-000000.tar", good)
    bad = []
    for k in range(16):
        members = sample_members(100 + k)
        if k in (3, 8, 12):
            members["png"] = b"corrupt"
        bad.append((f"b{k:03d}", members))
    write_tar(root / "part-000001.tar", bad)
    (root / "sizes.json").write_text(json.dumps({"part-000000.tar": 16, "part-000001.tar": 16}))
    return str(root / "part-*.tar")


def _run(spec: str, frac: float | str, out: Path, vote: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(
            RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            VOTE="1" if vote else "0",
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), spec, str(frac), str(out)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + 90
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [p.stdout.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    if frac == "eval":
        return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("vote", [False, True], ids=["alone", "riding"])
def test_a_rank_out_of_samples_ends_the_epoch_for_all(tmp_path: Path, vote: bool) -> None:
    """Invariant: when bad samples leave one rank with 3 full batches and the other with 4,
    both ranks train exactly 3 steps (no rank waits in a collective for a batch that never
    comes), the epoch is counted as cut short on both, and no sample is seen twice; the same
    when each step's vote for the next rides on the step's gather (``epochs.Lookahead``), and
    then only the epoch's first step agrees by an all-reduce of its own (one, against one
    per step and one for the epoch's end)."""
    ranks = _run(_shards(tmp_path / "shards"), 1.0, tmp_path / "out", vote)
    assert [len(r["batches"]) for r in ranks] == [3, 3]
    assert [r["cut_short"] for r in ranks] == [1, 1]
    assert all(r["error"] is None for r in ranks)
    ids = [i for r in ranks for b in r["batches"] for i in b]
    assert len(ids) == len(set(ids)) == 24
    assert [r["all_reduces"] for r in ranks] == ([1, 1] if vote else [4, 4])


@pytest.mark.parametrize("vote", [False, True], ids=["alone", "riding"])
def test_a_data_error_on_one_rank_stops_both(tmp_path: Path, vote: bool) -> None:
    """Invariant: when one rank's shard exceeds data.max_bad_fraction, that rank stops with the
    error naming the shard and the other stops too (told that another rank failed), promptly;
    also when the failure is read ahead and its vote rides on a step's gather."""
    ranks = _run(_shards(tmp_path / "shards"), 0.1, tmp_path / "out", vote)
    errors = sorted(r["error"] or "" for r in ranks)
    assert "another rank" in errors[0] and "part-000001.tar" in errors[1], errors
    assert "max_bad_fraction=0.1" in errors[1]


def test_sharded_evaluation_gathers_exactly_the_one_rank_split(tmp_path: Path) -> None:
    """Invariant: two ranks that each read every second sample of a split (images appearing in
    samples on both ranks, 1 and 3 captions per sample) and gather their embeddings get exactly
    the split one rank reads alone: same images once each in the same order, same captions in
    the same order, same caption→image map and groups."""
    from fne_dist.data import load_split, shard_list
    from fne_dist.sharded_eval import gather_split

    samples = []
    for k in range(11):
        members = sample_members(k // 2, group=k % 3)  # two samples per image
        if k % 4 == 0:
            meta = json.loads(members["json"])
            meta["captions"] = [f"c{k}-{j}" for j in range(3)]
            members["json"] = json.dumps(meta).encode()
        samples.append((f"s{k:03d}", members))
    write_tar(tmp_path / "val-000000.tar", samples[:6])
    write_tar(tmp_path / "val-000001.tar", samples[6:])
    spec = str(tmp_path / "val-*.tar")
    ranks = _run(spec, "eval", tmp_path / "out")

    sys.path.insert(0, str(SCRIPT.parent))
    from data_agreement import fake_embedding

    table = load_split(shard_list(spec, "v"), "v", lambda img: torch.zeros(3, 2, 2))
    img, txt, t2i, groups = gather_split(
        table, fake_embedding(table.image_ids_I), fake_embedding(table.order_T)
    )
    assert img.shape[0] == 6 and txt.shape[0] == 11 + 3 * 2  # 3 samples carry 3 captions
    for r in ranks:
        assert torch.equal(r["img"], img) and torch.equal(r["txt"], txt)
        assert torch.equal(r["text_to_image"], t2i) and torch.equal(r["groups"], groups)
