"""The streaming training pipeline: split by rank and worker, equal steps, replay, reshuffle,
resampling weights, foreign shard layouts. Real DataLoader worker processes where it matters."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from fne_dist.data import DataError, RankPosition, StreamOptions, TrainStream, shard_list
from fne_dist.data.batching import PairCollate
from fne_dist.data.decode import stable_id
from fne_dist.data.plan import exact_plan

from .shard_factory import sample_members, write_dataset, write_tar


def ids_only(d) -> dict:
    return {"ids": d.image_id, "groups": d.group}


def make_stream(spec: str, **kw) -> TrainStream:
    opts = StreamOptions(**{"batch": 4, "seed": 7, "shuffle_buffer": 5, **kw})
    return TrainStream(shard_list(spec, "data.train"), opts, ids_only, PairCollate(None))


def run_epoch(stream: TrainStream, epoch: int = 0, resume=None) -> tuple[list[list[int]], list]:
    batches, positions = [], []
    for batch, position in stream.epoch(epoch, resume):
        batches.append(batch["ids"].tolist())
        positions.append(position)
    return batches, positions


@pytest.mark.system
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sizes", [[13, 7, 22], [5, 9, 3, 11, 6, 8, 4]])
def test_exact_mode_two_ranks_two_workers(tmp_path: Path, sizes: list[int]) -> None:
    """Invariant (exact mode, 2 ranks × 2 loader worker processes): every sample of the epoch is
    seen at most once, both ranks run the same number S = N // (W·B) of full batches, and the
    dropped count is N − S·W·B ≤ W·B − 1 — with fewer shards than ranks × workers (3 < 4:
    shards are split by sample ranges) and with more (7)."""
    write_dataset(tmp_path, sizes)
    spec = str(tmp_path / "part-*.tar")
    n, world, batch = sum(sizes), 2, 4
    seen: list[int] = []
    steps = []
    for rank in range(world):
        stream = make_stream(spec, rank=rank, world=world, workers=2, batch=batch)
        batches, _ = run_epoch(stream)
        assert all(len(b) == batch for b in batches)
        steps.append(len(batches))
        seen += [i for b in batches for i in b]
    assert steps[0] == steps[1] == n // (world * batch)
    assert len(seen) == len(set(seen)), "a sample was read twice"
    dropped = n - len(seen)
    assert dropped == n - steps[0] * world * batch and dropped <= world * batch - 1
    assert dropped == exact_plan(sizes, world, 2, batch, 7, 0).dropped
    assert set(seen) <= set(range(n))


@pytest.mark.system
@pytest.mark.timeout(120)
def test_replay_from_a_recorded_position(tmp_path: Path) -> None:
    """Invariant: resuming from the position recorded after batch k yields exactly the batches
    k+1.. of the uninterrupted epoch (2 loader workers; the shuffle buffer is re-seeded per
    piece and consumed samples are skipped), for a k whose next batch comes from either worker,
    also when a bad sample makes raw positions differ from batch counts."""
    write_dataset(tmp_path, [9, 14, 6, 11])
    broken = sample_members(999)
    broken["png"] = b"not an image"
    write_tar(
        tmp_path / "part-000004.tar",
        [(f"bad{i}", broken) for i in range(1)]
        + [(f"ok{i:04d}", sample_members(500 + i)) for i in range(20)],
    )
    index = json.loads((tmp_path / "sizes.json").read_text())
    index["part-000004.tar"] = 21
    (tmp_path / "sizes.json").write_text(json.dumps(index))
    spec = str(tmp_path / "part-*.tar")
    stream = make_stream(spec, workers=2, max_bad_fraction=0.5)
    full, positions = run_epoch(stream, epoch=1)
    # one bad sample leaves one worker a batch short; the epoch ends at its missing batch
    assert 61 // 4 - 2 <= len(full) < 61 // 4
    assert stream.counters.bad == {"corrupt_image": 1}
    for k in (2, 5, len(full) - 2):
        resumed = RankPosition.from_dict(json.loads(json.dumps(positions[k].to_dict())))
        again, _ = run_epoch(make_stream(spec, workers=2, max_bad_fraction=0.5), 1, resumed)
        assert again == full[k + 1 :], f"replay after batch {k} differs"


def test_new_epoch_reshuffles_reproducibly(tmp_path: Path) -> None:
    """Invariant: epoch e's batches are a function of (seed, e): two streams agree on epoch 1,
    epoch 1 differs from epoch 0, and another seed gives another order."""
    write_dataset(tmp_path, [10, 10, 10, 10])
    spec = str(tmp_path / "part-*.tar")
    e0, _ = run_epoch(make_stream(spec), 0)
    e1, _ = run_epoch(make_stream(spec), 1)
    assert run_epoch(make_stream(spec), 1)[0] == e1
    flat = [i for b in e0 for i in b]
    assert e0 != e1 and sorted(flat) != flat
    assert run_epoch(make_stream(spec, seed=8), 1)[0] != e1


@pytest.mark.system
@pytest.mark.timeout(120)
def test_resampled_mode_follows_source_weights(tmp_path: Path) -> None:
    """Invariant: in resampled mode samples come from '::' sources in proportion to their
    weights (1:3 here; 3 standard deviations of tolerance), a virtual epoch has
    samples_per_epoch // (W·B) steps, and samples repeat (drawn with replacement)."""
    write_dataset(tmp_path / "a", [10, 10], prefix="a", first_id=0, group=0)
    write_dataset(tmp_path / "b", [10, 10, 10], prefix="b", first_id=1000, group=1)
    spec = f"{tmp_path / 'a' / 'a-*.tar'}::{tmp_path / 'b' / 'b-*.tar'}"
    stream = make_stream(
        spec, mode="resampled", weights=(1.0, 3.0), samples_per_epoch=4000, batch=8, workers=2
    )
    batches, _ = run_epoch(stream)
    ids = [i for b in batches for i in b]
    assert len(batches) == 4000 // 8
    share_b = sum(i >= 1000 for i in ids) / len(ids)
    sigma = (0.75 * 0.25 / (len(ids) / 10)) ** 0.5  # draws are whole shards of 10 samples
    assert abs(share_b - 0.75) < 3 * sigma, share_b
    assert max(Counter(ids).values()) > 1


