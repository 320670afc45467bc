"""Runs that span nodes, without processes: two "nodes" as two threads, each with its own
directories, meeting through an in-memory all-gather. They pin what a checkpoint must hold,
what a launch must refuse, where node identity and the rendezvous address come from, and how the
feature cache is keyed and built once.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fne_dist.checkpoint.collective import (
    Parts,
    Target,
    assign_files,
    check_shared_dir,
    finalize,
    save_run_checkpoint,
)
from fne_dist.checkpoint.format import CheckpointError, RankState
from fne_dist.checkpoint.remote import download, find_resumable_remote
from fne_dist.checkpoint.validation import validate
from fne_dist.config import ConfigError, load_config
from fne_dist.data.feature_shards import build_once, is_complete
from fne_dist.data.sources import ShardList
from fne_dist.distributed import all_gather_json
from fne_dist.distributed.launch import rank_env, rendezvous
from fne_dist.loop_inputs import cache_dir

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


class ThreadWorld:
    """``n`` ranks as threads: an all-gather and a barrier over them."""

    def __init__(self, n: int) -> None:
        self.n, self.slots = n, [None] * n
        self._barrier = threading.Barrier(n, timeout=30)

    def barrier(self) -> None:
        self._barrier.wait()

    def gather(self, rank: int) -> Callable[[Any], list[Any]]:
        def gather(value: Any) -> list[Any]:
            self.slots[rank] = value
            self._barrier.wait()
            out = list(self.slots)
            self._barrier.wait()
            return out

        return gather

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        results: list[Any] = [None] * self.n

        def one(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except Exception as err:  # handed back to the test (the barrier times out)
                results[rank] = err

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results


class PartitionedEngine:
    """An engine whose every rank writes its own file (like ZeRO's optimizer partitions)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.module = rank, nn.Linear(2, 2)

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"part": torch.full((3,), float(self.rank))}, f"{save_dir}/{tag}/p{self.rank}.pt"
        )


class Stateful:
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(2)}


def _save(world: ThreadWorld, roots: list[Path], url: str | None) -> list[Any]:
    def rank_fn(rank: int) -> Path:
        target = Target(
            root=roots[rank],
            config_yaml="{}\n",
            layout={"world_size": world.n},
            run_id="r",
            keep_last=0,
            rank=rank,
            barrier=world.barrier,
            url=url,
            gather=world.gather(rank),
            local_rank=0,  # one rank per node
        )
        parts = Parts(PartitionedEngine(rank), nn.Linear(2, 2), Stateful(), Stateful())
        counters = {"opt_step": 4, "micro": 3, "epoch": 0, "samples_seen": 32}
        return save_run_checkpoint(target, parts, RankState(counters, None))

    return world.run(rank_fn)


def test_shared_dir_checkpoint_lists_every_ranks_files(tmp_path: Path) -> None:
    """Invariant: two nodes writing to one shared directory give one checkpoint whose
    meta.json lists both ranks' files (their rank files and each one's engine partition),
    every file hashed exactly once, and no step-N.tmp left."""
    results = _save(ThreadWorld(2), [tmp_path / "shared"] * 2, None)
    assert all(isinstance(r, Path) for r in results), results
    files = validate(results[0])["files"]
    for name in ("rank-00000.json", "rank-00001.safetensors", "engine/p0.pt", "engine/p1.pt"):
        assert name in files, sorted(files)
    assert not list(tmp_path.rglob("*.tmp"))


def test_url_checkpoint_from_node_local_dirs_is_complete(tmp_path: Path) -> None:
    """Invariant: with node-local scratch directories and a URL checkpoint.dir, every rank
    uploads its part and rank 0 meta.json: the remote checkpoint validates and holds rank 1's
    files although rank 0 never saw them; node 1 keeps no step-N.tmp."""
    url = f"file://{tmp_path / 'remote'}"
    roots = [tmp_path / "node0" / "ckpt", tmp_path / "node1" / "ckpt"]
    results = _save(ThreadWorld(2), roots, url)
    assert all(isinstance(r, Path) for r in results), results
    assert not (roots[0] / "step-00000004" / "rank-00001.json").exists()  # node-local indeed
    _, meta = find_resumable_remote(url, tmp_path / "fetched", print)
    assert {"rank-00001.json", "engine/p1.pt", "engine/p0.pt"} <= set(meta["files"])
    assert not list((tmp_path / "node1").rglob("*.tmp"))


