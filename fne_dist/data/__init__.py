"""Data: shard sources, the epoch plan, explicit decoders, the streaming training pipeline,
evaluation splits and the frozen-tower feature cache (see each module's docstring)."""

from .sources import DataError, ShardList, resolve_shards, shard_list
from .splits import PairTable, load_split
from .stream import RankPosition, StreamOptions, TrainStream

__all__ = [
    "DataError",
    "PairTable",
    "RankPosition",
    "ShardList",
    "StreamOptions",
    "TrainStream",
    "load_split",
    "resolve_shards",
    "shard_list",
]
