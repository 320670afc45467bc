"""Sharded evaluation: every rank embeds its share of a split, the shares are gathered.

Legend: I images, T captions, D embedding dim, W ranks.

Each rank holds every W-th sample (``data/splits.py``), embeds it with the online encoders, and
all ranks gather images (embedding, id, group, global order) and captions (embedding, image id,
global order). The gathered split is put back in global sample order and images seen on several
ranks are kept once, so W ranks compute exactly the metrics one rank would. Every rank takes
part in the forward passes, which ZeRO-3 needs (its forward gathers partitioned parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed as dist_ops
from .data.splits import PairTable
from .model import DualEncoder
from .progress import TaskProgress
from .retrieval_metrics import fold_metrics, retrieval_metrics


@torch.no_grad()
def embed_table(
    model: DualEncoder, table: PairTable, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Online embeddings of a table's images (I×D) and captions (T×D), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    img_parts, txt_parts = [], []
    total = table.num_images + table.num_captions
    bar = TaskProgress("evaluation", "evaluation: embedding", total, "images+captions")
    for start in range(0, table.num_images, batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in table.image_inputs.items()}
        img_parts.append(model.encode_image(batch).float().cpu())
        bar.update(img_parts[-1].shape[0])
    for start in range(0, table.num_captions, batch_size):
        if table.text_inputs:
            batch = {
                k: v[start : start + batch_size].to(device) for k, v in table.text_inputs.items()
            }
        else:
            tokens = model.text_backbone.tokenize(table.captions[start : start + batch_size])
            batch = {k: v.to(device) for k, v in tokens.items()}
        txt_parts.append(model.encode_text(batch).float().cpu())
        bar.update(txt_parts[-1].shape[0])
    bar.close()
    model.train(was_training)
    empty = torch.zeros(0, model.embed_dim)  # a rank with no share still joins the gather
    return (
        torch.cat(img_parts) if img_parts else empty,
        torch.cat(txt_parts) if txt_parts else empty,
    )


def gather_split(
    table: PairTable, img_ID: Tensor, txt_TD: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All ranks' shares in global order: (img I×D, txt T×D, text_to_image T, groups I)."""
    order_I = dist_ops.all_gather_varlen(table.order_I)
    ids_I = dist_ops.all_gather_varlen(table.image_ids_I)
    groups_I = dist_ops.all_gather_varlen(table.groups_I)
    img_ID = dist_ops.all_gather_varlen(img_ID)
    order_T = dist_ops.all_gather_varlen(table.order_T)
    cap_ids_T = dist_ops.all_gather_varlen(table.image_ids_I[table.text_to_image_T])
    txt_TD = dist_ops.all_gather_varlen(txt_TD)

    by_order = torch.argsort(order_I)
    ids_I, groups_I, img_ID = ids_I[by_order], groups_I[by_order], img_ID[by_order]
    first: dict[int, int] = {}  # an image in samples on several ranks: keep its first
    keep = [first.setdefault(int(i), n) == n for n, i in enumerate(ids_I.tolist())]
    keep_I = torch.tensor(keep, dtype=torch.bool)
    ids_I, groups_I, img_ID = ids_I[keep_I], groups_I[keep_I], img_ID[keep_I]
    index_of = {int(i): n for n, i in enumerate(ids_I.tolist())}
    by_order_T = torch.argsort(order_T)
    txt_TD = txt_TD[by_order_T]
    text_to_image_T = torch.tensor(
        [index_of[int(i)] for i in cap_ids_T[by_order_T].tolist()], dtype=torch.long
    )
    return img_ID, txt_TD, text_to_image_T, groups_I


def evaluate_table(model: DualEncoder, table: PairTable, fold_size: int = 0) -> dict[str, float]:
    """Strict and group-aware R@K both ways over the whole split (every rank must call it)."""
    img_ID, txt_TD = embed_table(model, table)
    img_ID, txt_TD, text_to_image_T, groups_I = gather_split(table, img_ID, txt_TD)
    sim_IT = img_ID @ txt_TD.T
    if fold_size:
        return fold_metrics(sim_IT, text_to_image_T, groups_I, fold_size=fold_size)
    return retrieval_metrics(sim_IT, text_to_image_T, groups_I)