def test_img2dataset_layout_is_read_as_is(tmp_path: Path) -> None:
    """Invariant: a shard in img2dataset's layout (numeric keys; jpg, txt, json without our ids)
    written with plain tarfile is read without conversion: the image id is derived from the
    key and the shard's directory (img2dataset's keys count from 0 in every output), the txt
    is the caption (whitespace cleaned), and no sizes.json is needed (counted)."""
    samples = []
    for k in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (6, 5), (k, 0, 0)).save(buf, format="JPEG")
        meta = {"url": f"http://example.invalid/{k}.jpg", "key": f"{k:09d}", "status": "success"}
        samples.append(
            (
                f"{k:09d}",
                {
                    "jpg": buf.getvalue(),
                    "txt": f"  a photo\n of thing {k} ".encode(),
                    "json": json.dumps(meta).encode(),
                },
            )
        )
    write_tar(tmp_path / "00000.tar", samples)
    captions = []

    def keep_caption(d) -> dict:
        captions.append((d.image_id, d.captions[0], d.image.size))
        return ids_only(d)

    opts = StreamOptions(batch=4, seed=1, shuffle_buffer=1)
    stream = TrainStream(
        shard_list(str(tmp_path / "*.tar"), "k"), opts, keep_caption, PairCollate(None)
    )
    batches, _ = run_epoch(stream)
    id_of = {stable_id(f"{k:09d}", str(tmp_path)): k for k in range(8)}
    assert sorted(i for b in batches for i in b) == sorted(id_of)
    assert sorted((id_of[i], c, size) for i, c, size in captions) == [
        (k, f"a photo of thing {k}", (6, 5)) for k in range(8)
    ]


def test_fsspec_url_and_sizes_json(tmp_path: Path) -> None:
    """Invariant: an fsspec URL (file://) with a glob reads the same samples as the local path,
    and sizes.json is found next to the shards."""
    write_dataset(tmp_path, [6, 6])
    local = run_epoch(make_stream(str(tmp_path / "part-*.tar")))[0]
    remote = run_epoch(make_stream(f"file://{tmp_path}/part-*.tar"))[0]
    assert remote == local


