"""The README's bad-input section and the code agree: every reason a
sample can be counted bad under is listed there, and nothing else is; the limits it quotes are
the code's values. Adding a reason without documenting it fails here."""

from __future__ import annotations

import re
from pathlib import Path

from fne_dist.config import DataConfig
from fne_dist.data.decode import REASONS
from fne_dist.data.sources import MAX_SHARD_SAMPLES

README = Path(__file__).resolve().parents[1] / "README.md"


def _bad_input_section() -> str:
    text = README.read_text()
    start = text.index("### Bad input")
    end = re.compile(r"^#{2,3} ", re.M).search(text, start + 1)
    return text[start : end.start() if end else len(text)]


def test_hostile_readme_lists_exactly_the_code_reasons() -> None:
    """Invariant: the bullet list of reasons (``- `reason`: ...``) equals ``REASONS``."""
    listed = re.findall(r"^- `([a-z0-9_]+)`:", _bad_input_section(), re.M)
    assert len(listed) == len(set(listed)), "a reason is listed twice"
    assert set(listed) == set(REASONS), (
        f"undocumented: {sorted(set(REASONS) - set(listed))}, "
        f"not in the code: {sorted(set(listed) - set(REASONS))}"
    )


def test_hostile_readme_quotes_the_code_limits() -> None:
    """Invariant: the limits the section quotes are the defaults and bounds in the code."""
    section = _bad_input_section()
    defaults = DataConfig()
    assert f"default {defaults.max_pixels:,}" in section
    assert f"default {defaults.max_bad_fraction * 100:g} %" in section
    assert f"0 to {MAX_SHARD_SAMPLES:,} (`MAX_SHARD_SAMPLES`)" in section
    assert "Exit codes" in section
