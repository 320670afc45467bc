"""Slurm's compact notations, read without calling Slurm: host lists and task counts.

``SLURM_JOB_NODELIST="gpu[01-03,07],login1"`` names gpu01, gpu02, gpu03, gpu07 and login1;
``SLURM_TASKS_PER_NODE="2(x3),1"`` means 2 tasks on each of the first 3 nodes and 1 on the
fourth. ``scontrol show hostnames`` expands the first, but a rank must not need Slurm's client
tools (nor a round trip to slurmctld per process) just to learn where rank 0 lives.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_brackets(body: str, text: str) -> list[str]:
    """``01-03,07`` → ["01", "02", "03", "07"]; zero padding follows the lower bound."""
    out = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in Slurm host list {text!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in Slurm host list {text!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(text: str) -> list[str]:
    """Every host name of a Slurm host list, in Slurm's order (several bracket groups in one
    name, as in ``rack[1-2]-n[1-2]``, expand like Slurm's: the cartesian product)."""
    hosts: list[str] = []
    for part in _split_top(text):
        pieces = re.split(r"\[([^\]]*)\]", part)
        # even indices: literal text; odd indices: bracket bodies
        choices = [
            [piece] if i % 2 == 0 else _expand_brackets(piece, text)
            for i, piece in enumerate(pieces)
        ]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """``2(x3),1`` → [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad SLURM_TASKS_PER_NODE entry {item!r} in {text!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def node_address(host: str, timeout_s: float = 10.0) -> str:
    """The address Slurm itself uses for ``host`` (its ``NodeAddr``): node names need not
    resolve in DNS. The name itself when scontrol is absent or does not know the node."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return host
    try:
        out = subprocess.run(
            [scontrol, "show", "node", host, "--oneliner"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return host
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else host


def job_port(job_id: str, step_id: str | None = None) -> int:
    """A rendezvous port that every task of one job step computes alike: 20000-29999, below
    Linux's ephemeral range (32768+), so no outgoing connection already holds it. Two steps of
    one job running at once differ in the last digit."""
    step = int(step_id) if step_id and step_id.isdigit() else 0
    return 20000 + (int(job_id) % 1000) * 10 + step % 10