def test_too_few_samples_for_one_global_batch_fails_clearly(tmp_path: Path) -> None:
    """Invariant: data that cannot fill one global batch fails at once, naming the numbers."""
    write_dataset(tmp_path, [3])
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_stream(str(tmp_path / "part-*.tar"), world=2, batch=4)


def test_truncated_count_without_index(tmp_path: Path) -> None:
    """Invariant: without sizes.json a truncated shard is counted up to where it breaks (its
    readable samples are still data) instead of failing the run."""
    path = write_dataset(tmp_path, [12], sizes_json=False)[0]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    n = shard_list(str(path), "k").total
    assert 0 < n < 12
    batches, _ = run_epoch(make_stream(str(path), batch=2))
    assert len(batches) == n // 2


def test_size_counting_matches_what_the_reader_yields(tmp_path: Path) -> None:
    """Invariant: a shard without sizes.json is counted with the reader's own grouping rule, so
    members webdataset's reader skips (a ``__meta__`` member, a name without an extension) are
    not counted as samples — the exact plan would otherwise promise samples the reader never
    yields and report them as truncated — and the shard tooling's `index` counts the same."""
    import tarfile

    from fne_dist.shards import count_samples as index_count

    path = write_tar(tmp_path / "meta-000000.tar", [(f"k{k}", sample_members(k)) for k in range(6)])
    with tarfile.open(path, "a") as tar:  # appended after the samples
        for name in ("__meta__", "README"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    assert shard_list(str(path), "k").total == 6 == index_count(path)
    stream = make_stream(str(path), batch=2)
    batches, _ = run_epoch(stream)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert stream.counters.bad == {}


def test_shard_memo_gives_the_epochs_of_reading_the_tars(tmp_path: Path) -> None:
    """Invariant: a stream reading in-process keeps its local shards' samples between epochs
    (``ShardMemo``) and yields, epoch after epoch and on every rank, the batches, positions and
    bad-sample counts of a stream that parses the tars each time; a bad sample stays bad, a
    truncated shard is read (and counted) as before, not kept; a shard rewritten on disk is
    read again; a budget too small for a shard keeps nothing."""
    import os

    from fne_dist.data.plan import Piece
    from fne_dist.data.stream import ShardMemo

    write_dataset(tmp_path, [9, 14, 6])
    broken = sample_members(999)
    broken["png"] = b"not an image"
    write_tar(
        tmp_path / "part-000003.tar",
        [("bad0", broken)] + [(f"ok{i:04d}", sample_members(500 + i)) for i in range(10)],
    )
    whole = write_dataset(tmp_path / "t", [12], sizes_json=False)[0]
    cut = tmp_path / "part-000004.tar"
    raw = whole.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2 + 777])  # inside a member: the tar reader raises
    (tmp_path / "sizes.json").unlink()
    spec = str(tmp_path / "part-*.tar")

    def epochs(memo: bool, rank: int) -> list:
        stream = make_stream(spec, rank=rank, world=2, max_bad_fraction=0.6)
        if not memo:
            stream.memo = None
        out = []
        for e in range(3):
            batches, positions = run_epoch(stream, e)
            out.append((batches, [p.to_dict() for p in positions], dict(stream.counters.bad)))
        return out, stream.memo

    for rank in (0, 1):
        want, _ = epochs(False, rank)
        got, memo = epochs(True, rank)
        assert got == want, rank
        print("DBG", rank, sorted(memo.kept), memo.refused)
        assert any(bad for _, _, bad in want)  # the broken sample is met and counted
    kept_url = sorted(memo.kept)[0]
    before = memo.kept[kept_url][1]
    os.utime(kept_url, ns=(1, 1))  # the same bytes, another modification time

    list(memo.samples(kept_url, Piece(0, 0, 1)))
    assert memo.kept[kept_url][1] is not before  # read again
    small = ShardMemo(budget=10)
    assert [s["__key__"] for s in small.samples(kept_url, Piece(0, 1, 3))] == [
        s["__key__"] for s in before[1:3]
    ]
    assert not small.kept and kept_url in small.refused