def test_ray_registers_a_complete_copy_of_a_url_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: with a URL checkpoint.dir and node-local scratch, rank 0's local copy lacks
    rank 1's files (it does not validate), yet the directory Ray's launcher checkpoints hand to
    ``ray.train.report`` (Ray's record of the run's checkpoints) validates and holds every
    rank's part, each file equal to the uploaded one; the other ranks report no checkpoint."""
    import ray.train

    from fne_dist.distributed.ray_launcher import RayCheckpoints

    url = f"file://{tmp_path / 'remote'}"
    roots = [tmp_path / "node0" / "ckpt", tmp_path / "node1" / "ckpt"]
    local0 = _save(ThreadWorld(2), roots, url)[0]
    with pytest.raises(CheckpointError, match=r"(p1\.pt|rank-00001\.\w+) is missing"):
        validate(local0)
    reported: list[Any] = []
    monkeypatch.setattr(ray.train, "report", lambda m, checkpoint=None: reported.append(checkpoint))
    RayCheckpoints(url).register(local0, 4, is_main=True)
    RayCheckpoints(url).register(roots[1] / local0.name, 4, is_main=False)
    assert reported[1] is None
    registered = Path(reported[0].path)
    meta = validate(registered)
    assert {"rank-00001.json", "rank-00001.safetensors", "engine/p1.pt"} <= set(meta["files"])
    remote = download(url, local0.name, tmp_path / "fetched")
    for name in meta["files"]:
        assert (registered / name).read_bytes() == (remote / name).read_bytes(), name


def test_a_checkpoint_without_every_ranks_files_is_invalid(tmp_path: Path) -> None:
    """Invariant: meta.json of a 2-rank run that lists only rank 0's files (what rank 0 alone
    could hash on its node) is refused as incomplete, naming the missing rank file."""
    tmp = tmp_path / "step-00000001.tmp"
    tmp.mkdir()
    (tmp / "rank-00000.json").write_text("{}")
    (tmp / "rank-00000.safetensors").write_text("x")
    finalize(tmp, tmp_path / "step-00000001", {"world_size": 2}, 0)
    with pytest.raises(CheckpointError, match=r"incomplete: meta\.json lists no rank-00001"):
        validate(tmp_path / "step-00000001")


def test_assign_files_gives_each_file_to_one_rank_that_sees_it() -> None:
    """Invariant: every visible file is hashed by exactly one rank, always one that sees it;
    on a shared directory the work is spread over the ranks."""
    shared = [["a", "b", "c", "d"]] * 2
    mine = assign_files(shared)
    assert sorted(mine[0] + mine[1]) == ["a", "b", "c", "d"] and mine[0] and mine[1]
    local = [["a", "rank-0"], ["rank-1", "p1"]]
    assert assign_files(local) == [["a", "rank-0"], ["p1", "rank-1"]]


def test_node_local_checkpoint_dir_fails_at_launch(tmp_path: Path) -> None:
    """Invariant: when rank 1 (node 1) does not see rank 0's marker, every rank fails with
    one line naming the directory and node 1; a shared directory passes and keeps no marker."""
    world = ThreadWorld(2)
    roots = [tmp_path / "n0", tmp_path / "n1"]
    errors = world.run(lambda r: check_shared_dir(roots[r], r, r, world.gather(r)))
    for err in errors:
        assert isinstance(err, CheckpointError), errors
        assert "is not shared between nodes: node(s) 1 do not see" in str(err)
        assert "\n" not in str(err)
    world = ThreadWorld(2)
    shared = tmp_path / "shared"
    assert world.run(lambda r: check_shared_dir(shared, r, r, world.gather(r))) == [None] * 2
    assert list(shared.iterdir()) == []


