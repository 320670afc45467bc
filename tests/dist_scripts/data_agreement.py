"""One rank of tests/test_data_agreement.py.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python data_agreement.py SPEC FRAC OUT
    RANK=r ... python data_agreement.py SPEC eval OUT

Default mode: stream an epoch through ``agreed_batches``; writes OUT/rank{r}.json with the ids
of every batch this rank trained on and the DataError it stopped with (if any).
``eval``: read this rank's share of SPEC, give every image and caption an embedding that is a
function of its ids only, gather the split and write what ``evaluation.gather_split`` returns.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fne_dist import distributed as dist_ops
from fne_dist.data import DataError, StreamOptions, TrainStream, shard_list
from fne_dist.data.batching import PairCollate
from fne_dist.epochs import DataLog, Lookahead, agreed_batches
from fne_dist.reporters import Reporter
from fne_dist.timing import NullTimer


def fake_embedding(keys: torch.Tensor, dim: int = 8) -> torch.Tensor:
    """An embedding that depends only on an integer key (the same on every rank)."""
    rows = [torch.Generator().manual_seed(int(k) + 1) for k in keys.tolist()]
    return (
        torch.stack([torch.randn(dim, generator=g) for g in rows]) if rows else torch.zeros(0, dim)
    )


def gather_eval(spec: str, rank: int, world: int, out: Path) -> None:
    from fne_dist.data import load_split
    from fne_dist.sharded_eval import gather_split

    table = load_split(
        shard_list(spec, "data.val"),
        "data.val",
        lambda img: torch.zeros(3, 2, 2),
        rank=rank,
        world=world,
    )
    img = fake_embedding(table.image_ids_I)
    txt = fake_embedding(table.order_T)  # a caption's key: its global position
    img, txt, text_to_image, groups = gather_split(table, img, txt)
    torch.save(
        {"img": img, "txt": txt, "text_to_image": text_to_image, "groups": groups},
        out / f"rank{rank}.pt",
    )


def main() -> None:
    spec, frac, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    if frac == "eval":
        gather_eval(spec, rank, world, out)
        dist.destroy_process_group()
        return
    frac = float(frac)
    opts = StreamOptions(batch=4, seed=5, rank=rank, world=world, max_bad_fraction=frac)
    stream = TrainStream(
        shard_list(spec, "data.train"),
        opts,
        lambda d: {"ids": d.image_id, "groups": d.group},
        PairCollate(None),
    )
    batches, error = [], None
    log = DataLog(stream, Reporter())
    # VOTE=1: each step votes for the next as the loop does, the vote riding on a gather of the
    # step's ids (as on the step's gather); every all-reduce is counted
    ahead = Lookahead() if os.environ.get("VOTE") == "1" else None
    reduces, all_reduce = [0], dist.all_reduce

    def counted(*args, **kwargs):
        reduces[0] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        steps = stream.steps_per_epoch
        for _, _, batch in agreed_batches(stream, steps, log, NullTimer(), ahead=ahead):
            batches.append(batch["ids"].tolist())
            vote = ahead.vote() if ahead is not None else None
            if vote is not None:
                ids = batch["ids"]
                column = torch.full((ids.shape[0], 1), vote, dtype=torch.int64)
                _, votes = dist_ops.all_gather_rows(ids, column)
                ahead.agreed(int(votes.min()))
    except DataError as err:
        error = str(err)
    doc = {"batches": batches, "error": error, "cut_short": log.epochs_cut_short}
    (out / f"rank{rank}.json").write_text(json.dumps({**doc, "all_reduces": reduces[0]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
