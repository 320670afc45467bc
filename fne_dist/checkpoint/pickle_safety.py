"""DeepSpeed's own checkpoint files are pickles (DeepSpeed 0.19 reads them with
``torch.load(weights_only=False)``): each is opened first with ``weights_only=True`` plus the few
DeepSpeed/python types its files legitimately hold, so a file that would run code or build
other objects is refused, naming the file, before DeepSpeed unpickles it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .format import ENGINE_TAG, CheckpointError


# Types DeepSpeed 0.19's own checkpoint files hold besides tensors and containers.
def _deepspeed_safe_globals() -> list:
    import argparse
    import collections

    safe: list = [argparse.Namespace, collections.OrderedDict, collections.defaultdict]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        safe += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        safe.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        safe.append(ZeroStageEnum)
    except ImportError:
        pass
    return safe


def check_engine_files_safe(directory: Path) -> None:
    """Open every DeepSpeed file with ``weights_only=True`` (plus DeepSpeed's own types) so
    that a pickle that would run code or build other objects is refused before DeepSpeed
    unpickles it with ``weights_only=False``."""
    safe = _deepspeed_safe_globals()
    for path in sorted((directory / ENGINE_TAG).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(safe):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path}: refused to load: it holds more than tensors and DeepSpeed's own "
                f"types ({first})"
            ) from None