def test_all_gather_json_is_the_identity_at_world_size_one() -> None:
    assert all_gather_json({"a": [1, "x"]}) == [{"a": [1, "x"]}]


# ------------------------------------------------------------------------- node identity


@pytest.mark.parametrize(
    ("env", "node"),
    [
        ({"GROUP_RANK": "1"}, 1),  # torchrun
        ({"NODE_RANK": "2"}, 2),  # Ray Train, accelerate
        ({"CROSS_RANK": "3"}, 3),  # the deepspeed launcher
        ({}, 2),  # none: ranks are placed node by node (rank 5 // 2 per node)
    ],
)
def test_node_rank_comes_from_the_launcher(env: dict[str, str], node: int) -> None:
    """Invariant: the node index is the launcher's (never the host name)."""
    base = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert rank_env({**base, **env}).node_rank == node


def test_slurm_node_rank_is_slurm_nodeid() -> None:
    env = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1"}
    env |= {"SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    got = rank_env(env)
    assert (got.node_rank, got.spans_nodes) == (1, True)


def test_a_world_across_nodes_never_defaults_to_loopback() -> None:
    """Invariant: MASTER_PORT without MASTER_ADDR is enough on one node (loopback is rank 0's
    host), but a world spanning nodes (WORLD_SIZE > LOCAL_WORLD_SIZE) fails at once with one
    line naming MASTER_ADDR instead of dialling its own loopback."""
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    env["MASTER_PORT"] = "29400"
    with pytest.raises(ConfigError) as err:
        rendezvous(rank_env(env), env)
    assert "several nodes" in str(err.value) and "MASTER_ADDR not set" in str(err.value)
    assert "\n" not in str(err.value)
    one_node = {**env, "LOCAL_WORLD_SIZE": "4"}
    assert rendezvous(rank_env(one_node), one_node).addr == "127.0.0.1"
    given = {**env, "MASTER_ADDR": "10.0.0.7"}
    assert rendezvous(rank_env(given), given).addr == "10.0.0.7"


# ------------------------------------------------------------------------- feature cache


def test_feature_cache_is_keyed_by_content_not_split(tmp_path: Path) -> None:
    """Invariant: val and test over the same shards share one cache directory; the train
    split (one caption per image) and other shards get their own."""
    cfg = load_config(TINY, [f"data.cache_dir={tmp_path}"])
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x" * 10)
    same = ShardList((str(shard),), (5,), (0,))
    assert cache_dir(cfg, "val", same) == cache_dir(cfg, "test", same)
    assert cache_dir(cfg, "train", same) != cache_dir(cfg, "val", same)
    before = cache_dir(cfg, "val", same)
    shard.write_bytes(b"x" * 11)  # rewritten under the same name: a new cache
    assert cache_dir(cfg, "val", same) != before


def _builder(out: str, counter: str, start: Any) -> None:
    start.wait(timeout=30)

    def build() -> None:
        with open(counter, "a") as f:
            f.write("built\n")
        tmp = Path(out + ".tmp-build")
        tmp.mkdir()
        (tmp / "sizes.json").write_text("{}")
        import time

        time.sleep(0.5)  # long enough for the other builder to find the lock held
        tmp.rename(out)

    build_once(Path(out), build, timeout_s=30, poll_s=0.05)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_two_nodes_on_a_shared_cache_dir_build_once(tmp_path: Path) -> None:
    """Invariant: two processes (two nodes' local rank 0) building the same cache on one
    shared directory: exactly one builds, the other waits for the complete cache."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out, counter = tmp_path / "feat-x", tmp_path / "count.txt"
    procs = [ctx.Process(target=_builder, args=(str(out), str(counter), start)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert counter.read_text() == "built\n" and is_complete(out)
