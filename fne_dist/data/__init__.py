"""Data: WebDataset shards of image-caption pairs → in-memory splits and batches."""

from .pairs import PairTable, load_pairs, resolve_shards

__all__ = ["PairTable", "load_pairs", "resolve_shards"]
