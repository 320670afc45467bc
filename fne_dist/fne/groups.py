"""Group labels (e.g. an emoji family, a COCO image's duplicates): the one definition of "no
label", shared by the data reader, the loss diagnostics, false-negative detection and the
retrieval metrics.

A group label is a non-negative integer. ``NO_GROUP`` (−1) is what a sample without
``group_id``/``family_id`` gets (img2dataset's shards, for one); every negative value, the
memory's never-written marker (−100) included, means "no label". No label is its own value,
never a group: two unlabelled items are not group mates, and shares or rates over groups are
computed over labelled items only (not measured, NaN, when there is none).
"""

from __future__ import annotations

from torch import Tensor

NO_GROUP = -1


def labelled(groups: Tensor) -> Tensor:
    """Bool mask of the items that carry a group label."""
    return groups >= 0


def same_group(groups_a: Tensor, groups_b: Tensor) -> Tensor:
    """Bool (broadcast) mask of pairs sharing a group: equal labels, both labelled."""
    return (groups_a == groups_b) & labelled(groups_a) & labelled(groups_b)
