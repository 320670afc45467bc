"""Frozen towers: their features, computed once, stored as shards that the stream reads.

A frozen backbone gives the same output every epoch (and its momentum copy equals itself), so
its features are computed once per split and written as WebDataset shards, one per source
shard, with the same keys: ``img_feat.npy`` (F) replaces the image of a frozen image tower,
``txt_feat.npy`` (K×F, one row per caption) sits next to ``txt`` for a frozen text tower, and
``json`` keeps the ids. Training then streams these shards through the same pipeline as raw
ones (the ``features`` writer of ``python -m fne_dist.shards`` makes the same members).

The directory is keyed by what it holds (the source shards' names, sample counts and byte sizes,
the encoder settings, the caption choice), never by split name: val and test over the same shards
share one cache. It is built in a private temporary directory and renamed into place, so a crash
never leaves a half-written cache that looks complete; a stop signal ends the build between two
batches and removes the temporary directory (the next run builds it anew). ``build_once`` holds
a lock next to it while building, so on a cache directory shared by several nodes one node
builds and the others wait (a lock held by a process that died is released by the kernel).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..interrupt import Interrupted
from ..progress import TaskProgress
from .decode import BadSample, BadSampleLog, Decoded, IdRegistry, decode_sample
from .sources import DataError, ShardList, warn_if_more
from .stream import raw_samples

if TYPE_CHECKING:
    from ..config import DataConfig

FORMAT = 3  # bump when preprocessing, pooling, the layout or ids change what a cache holds


def cache_fingerprint(identity: dict) -> str:
    return hashlib.sha1(
        json.dumps({"format": FORMAT, **identity}, sort_keys=True).encode()
    ).hexdigest()[:16]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def _features(
    chunk: list[Decoded], image_backbone: nn.Module | None, text_backbone: nn.Module | None
) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    img: list[np.ndarray | None] = [None] * len(chunk)
    txt: list[np.ndarray | None] = [None] * len(chunk)
    if image_backbone is not None:
        pixels = torch.stack([image_backbone.preprocess(d.image) for d in chunk])
        image_backbone.eval()
        feats = image_backbone(pixels).float().numpy()
        img = [feats[i] for i in range(len(chunk))]
    if text_backbone is not None:
        captions = [c for d in chunk for c in d.captions]
        # max_length columns: the cache stays bit-identical to the caches written before
        # model.text.pad_multiple (a frozen tower runs once per caption; its cost is paid once)
        tokens = text_backbone.tokenize(captions, fixed_length=True)
        text_backbone.eval()
        feats = text_backbone(tokens["input_ids"], tokens["attention_mask"]).float().numpy()
        start = 0
        for i, d in enumerate(chunk):
            txt[i] = feats[start : start + len(d.captions)]
            start += len(d.captions)
    return img, txt


def _write_chunk(tar: tarfile.TarFile, chunk: list[Decoded], img, txt) -> None:
    for d, f_img, f_txt in zip(chunk, img, txt, strict=True):
        if f_img is not None:
            _add(tar, f"{d.key}.img_feat.npy", _npy(f_img))
        elif d.img_feat is not None:
            _add(tar, f"{d.key}.img_feat.npy", _npy(d.img_feat))
        else:
            ext, raw = d.raw_image
            _add(tar, f"{d.key}.{ext}", raw)
        if f_txt is not None:
            _add(tar, f"{d.key}.txt_feat.npy", _npy(f_txt))
        _add(tar, f"{d.key}.txt", d.captions[0].encode("utf-8"))
        meta = {"image_id": d.image_id, "caption_id": d.caption_id, "group_id": d.group}
        if len(d.captions) > 1:
            meta["captions"] = d.captions
        _add(tar, f"{d.key}.json", json.dumps(meta).encode("utf-8"))


def build_feature_shards(
    shards: ShardList,
    out_dir: Path,
    towers: tuple[nn.Module | None, nn.Module | None],
    data: DataConfig,
    all_captions: bool,
    batch_size: int = 64,
    label: str = "feature cache",
    stop_reason: Callable[[], str | None] = lambda: None,
) -> Counter[str]:
    """Write the feature shards of ``shards`` to ``out_dir`` (atomically); returns bad counts.
    ``towers`` are the (image, text) backbones whose features are cached (None: that side's
    raw member is kept); ``data`` gives the caption member and the bad-input limits; ``label``
    names the build in its progress lines. ``stop_reason`` is asked between batches: a reason
    (a signal's name) ends the build with ``Interrupted``, leaving no cache."""
    # a random name: host name and pid identify nothing across containers or nodes
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = _build_into(
            tmp, shards, towers, data, all_captions, batch_size, label, stop_reason,
        )  # fmt: skip
    except BaseException:  # a bad shard, a signal, a crash: no half-built cache stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another builder finished first: its cache is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _check_stop(stop_reason: Callable[[], str | None], label: str, progress: TaskProgress) -> None:
    reason = stop_reason()
    if reason is not None:
        progress.close(failed=True)
        raise Interrupted(
            f"{reason} during the {label} build: stopped before training, and the partial "
            "cache was removed; run the same command again to continue (a requeued Slurm job "
            "does so by itself), which builds the cache anew"
        )


def _build_into(
    tmp: Path,
    shards: ShardList,
    towers: tuple[nn.Module | None, nn.Module | None],
    data: DataConfig,
    all_captions: bool,
    batch_size: int,
    label: str,
    stop_reason: Callable[[], str | None],
) -> Counter[str]:
    """The feature shards of ``shards`` written into ``tmp``, ``sizes.json`` last."""
    image_backbone, text_backbone = towers
    log = BadSampleLog()
    ids = IdRegistry()  # string ids of the whole split
    sizes = {}
    progress = TaskProgress("feature_cache", label, shards.total, "samples")
    for n, (url, size) in enumerate(zip(shards.urls, shards.sizes, strict=True)):
        name = f"feat-{n:06d}.tar"
        bad: Counter[str] = Counter()
        written = seen = 0
        before = progress.done  # samples of the shards before this one
        with tarfile.open(tmp / name, "w", format=tarfile.PAX_FORMAT) as tar:
            chunk: list[Decoded] = []
            for sample in raw_samples(url):  # every sample present (see load_split)
                seen += 1
                try:
                    chunk.append(
                        decode_sample(
                            sample,
                            data.caption_key,
                            data.max_pixels,
                            all_captions,
                            decode_image=image_backbone is not None,
                            ids=ids,
                        )
                    )
                except BadSample as err:
                    bad[err.reason] += 1
                    log.add(err.reason, url, str(err))
                if len(chunk) == batch_size:
                    _check_stop(stop_reason, label, progress)  # before the costly forward
                    _write_chunk(tar, chunk, *_features(chunk, image_backbone, text_backbone))
                    written += len(chunk)
                    chunk = []
            if chunk:
                _check_stop(stop_reason, label, progress)
                _write_chunk(tar, chunk, *_features(chunk, image_backbone, text_backbone))
                written += len(chunk)
        progress.update(before + seen - progress.done)
        if seen < size:
            bad["truncated_tar"] += size - seen
            log.add("truncated_tar", url, f"{size - seen} of {size} samples missing", size - seen)
        warn_if_more(url, size, seen)
        size = max(size, seen)
        if sum(bad.values()) > data.max_bad_fraction * size:
            progress.close(failed=True)
            raise DataError(
                f"shard {url}: {sum(bad.values())} of {size} samples are bad ({dict(bad)}), "
                f"above data.max_bad_fraction={data.max_bad_fraction}"
            )
        sizes[name] = written
    progress.close()
    (tmp / "sources.json").write_text(json.dumps(list(shards.urls), indent=1))
    (tmp / "sizes.json").write_text(json.dumps(sizes, indent=1))  # last: marks a complete build
    return log.counts


def is_complete(out_dir: Path) -> bool:
    return (out_dir / "sizes.json").is_file()


def build_once(
    out_dir: Path,
    build: Callable[[], object],
    timeout_s: float,
    poll_s: float = 0.5,
    stop_reason: Callable[[], str | None] = lambda: None,
) -> bool:
    """Run ``build`` (which must leave ``out_dir`` complete) unless ``out_dir`` is complete,
    holding an exclusive lock on ``<out_dir>.lock`` meanwhile: several builders on one shared
    cache directory build it once; the others wait for it (at most ``timeout_s``, and no longer
    than a stop signal: ``stop_reason``). Returns True when this call built it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while not is_complete(out_dir):
        with open(out_dir.with_name(f"{out_dir.name}.lock"), "a") as lock:
            try:  # POSIX record locks: honoured across NFS clients, unlike flock on some
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                reason = stop_reason()
                if reason is not None:
                    raise Interrupted(
                        f"{reason} while waiting for another builder of the feature cache "
                        f"{out_dir}: stopped before training; run the same command again"
                    ) from None
                if time.monotonic() > deadline:
                    raise DataError(
                        f"feature cache {out_dir}: another builder holds {lock.name} for "
                        f"more than data.cache_wait_s={timeout_s:.0f} s"
                    ) from None
                time.sleep(poll_s)
                continue
            try:
                if not is_complete(out_dir):  # the holder before us may have finished it
                    build()
                    return True
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN)
    return False
