"""Resume on another world size, without processes: the replayed data plan, the global batch
setting, and the policy's one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fne_dist.checkpoint.elastic import check_elastic, elastic_rank_state
from fne_dist.checkpoint.format import CheckpointError, RankState, write_rank_files
from fne_dist.checkpointer import merged_replay
from fne_dist.config import ConfigError, load_config, resolve_batch
from fne_dist.data import RankPosition, StreamOptions, TrainStream, shard_list
from fne_dist.data.batching import PairCollate
from fne_dist.data.stream import Replay

from .shard_factory import write_dataset


def _ids_only(d) -> dict:
    return {"ids": d.image_id, "groups": d.group}


def _stream(spec: str, rank: int, world: int, batch: int) -> TrainStream:
    opts = StreamOptions(batch=batch, seed=7, rank=rank, world=world, shuffle_buffer=5)
    return TrainStream(shard_list(spec, "data.train"), opts, _ids_only, PairCollate(None))


def _global_batches(streams: list[TrainStream], epoch: int, resume=None) -> list[list[int]]:
    """Each step's global batch (rank order), from every rank's stream of ``epoch``."""
    per_rank = [
        [b["ids"].tolist() for b, _ in s.epoch(epoch, None if resume is None else resume[r])]
        for r, s in enumerate(streams)
    ]
    return [[i for row in rows for i in row] for rows in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("new_world", [1, 3])
def test_a_replayed_epoch_gives_the_uninterrupted_global_batches(
    tmp_path: Path, new_world: int
) -> None:
    """Invariant: an epoch begun by 2 ranks × 3 (shuffle buffers, shards split by sample
    ranges) and continued after 4 steps by 1 rank × 6 or 3 ranks × 2
    gives the uninterrupted run's global batches, sample for sample in the same order: no
    sample of the epoch repeated, none skipped."""
    write_dataset(tmp_path, [17, 11, 14])  # 42 samples: 7 steps of 6
    spec = f"{tmp_path}/*.tar"
    old = [_stream(spec, r, 2, 3) for r in range(2)]
    straight = _global_batches(old, 0)
    assert len(straight) == 7
    positions = []
    for s in old:  # every old rank's position after 4 steps
        for i, (_, position) in enumerate(s.epoch(0)):
            if i == 3:
                positions.append(position)
                break
    replay = Replay(2, 3, 1, positions)
    start = RankPosition(0, 4, [], positions[0].shard_order_seed, "exact", replay)
    batch = 6 // new_world
    new = [_stream(spec, r, new_world, batch) for r in range(new_world)]
    resumed = _global_batches(new, 0, [start] * new_world)
    assert resumed == straight[4:]
    ids = [i for b in straight[:4] + resumed for i in b]
    assert len(ids) == len(set(ids)) == 42


def test_a_replay_position_saved_mid_epoch_is_merged_from_the_ranks_that_read_it(
    tmp_path: Path,
) -> None:
    """Invariant: the old ranks' positions a checkpoint records during a replayed epoch come
    from the new ranks that read them (each new rank reads only the old ranks under its rows),
    so a second resume (here back to 2 ranks) continues the same global batches."""
    write_dataset(tmp_path, [21, 21])
    spec = f"{tmp_path}/*.tar"
    old = [_stream(spec, r, 2, 3) for r in range(2)]
    straight = _global_batches(old, 0)
    first = [next(iter(s.epoch(0)))[1] for s in old]  # after step 1
    start = RankPosition(0, 1, [], first[0].shard_order_seed, "exact", Replay(2, 3, 1, first))
    three = [_stream(spec, r, 3, 2) for r in range(3)]
    after: list[dict] = []
    for s in three:  # two steps on 3 ranks, then a checkpoint
        it = s.epoch(0, start)
        next(it)
        after.append(next(it)[1].to_dict()["replay"])
    assert [a["reads"] for a in after] == [[0], [0, 1], [1]]
    positions = merged_replay(after)
    again = Replay.from_dict({**after[0], "positions": positions, "reads": []})
    resume = RankPosition(0, 3, [], first[0].shard_order_seed, "exact", again)
    two = [_stream(spec, r, 2, 3) for r in range(2)]
    assert _global_batches(two, 0, [resume] * 2) == straight[3:]


def test_global_batch_size_sets_the_per_rank_batch() -> None:
    """Invariant: train.global_batch_size=12 is 12/W per rank on W ranks; a world size that
    does not divide it is one ConfigError line naming both."""
    cfg = load_config(None, ["train.global_batch_size=12"])
    assert [resolve_batch(cfg, w).train.batch_size for w in (1, 2, 3, 6)] == [12, 6, 4, 2]
    with pytest.raises(ConfigError) as err:
        resolve_batch(cfg, 5)
    assert "train.global_batch_size=12 cannot be split over 5 ranks" in str(err.value)
    assert "\n" not in str(err.value)
    assert resolve_batch(load_config(None, []), 4).train.batch_size == 32  # unset: per rank


META = {"world_size": 2, "batch_size": 3, "grad_accum": 1, "step": 4, "steps_per_epoch": 7}
HERE = {"world_size": 1, "batch_size": 6, "grad_accum": 1, "loader_workers": 1}


def test_a_changed_global_batch_is_one_line_unless_allowed(tmp_path: Path) -> None:
    """Invariant: resuming 2 ranks × 3 on 1 rank × 3 (another global batch: another loss and
    memory enqueue) is refused in one line naming both batches and the two ways on; a changed
    gradient accumulation is refused too; the same global batch is accepted."""
    assert check_elastic(tmp_path, META, HERE, False) is True
    here = {**HERE, "batch_size": 3}
    with pytest.raises(CheckpointError) as err:
        check_elastic(tmp_path, META, here, False)
    line = str(err.value)
    assert "global batch of 2 ranks × 3 = 6, this run's is 1 × 3 = 3" in line
    assert "train.global_batch_size=6" in line and "checkpoint.allow_batch_change" in line
    assert "\n" not in line
    assert check_elastic(tmp_path, META, here, True) is False
    with pytest.raises(CheckpointError, match="grad_accum=1, this run has grad_accum=2"):
        check_elastic(tmp_path, META, {**HERE, "grad_accum": 2}, False)


def _rank_files(directory: Path) -> None:
    for r in range(2):
        position = {
            "epoch": 0,
            "step": 4,
            "mode": "exact",
            "shard_order_seed": 1,
            "consumers": [{"consumer": 0, "piece": 0, "consumed": 4 * 3, "batches": 4}],
        }
        counters = {"opt_step": 4, "stale": [float(r + 1), 2.0], "epoch": 0}
        write_rank_files(directory, r, RankState(counters, position))


def test_new_ranks_take_the_old_plan_or_the_next_epoch(tmp_path: Path) -> None:
    """Invariant: with the global batch kept, every new rank gets a replay of the old layout
    holding every old rank's position (rank 2, new, with zeroed staleness sums); with a
    changed one the position is the next epoch's start and the note counts what is dropped
    (3 steps × 6 samples)."""
    _rank_files(tmp_path)
    three = {**HERE, "world_size": 3, "batch_size": 2}
    state = elastic_rank_state(tmp_path, META, three, 2, True)
    replay = state.data_position["replay"]
    assert (replay["world"], replay["batch"], replay["consumers"]) == (2, 3, 1)
    assert len(replay["positions"]) == 2 and state.data_position["step"] == 4
    assert state.counters["stale"] == [0.0, 0.0]
    assert "follows the 2-rank data plan" in state.note
    assert RankPosition.from_dict(state.data_position).replay is not None  # it parses
    dropped = elastic_rank_state(tmp_path, META, {**HERE, "batch_size": 3}, 0, False)
    assert dropped.data_position["epoch"] == 1 and "replay" not in dropped.data_position
    assert dropped.counters["stale"] == [1.0, 2.0]
    assert "dropped (18 samples)" in dropped.note
    json.dumps(state.data_position)  # what the next checkpoint writes


def test_a_ray_worker_range_needs_a_global_batch_every_size_divides() -> None:
    """Invariant: dist.min_workers hands Ray the range (min, workers) only when every world size
    in it keeps the global batch; otherwise one ConfigError line at launch, naming the sizes."""
    from fne_dist.config import check_world_range
    from fne_dist.distributed.ray_launcher import worker_range

    ok = load_config(None, ["dist.workers=4", "dist.min_workers=2", "train.global_batch_size=12"])
    check_world_range(ok, 2, 4)
    assert worker_range(ok) == (2, 4)
    assert worker_range(load_config(None, ["dist.workers=4"])) == 4
    with pytest.raises(ConfigError, match="cannot be split over 5 ranks"):
        check_world_range(load_config(None, ["train.global_batch_size=12"]), 2, 6)
    with pytest.raises(ConfigError, match=r"set train\.global_batch_size"):
        check_world_range(load_config(None, []), 1, 2)


def test_a_ray_worker_range_retries_a_start_that_counted_a_lost_node() -> None:
    """Invariant: with a worker range, a worker group Ray could not place (its restart after a
    node loss asked for dist.workers on a view of the cluster that still had the node) is
    scheduled again up to dist.max_failures times (Ray's controller_failure_limit); a fixed
    group is not (a start that cannot be placed ends the run, as before)."""
    from fne_dist.distributed.ray_launcher import start_retries

    elastic = ["dist.workers=2", "dist.min_workers=1", "train.global_batch_size=16"]
    assert start_retries(load_config(None, [*elastic, "dist.max_failures=3"])) == 3
    assert start_retries(load_config(None, [*elastic, "dist.max_failures=0"])) == 0
    assert start_retries(load_config(None, ["dist.workers=2", "dist.max_failures=3"])) == 0
    same = ["dist.workers=2", "dist.min_workers=2", "dist.max_failures=3"]
    assert start_retries(load_config(None, same)) == 0  # min = max: a fixed group


def test_a_ray_worker_range_refreshes_the_cluster_view_after_a_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Invariant: a worker range hands Ray Train a controller callback that, before a failure
    decision is carried out (the restart that follows is sized from the AutoscalingCoordinator's
    view), makes the coordinator re-read the cluster (get_reserved_resources with
    recompute=True); a fixed group gets none; a coordinator that cannot answer leaves Ray's own
    path (timeout, retry) in place instead of failing the run."""
    pytest.importorskip("ray.train.v2._internal.execution.callback")
    from fne_dist.distributed import ray_elastic
    from fne_dist.distributed.ray_launcher import _elastic_callbacks

    elastic = ["dist.workers=2", "dist.min_workers=1", "train.global_batch_size=16"]
    (callback,) = _elastic_callbacks(load_config(None, elastic))
    assert _elastic_callbacks(load_config(None, ["dist.workers=2"])) == []

    calls: list[tuple] = []

    class Method:
        def remote(self, *args: object, **kwargs: object) -> tuple:
            calls.append((args, kwargs))
            return ("ref",)

    class Coordinator:
        get_reserved_resources = Method()

    monkeypatch.setattr(ray_elastic, "_coordinator", Coordinator)
    monkeypatch.setattr(ray_elastic.ray, "get", lambda ref, timeout: {})
    callback.before_controller_execute_failure_decision("RETRY")
    assert len(calls) == 1 and calls[0][1] == {"recompute": True}
    assert "cluster view re-read after a failure (RETRY)" in caplog.text

    def unreachable(ref: object, timeout: float) -> None:
        raise TimeoutError("coordinator did not answer")

    monkeypatch.setattr(ray_elastic.ray, "get", unreachable)
    callback.before_controller_execute_failure_decision("RETRY")  # logged, not raised
