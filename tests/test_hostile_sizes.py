"""Hostile size indexes: every sizes.json value is a non-negative integer
within MAX_SHARD_SAMPLES or the shard list fails at load with one line naming the shard; and
evaluation reads every sample a shard holds, whatever sizes.json claims."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fne_dist.data import DataError, load_split, shard_list
from fne_dist.data.sources import MAX_SHARD_SAMPLES
from fne_dist.data.splits import count_mine

from .shard_factory import write_dataset


def _with_index(tmp_path: Path, raw_value: str) -> tuple[str, Path]:
    """Two shards of 4 samples; sizes.json gives the second one ``raw_value`` (raw JSON)."""
    paths = write_dataset(tmp_path, [4, 4], sizes_json=False)
    (tmp_path / "sizes.json").write_text(
        f'{{"{paths[0].name}": 4, "{paths[1].name}": {raw_value}}}'
    )
    return str(tmp_path / "part-*.tar"), paths[1]


def _fails_naming_the_shard(tmp_path: Path, raw_value: str) -> None:
    spec, bad_shard = _with_index(tmp_path, raw_value)
    with pytest.raises(DataError) as err:
        shard_list(spec, "data.train")
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert "sizes.json" in message and bad_shard.name in message


def test_hostile_negative_size_fails_at_load(tmp_path: Path) -> None:
    """Invariant: a negative sample count (-5) fails the shard list with one line naming the
    shard, instead of a plan of negative steps that loops over empty epochs."""
    _fails_naming_the_shard(tmp_path, "-5")


def test_hostile_huge_size_fails_at_load(tmp_path: Path) -> None:
    """Invariant: a count of 10^30 (above MAX_SHARD_SAMPLES) fails at load with one line,
    instead of an evaluation that spins over 10^30 claimed samples."""
    _fails_naming_the_shard(tmp_path, str(10**30))
    _fails_naming_the_shard(tmp_path, str(MAX_SHARD_SAMPLES + 1))


def test_hostile_null_size_fails_at_load(tmp_path: Path) -> None:
    """Invariant: ``null`` (and other non-integers: 2.5, "4", true, a list) fails at load
    with one line naming the shard, not a TypeError traceback."""
    for raw in ("null", "2.5", '"4"', "true", "[4]"):
        _fails_naming_the_shard(tmp_path, raw)


def test_hostile_infinite_size_fails_at_load(tmp_path: Path) -> None:
    """Invariant: ``1e400`` (inf) and ``NaN`` fail at load with one line naming the shard, not
    an OverflowError traceback."""
    _fails_naming_the_shard(tmp_path, "1e400")
    _fails_naming_the_shard(tmp_path, "NaN")


def test_hostile_malformed_index_fails_with_one_line(tmp_path: Path) -> None:
    """Invariant: a sizes.json that is not an object (a list, a number, 100k nested '[', not
    UTF-8) fails with one line naming the file."""
    write_dataset(tmp_path, [4], sizes_json=False)
    for raw in (b"[1, 2]", b"1e400", b"[" * 100_000, b"\xff\xfe"):
        (tmp_path / "sizes.json").write_bytes(raw)
        with pytest.raises(DataError, match=r"sizes\.json") as err:
            shard_list(str(tmp_path / "part-*.tar"), "data.train")
        assert "\n" not in str(err.value)


def test_hostile_valid_bounds_are_accepted(tmp_path: Path) -> None:
    """Invariant: 0 and ordinary counts are valid (a listed empty shard is not an error)."""
    spec, _ = _with_index(tmp_path, "0")
    assert shard_list(spec, "data.train").sizes == (4, 0)


def _eval(spec: str, world: int = 1, rank: int = 0):
    return load_split(
        shard_list(spec, "data.val"),
        "data.val",
        lambda img: torch.zeros(3, 2, 2, dtype=torch.uint8),
        rank=rank,
        world=world,
        max_bad_fraction=1.0,
    )


def test_hostile_evaluation_reads_samples_beyond_the_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Invariant: evaluation reads every sample present in a shard even when sizes.json claims
    fewer (and warns naming the shard and both counts); split over 2 ranks the shares are
    disjoint and together are the whole split."""
    spec, short = _with_index(tmp_path, "0")
    with caplog.at_level(logging.WARNING, logger="fne_dist.data"):
        table = _eval(spec)
    assert sorted(table.image_ids_I.tolist()) == list(range(8))
    assert any(short.name in r.getMessage() and "says 0" in r.getMessage() for r in caplog.records)
    shares = [_eval(spec, world=2, rank=r) for r in range(2)]
    ids = [i for t in shares for i in t.image_ids_I.tolist()]
    assert sorted(ids) == list(range(8))
    orders = [i for t in shares for i in t.order_I.tolist()]
    assert len(set(orders)) == 8


def test_hostile_fewer_samples_than_indexed_count_as_truncated(tmp_path: Path) -> None:
    """Invariant: samples sizes.json promises that are not there count as truncated_tar (per
    rank: each rank counts its own share of them)."""
    spec, _ = _with_index(tmp_path, "7")
    table = _eval(spec)
    assert table.num_images == 8 and dict(table.bad) == {"truncated_tar": 3}
    per_rank = [dict(_eval(spec, world=2, rank=r).bad) for r in range(2)]
    assert sum(b.get("truncated_tar", 0) for b in per_rank) == 3


def test_hostile_count_mine_matches_a_loop() -> None:
    """Invariant: the closed-form count of a rank's indices in a range equals counting them."""
    for world in (1, 2, 3, 5):
        for rank in range(world):
            for begin in range(0, 9):
                for end in range(0, 12):
                    expected = sum(1 for i in range(begin, end) if i % world == rank)
                    assert count_mine(begin, end, rank, world) == expected
    assert count_mine(0, MAX_SHARD_SAMPLES * 10**20, 0, 1) == MAX_SHARD_SAMPLES * 10**20
