"""Compare two runs.json files of bench/quality.py row by row: is each variant's mean within the
earlier seeds' standard deviation?

    python bench/compare_runs.py EARLIER/runs.json NOW/runs.json [--variants a b ...]

Prints a markdown table: the earlier and the new group rsum and group mAP (mean ± sample sd
over seeds), the difference of means and whether it is within 1 sd of the earlier seeds (and,
as a second look, within the larger of the two sds), plus how many seeds are equal to the
digit (group rsum exactly, group mAP within 0.005: the mAP moved by up to 0.001 between the
earlier code and now with equal R@K). A variant with no earlier row is listed as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def mean_sd(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def by_seed(rows: list[dict]) -> dict[int, dict]:
    """runs.json lists a variant's runs in the order of --seeds (both runs used 0 1 2)."""
    return dict(enumerate(rows))


def compare(earlier: dict, now: dict, variants: list[str]) -> list[str]:
    head = (
        "| variant | earlier group rsum | now | difference | within 1 sd? "
        "| earlier group mAP | now | difference | within 1 sd? | seeds equal |"
    )
    lines = [head, "|" + "---|" * 10]
    for v in variants:
        if v not in now:
            lines.append(f"| {v} | | not run | | | | | | | |")
            continue
        cells = [v]
        if v not in earlier:
            for metric in ("group_rsum", "group_map"):
                m, s = mean_sd([r[metric] for r in now[v]])
                cells += ["no earlier row", f"{m:.1f} ± {s:.1f}", "", ""]
            lines.append("| " + " | ".join(cells) + " | |")
            continue
        for metric in ("group_rsum", "group_map"):
            em, es = mean_sd([r[metric] for r in earlier[v]])
            nm, ns = mean_sd([r[metric] for r in now[v]])
            d = nm - em
            ok = "yes" if abs(d) <= es else ("no (≤ now's sd)" if abs(d) <= ns else "**no**")
            ok += f" ({abs(d) / es:.2f} sd)" if es > 0 else ""
            cells += [f"{em:.1f} ± {es:.1f}", f"{nm:.1f} ± {ns:.1f}", f"{d:+.1f}", ok]
        e, n = by_seed(earlier[v]), by_seed(now[v])
        same = sum(
            1
            for s in n
            if s in e
            and abs(n[s]["group_rsum"] - e[s]["group_rsum"]) < 1e-6
            and abs(n[s]["group_map"] - e[s]["group_map"]) < 5e-3
        )
        cells.append(f"{same}/{len(n)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("earlier", type=Path)
    p.add_argument("now", type=Path)
    p.add_argument("--variants", nargs="+")
    a = p.parse_args()
    earlier = json.loads(a.earlier.read_text())
    now = json.loads(a.now.read_text())
    print("\n".join(compare(earlier, now, a.variants or list(now))))


if __name__ == "__main__":
    main()
