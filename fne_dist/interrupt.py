"""SIGINT and SIGTERM end a run cleanly and resumably.

A signal only raises a flag; the step in progress finishes. Before the next step the ranks agree
on stopping (the flag rides the per-step all-reduce of ``epochs.agreed_batches``: a signal may
reach only some ranks), then every rank decides the same thing about a last checkpoint: one is
written only if one is due (an optimizer step since the last checkpoint, and checkpoints are on)
and it fits the grace period left (Slurm's KillWait, ``checkpoint.stop_grace_s``), estimated from
the last checkpoint this process wrote; otherwise the run exits at once and the previous
checkpoint stays the one to resume from. Either way no ``step-N.tmp`` is left, one line is
printed, and the exit code is ``EXIT_INTERRUPTED``.

A second signal stops at once (``Interrupted`` raised from the handler): the user insisted.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

# "interrupted, resumable": sysexits.h's EX_TEMPFAIL ("try again later").
EXIT_INTERRUPTED = 75
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The estimate of a checkpoint's duration is the last one's, times this (the disk, the upload
# and the ranks vary from one checkpoint to the next).
SAFETY = 1.5

log = logging.getLogger("fne_dist")


class Interrupted(Exception):
    """The run stopped on a signal; resumable (train.main prints it as one line, exit 75)."""


class StopRequest:
    """The signal flag of this process, and what the ranks agreed."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.at: float | None = None  # monotonic time of the first signal
        self.agreed = False  # every rank stops before the next step

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, signum: int) -> None:
        if self.requested:
            raise Interrupted(f"{signal.Signals(signum).name} again: stopped at once")
        self.signal_name, self.at = signal.Signals(signum).name, time.monotonic()
        log.info("%s: stopping after this step", self.signal_name)

    def fits(self, grace_s: float, last_checkpoint_s: float | None) -> bool:
        """Whether a checkpoint estimated from the last one (``None``: none measured in this
        process, so no estimate) ends within the grace period left since the signal."""
        if last_checkpoint_s is None or self.at is None:
            return False
        elapsed = time.monotonic() - self.at
        return elapsed + SAFETY * last_checkpoint_s <= grace_s


@contextlib.contextmanager
def handle_signals(stop: StopRequest | None = None) -> Iterator[StopRequest]:
    """SIGINT/SIGTERM set ``stop`` for the block (the previous handlers come back after it).
    Only the main thread can install handlers; elsewhere (a Ray Train worker's thread) the
    launcher's own signal handling stays in charge and the request never fires."""
    stop = stop or StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, lambda signum, _frame: stop.request(signum))
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
