"""One rank of tests/test_data_agreement.py: stream an epoch through ``agreed_batches``.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python data_agreement.py SPEC FRAC OUT

Writes OUT/rank{r}.json: the ids of every batch this rank trained on, and the DataError it
stopped with (if any).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fne_dist.data import DataError, StreamOptions, TrainStream, shard_list
from fne_dist.data.batching import PairCollate
from fne_dist.epochs import DataLog, agreed_batches
from fne_dist.reporting import Reporter
from fne_dist.timing import NullTimer


def main() -> None:
    spec, frac, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    opts = StreamOptions(batch=4, seed=5, rank=rank, world=world, max_bad_fraction=frac)
    stream = TrainStream(
        shard_list(spec, "data.train"),
        opts,
        lambda d: {"ids": d.image_id, "groups": d.group},
        PairCollate(None),
    )
    batches, error = [], None
    log = DataLog(stream, Reporter())
    try:
        for _, _, batch in agreed_batches(
            stream, stream.steps_per_epoch, log, NullTimer(), torch.device("cpu")
        ):
            batches.append(batch["ids"].tolist())
    except DataError as err:
        error = str(err)
    (out / f"rank{rank}.json").write_text(
        json.dumps({"batches": batches, "error": error, "cut_short": log.epochs_cut_short})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
