"""Where step metrics go: a null reporter, the console/progress bar, a JSON-lines file, or a
fan-out of several (Prometheus and Ray reporters plug in the same way)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class Reporter:
    """The null reporter: accepts everything, does nothing."""

    def step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def checkpoint(self, path: Path, step: int, is_main: bool) -> None:
        """A checkpoint was written at ``path`` (every rank calls this, same count)."""

    def resume_source(self) -> Path | None:
        """A checkpoint the launcher wants this run to resume from (Ray after a failure)."""
        return None

    def finish(self, result: dict[str, Any]) -> None:
        """The run's final metrics (called on every rank; empty on ranks other than 0)."""

    def close(self) -> None:
        pass


class ConsoleReporter(Reporter):
    """A progress bar with samples/s on a terminal; a line every ``every`` steps otherwise."""

    def __init__(self, total_steps: int, samples_per_step: int, every: int = 50) -> None:
        self.total, self.samples_per_step, self.every = total_steps, samples_per_step, every
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        rate = (step + 1) * self.samples_per_step / max(1e-9, time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.update(step + 1 - self.bar.n)
            self.bar.set_postfix(
                loss=f"{metrics.get('loss', float('nan')):.4f}", samples_s=f"{rate:.0f}"
            )
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            print(f"step {step + 1}/{self.total} {rate:.0f} samples/s {shown}", flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class JsonLinesReporter(Reporter):
    """One JSON object per logged step, appended to ``path`` (the run's metrics history)."""

    def __init__(self, path: Path) -> None:
        # Open for the whole run (closed in close()), so no context manager.
        self.file = Path(path).open("a")  # noqa: SIM115

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step + 1, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class FanOut(Reporter):
    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def checkpoint(self, path: Path, step: int, is_main: bool) -> None:
        for r in self.reporters:
            r.checkpoint(path, step, is_main)

    def resume_source(self) -> Path | None:
        return next((p for r in self.reporters if (p := r.resume_source()) is not None), None)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        for r in self.reporters:
            r.step(step, metrics)

    def message(self, text: str) -> None:
        for r in self.reporters:
            r.message(text)

    def finish(self, result: dict[str, Any]) -> None:
        for r in self.reporters:
            r.finish(result)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
