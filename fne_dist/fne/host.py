"""Whether a tensor lives on the host: the one switch between the FNE math's host forms
(data-dependent shapes, host reads, only the branch a value picks) and its accelerator forms
(fixed shapes, ``torch.where``, no host sync). On the CPU a host read costs nothing; on a GPU
it waits for every queued kernel. tests/test_monitoring_host_syncs.py pins the accelerator
path on the CPU by answering False here."""

from __future__ import annotations

from torch import Tensor


def on_host(t: Tensor) -> bool:
    """Whether data-dependent shapes and host reads on ``t`` are free (host tensors)."""
    return t.device.type == "cpu"
