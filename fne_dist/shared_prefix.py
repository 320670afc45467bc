"""The frozen early layers of a partly trained tower, run once for both encoders.

With ``model.*.train_blocks`` a tower's early modules are frozen (``encoders._train_last``):
in eval mode, never updated, and the momentum copy's are bit-equal to them (``ema_update``
leaves frozen parameters alone). Both encoders see the same batch, so the momentum forward
through those modules would recompute exactly what the online forward just computed. Here the
online forward records the last frozen module's output, and the momentum forward takes it
instead of recomputing: every frozen module of the momentum copy answers with that recorded
output (the modules between them are skipped, whatever they would have computed is replaced
by the chain's end), and the trained blocks run as before. Exactly the values of the full
momentum forward (tests/test_shared_prefix.py), at the cost of one held activation.

Only when the recorded activation has the momentum copy's dtype (fp32 training: a bf16 engine's
activations differ from the fp32 copy's, so the momentum model then runs in full), and only for
towers whose ``frozen_prefix()`` names a chain (encoders.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

Encoder = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor, Tensor]]


class SharedPrefix:
    """``online(batch)`` runs the online encoder and keeps each tower's frozen-prefix output;
    ``momentum(batch)`` runs the momentum copy from them. Call them in that order, once each
    per step (``step.forward_step`` does); without a frozen prefix both are the plain calls."""

    def __init__(self, online: Encoder, online_module: nn.Module, momentum: nn.Module) -> None:
        self._online, self._momentum = online, momentum
        # (online tower's last frozen module, the momentum tower's frozen modules) per tower
        self.towers: list[tuple[nn.Module, list[nn.Module]]] = []
        for (_, mod_o), (_, mod_m) in zip(
            online_module.named_modules(), momentum.named_modules(), strict=True
        ):
            chain_o = getattr(mod_o, "frozen_prefix", lambda: [])()
            chain_m = getattr(mod_m, "frozen_prefix", lambda: [])()
            if chain_o and len(chain_o) == len(chain_m):
                self.towers.append((chain_o[-1], chain_m))
        self._seen: dict[int, Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.towers)

    def online(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        self._seen.clear()
        if not self.towers:
            return self._online(batch)
        with contextlib.ExitStack() as hooks:
            for i, (last, _) in enumerate(self.towers):
                hooks.callback(last.register_forward_hook(self._keeper(i)).remove)
            return self._online(batch)

    def momentum(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        try:
            with self._fed():
                return self._momentum(batch)
        finally:
            self._seen.clear()

    def _keeper(self, i: int) -> Callable[[nn.Module, tuple, object], None]:
        def keep(_module: nn.Module, _inputs: tuple, output: object) -> None:
            if isinstance(output, Tensor):
                self._seen[i] = output.detach()

        return keep

    @contextlib.contextmanager
    def _fed(self) -> Iterator[None]:
        """Every frozen module of each fed momentum tower returns the recorded output (an
        instance attribute shadows the class's ``forward`` until the block ends)."""
        stubbed: list[nn.Module] = []
        try:
            for i, (_, chain) in enumerate(self.towers):
                seen = self._seen.get(i)
                if seen is None or seen.dtype != _dtype(chain[-1]):
                    continue  # not recorded (another path) or another precision: run in full
                for module in chain:
                    module.forward = _answer(seen)  # type: ignore[method-assign]
                    stubbed.append(module)
            yield
        finally:
            for module in stubbed:
                del module.forward


def _answer(value: Tensor) -> Callable[..., Tensor]:
    def forward(*_args: object, **_kwargs: object) -> Tensor:
        return value

    return forward


def _dtype(module: nn.Module) -> torch.dtype | None:
    p = next(module.parameters(), None)
    return None if p is None else p.dtype


class OnlineMemory:
    """``memory.encoder: online``: the "momentum" embeddings are the online forward's own,
    detached (an XBM-style cross-batch memory); no second forward. Same call order as
    ``SharedPrefix``."""

    def __init__(self, online: Encoder) -> None:
        self._online = online
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def online(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        self._last = self._online(batch)
        return self._last

    def momentum(self, _batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if self._last is None:
            raise RuntimeError("OnlineMemory.momentum before online")
        last, self._last = self._last, None
        return tuple(t.detach() for t in last)  # type: ignore[return-value]
