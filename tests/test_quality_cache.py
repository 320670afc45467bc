"""bench/quality.py reads a feature cache that holds one split under both naming schemes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("quality_cache", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_same_shards_compares_bytes(tmp_path: Path) -> None:
    """Invariant: two cache folders count as one only when they hold the same feat-*.tar
    names with identical bytes (an old `train-<hash>` and a new `feat-<hash>` of one split);
    any differing byte keeps them apart (the loader then refuses, naming the split)."""
    quality = _bench()
    a, b, c = (tmp_path / n for n in ("train-1", "feat-2", "feat-3"))
    for d, payload in ((a, b"xyz"), (b, b"xyz"), (c, b"xyw")):
        d.mkdir()
        (d / "feat-000000.tar").write_bytes(payload)
    assert quality._same_shards(a, b)
    assert not quality._same_shards(a, c)
    (b / "feat-000001.tar").write_bytes(b"")
    assert not quality._same_shards(a, b)
