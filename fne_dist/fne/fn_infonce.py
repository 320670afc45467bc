"""InfoNCE with false-negative cancellation (``fne.infonce_fn``; the maths: ``fne.fn_signal``).

Legend: B anchors, N candidates [batch ; memory], D embedding dim, F detection columns.

One direction at a time, over every candidate (autograd through the B×N logits, like plain
InfoNCE); the posterior's log-odds, the weights and the detection sums are computed without
gradient. Pure tensors: the fitted mixtures arrive in the Gaussians.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .detection import COLUMNS, dense_detection
from .fn_signal import denominator_log_weights, pair_log_odds, weighted_info_nce
from .params import FneConfig
from .selection import negative_mask
from .stats import Gaussians


def fn_info_nce(
    anchor_BD: Tensor,
    cand_ND: Tensor,
    intra_BN: Tensor,
    ids_B: Tensor,
    pos_col_B: Tensor,
    cand_ids_N: Tensor,
    groups: tuple[Tensor, Tensor] | None,
    g: Gaussians,
    cfg: FneConfig,
    temperature: Tensor,
    text_BN: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss of one direction, diagnostic sums). intra_BN: image-image similarities of the
    anchors' and candidates' images (no gradient); groups: (anchor, candidate) labels to score
    "P_fn > ε" against, or None; text_BN: text-text similarities (fn_signal tail_both)."""
    sim_BN = anchor_BD @ cand_ND.T
    positive_BN = negative_mask(ids_B, pos_col_B, cand_ids_N)
    negative_BN = ~positive_BN & (cand_ids_N >= 0)[None, :]
    with torch.no_grad():
        tail = (cfg.tail_z, cfg.tail_slope)
        log_odds_BN = pair_log_odds(
            cfg.fn_signal, g, sim_BN.detach(), intra_BN, negative_BN, tail, text_BN
        )
        log_w_BN, flagged_BN = denominator_log_weights(
            log_odds_BN, negative_BN, cfg.infonce_fn, cfg.eps
        )
    loss = weighted_info_nce(sim_BN / temperature, positive_BN, log_w_BN)
    sums = {
        "fn": flagged_BN.sum().to(torch.float64),
        "unmasked": negative_BN.sum().to(torch.float64),
    }
    if groups is not None:
        # No hard cut here: every evaluable candidate counts as "in the window".
        with torch.no_grad():
            detect_BF = dense_detection(
                sim_BN.detach(), ~negative_BN, groups[0], groups[1], negative_BN, g, cfg,
                True, log_odds_BN,
            )  # fmt: skip
        sums |= {f"fnd_{key}": detect_BF[:, i].sum() for i, key in enumerate(COLUMNS)}
    return loss, sums
