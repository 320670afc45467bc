"""How a triplet loss picks each anchor's negative: one object per rule, chosen in one place.

The sampler, the weights and the loss's diagnostics ask a rule what it does (does it draw? do
its weights use the posterior?) and never compare its name, so a new rule is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """A way to pick negatives. ``draws``: a weighted draw over the hard-cut window (the
    fallback, the window and the detection diagnostics apply), else the hardest violator
    (VSE++); ``uses_posterior``: the draw's weights are FNE's (kernel and P_fn, the gate, the
    posterior's diagnostics), else uniform over the window."""

    name: str  # for messages and reports only: nothing branches on it
    draws: bool
    uses_posterior: bool


FNE = Rule("fne", draws=True, uses_posterior=True)
WINDOW = Rule("window", draws=True, uses_posterior=False)  # FNE without the Bayes part
HARDEST = Rule("hardest", draws=False, uses_posterior=False)  # VSE++

RULES: dict[str, Rule] = {r.name: r for r in (FNE, WINDOW, HARDEST)}
"""Every rule by its name."""

RULE_OF_LOSS: dict[str, Rule] = {"fne": FNE, "window": WINDOW, "vse_pp": HARDEST}
"""The rule of each sampled triplet loss (``fne.loss``); vse0 and infonce pick no negative."""
