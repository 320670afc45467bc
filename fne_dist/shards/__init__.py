"""Shard tooling: turn the image-text data users have into WebDataset shards.

``python -m fne_dist.shards {folder,coco,karpathy,albef,features,index} ...`` (see
:mod:`.__main__`). Every writer produces the same conventions, the ones the training loader
reads:

* one tar member per field, ``<key>.<ext>``; keys ``<prefix>-<9 digits>``, unique in the output;
* the image bytes unchanged as ``jpg``/``png``/``webp`` (verified with PIL, never re-encoded),
  or a precomputed feature vector as ``img_feat.npy``;
* ``txt``: the caption (UTF-8, whitespace collapsed);
* ``json``: ``image_id``, ``caption_id``, ``group_id`` when known, and ``captions`` /
  ``caption_ids`` in the ``image`` layout;
* ``sizes.json`` (shard → sample count), ``_summary.json`` and ``_progress.json`` next to the
  shards.

Writing is deterministic (byte-identical shards across runs), atomic per shard and resumable.
Modules: :mod:`.entries` (the input model), :mod:`.inputs` (reading annotation files),
:mod:`.media` (image/feature members), :mod:`.layout` (pair/image samples), :mod:`.writer`
(tar files, progress, size index, summary), one module per input format, :mod:`.index`.
"""

from .albef import load_albef
from .coco import load_coco
from .entries import Caption, ImageEntry, ShardError
from .features import load_feature_captions
from .folder import load_folder
from .index import count_samples, index_shards
from .karpathy import load_karpathy
from .layout import plan_samples, write_entries
from .media import FeatureRows, ImageFiles
from .writer import ShardOptions, ShardSummary, write_shards

__all__ = [
    "Caption",
    "FeatureRows",
    "ImageEntry",
    "ImageFiles",
    "ShardError",
    "ShardOptions",
    "ShardSummary",
    "count_samples",
    "index_shards",
    "load_albef",
    "load_coco",
    "load_feature_captions",
    "load_folder",
    "load_karpathy",
    "plan_samples",
    "write_entries",
    "write_shards",
]
