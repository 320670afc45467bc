"""One rank of tests/test_hostile_process.py's stop agreement (SIGTERM).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python stop_agreement.py SPEC OUT

Streams an epoch through ``agreed_batches``; rank 1 alone gets SIGTERM while it trains on its
second batch (as when a signal reaches only some ranks). Writes OUT/rank{r}.json with the
batches this rank trained on and whether the stop was agreed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from fne_dist.data import StreamOptions, TrainStream, shard_list
from fne_dist.data.batching import PairCollate
from fne_dist.epochs import DataLog, agreed_batches
from fne_dist.interrupt import handle_signals
from fne_dist.reporters import Reporter
from fne_dist.timing import NullTimer


def main() -> None:
    spec, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    opts = StreamOptions(batch=4, seed=5, rank=rank, world=world, max_bad_fraction=1.0)
    stream = TrainStream(
        shard_list(spec, "data.train"),
        opts,
        lambda d: {"ids": d.image_id, "groups": d.group},
        PairCollate(None),
    )
    trained = []
    log = DataLog(stream, Reporter())
    with handle_signals() as stop:
        for micro, _, batch in agreed_batches(
            stream, stream.steps_per_epoch, log, NullTimer(), stop=stop
        ):
            trained.append([micro, batch["ids"].tolist()])
            if rank == 1 and micro == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the step itself still finishes
    (out / f"rank{rank}.json").write_text(
        json.dumps({"trained": trained, "agreed": stop.agreed, "signal": stop.signal_name})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
