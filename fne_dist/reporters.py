"""Where step metrics and messages go: a null reporter, the console/progress bar, a JSON-lines
file, or a fan-out of several (Prometheus and Ray reporters plug in the same way).

Every line a run prints goes through Python ``logging``: the ``fne_dist`` logger (the data
stream's ``fne_dist.data`` is its child) writes ``[rank r] message`` to stdout through one
handler, set up once per process by ``setup_logging`` (the loop's entry point calls it). The
console reporter logs through it; its progress bar, on a terminal, has log lines written above it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .distributed.launch import rank_env
from .progress import human_seconds
from .run_summary import diagnostic_lines, group_rsum_text, retrieval_lines

log = logging.getLogger("fne_dist")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record arrives, not the object it was when
    the handler was made (pytest and tqdm replace it), so one handler serves the process."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass  # always the current sys.stdout


class _RankFilter(logging.Filter):
    """Sets ``record.rank``: the process group's rank once there is one, else the launcher's."""

    def filter(self, record: logging.LogRecord) -> bool:
        initialized = dist.is_available() and dist.is_initialized()
        record.rank = dist.get_rank() if initialized else rank_env().rank
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """One handler for the ``fne_dist`` loggers: ``[rank r] message`` on stdout (the summary
    and the progress lines stay on stdout, where launchers and Ray collect them). Idempotent:
    a second run in the same process reuses the handler."""
    log.setLevel(level)
    log.propagate = False  # not twice through a root handler someone else configured
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[rank %(rank)s] %(message)s"))
        log.addHandler(handler)


@dataclass
class Progress:
    """Cumulative counts of this rank at a log line (and once before the first step), all host
    values the loop already holds: reporting them adds no device sync."""

    opt_step: int
    micro_steps: int  # micro-batches this rank trained on (including before a resume)
    samples: int  # samples this rank trained on
    bad_samples: dict[str, int] = field(default_factory=dict)  # this process, by reason
    shard_errors: dict[str, int] = field(default_factory=dict)  # this process, by reason
    dropped: dict[str, int] = field(default_factory=dict)  # plan (global), cut_short (rank)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # train.profile_phases
    skipped_steps: int = 0  # optimizer steps the engine skipped (fp16 overflow)
    memory_fill: float = 0.0  # share of the momentum memory written


class Reporter:
    """The null reporter: accepts everything, does nothing."""

    def step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        """Cumulative counters, after each ``step`` and once before the first step."""

    def evaluation(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """Retrieval metrics of ``split`` after optimizer step ``step`` (every rank)."""

    def checkpoint_done(self, path: Path, step: int, seconds: float) -> None:
        """The checkpoint at ``path`` is complete (written, uploaded) after ``seconds``."""

    def message(self, text: str) -> None:
        pass

    def resumed(self, step: int) -> None:
        """The run continues after logged step ``step`` (0: from the start): what was reported
        for later steps by an earlier attempt will be reported again."""

    def finish(self, result: dict[str, Any]) -> None:
        """The run's final metrics (called on every rank; empty on ranks other than 0)."""

    def close(self) -> None:
        pass


def _number(value: float, spec: str) -> str:
    return "nan" if not math.isfinite(value) else format(value, spec)


def short_line(step: int, total: int, rate: float, eta_s: float, metrics: dict[str, float]) -> str:
    """The progress line a person watches: where the run is, its losses, lr, speed, time left
    and, once the FNE loss runs, the gate and the shares of candidates it treats as false
    negatives. Every other metric is in train_log.jsonl, Prometheus and TensorBoard."""
    get = metrics.get
    parts = [f"step {step}/{total}", f"epoch {int(get('epoch', 0))}"]
    loss = f"loss {_number(float(get('loss', float('nan'))), '.4f')}"
    if "loss_i2t" in metrics and "loss_t2i" in metrics:
        loss += (
            f" (i2t {_number(float(metrics['loss_i2t']), '.4f')}, "
            f"t2i {_number(float(metrics['loss_t2i']), '.4f')})"
        )
    parts.append(loss)
    if "lr" in metrics:
        parts.append(f"lr {float(metrics['lr']):.2e}" + (" warm-up" if get("warmup") else ""))
    parts.append(f"{rate:.0f} samples/s")
    parts.append(f"ETA {human_seconds(eta_s)}" if step < total else "done")
    if "gate_open" in metrics:
        fne = f"FNE gate {'open' if get('gate_open', 0) >= 0.5 else 'closed'}"
        if "frac_pfn_gt_eps" in metrics:
            fne += f", P_fn>eps {100 * float(metrics['frac_pfn_gt_eps']):.1f}%"
        if "frac_in_window" in metrics:
            fne += f", window {100 * float(metrics['frac_in_window']):.1f}%"
        parts.append(fne)
    if get("skipped_nonfinite"):
        parts.append(f"{int(metrics['skipped_nonfinite'])} non-finite steps skipped")
    return " | ".join(parts)


def full_line(step: int, total: int, rate: float, metrics: dict[str, float]) -> str:
    """Every logged metric as ``key=value`` (``report.console: full``, ``-v``)."""
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    return f"step {step}/{total} {rate:.0f} samples/s {shown}"


class ConsoleReporter(Reporter):
    """A progress bar with samples/s on a terminal; a progress line every ``every`` steps
    otherwise: the short line (``short_line``), or every metric when ``full``. Messages are
    log lines (written above the bar while there is one)."""

    def __init__(
        self, total_steps: int, samples_per_step: int, every: int = 50, full: bool = False
    ) -> None:
        self.total, self.samples_per_step, self.every = total_steps, samples_per_step, every
        self.full = full
        self.start = time.perf_counter()
        self.resumed_at = 0  # steps done before this process: not in its speed
        self.bar = None
        self.redirect = contextlib.ExitStack()
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
            self.redirect.enter_context(logging_redirect_tqdm(loggers=[log]))

    def step(self, step: int, metrics: dict[str, float]) -> None:
        elapsed = max(1e-9, time.perf_counter() - self.start)
        done = step + 1 - self.resumed_at  # steps this process ran
        rate = done * self.samples_per_step / elapsed
        eta_s = elapsed / max(1, done) * max(0, self.total - step - 1)
        if self.bar is not None:
            self.bar.update(step + 1 - self.bar.n)
            self.bar.set_postfix(
                loss=f"{metrics.get('loss', float('nan')):.4f}", samples_s=f"{rate:.0f}"
            )
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            if self.full:
                log.info(full_line(step + 1, self.total, rate, metrics))
            else:
                log.info(short_line(step + 1, self.total, rate, eta_s, metrics))

    def resumed(self, step: int) -> None:
        self.resumed_at = step

    def message(self, text: str) -> None:
        log.info(text)

    def close(self) -> None:
        self.redirect.close()
        if self.bar is not None:
            self.bar.close()


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) as None: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class JsonLinesReporter(Reporter):
    """One JSON object per logged step, appended to ``path`` (the run's metrics history).

    Every line is strict JSON (a non-finite value is written as null), and ``step`` only grows:
    on resume the lines of steps the run will redo are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # Open for the whole run (closed in close()), so no context manager.
        self.file = self.path.open("a")

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        # time: the samples/s curve of `python -m fne_dist.plot`
        line = {"step": step + 1, "time": round(time.time(), 3), **metrics}
        self.file.write(json.dumps(json_safe(line), allow_nan=False) + "\n")
        self.file.flush()

    def resumed(self, step: int) -> None:
        """Keep the lines up to ``step`` (a torn last line of a killed run goes too)."""
        self.file.close()
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("step"), int) and doc["step"] <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.path)  # atomic: a kill now leaves the old or the new file
        self.file = self.path.open("a")

    def close(self) -> None:
        self.file.close()


TENSORBOARD_MISSING = (
    'report.tensorboard=true needs the tensorboard package: pip install "fne_dist[tensorboard]"'
)


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardReporter(Reporter):
    """The logged step metrics as TensorBoard scalars under ``log_dir`` (rank 0's): one series
    per key of train_log.jsonl, indexed by the same step; each evaluation as ``val/<metric>``
    or ``test/<metric>``. A resume drops the events of the steps the run will redo, as the
    JSON log does."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def _open(self, purge_step: int | None = None) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # the optional extra

            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        return self.writer

    def resumed(self, step: int) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._open(purge_step=step + 1 if step > 0 else None)

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        writer = self._open()
        for key, value in metrics.items():
            if isinstance(value, int | float):  # bools too; a non-finite value stays NaN
                writer.add_scalar(key, float(value), global_step=step + 1)
        writer.flush()  # a dashboard shows each window as it comes, not at the end

    def evaluation(self, step: int, split: str, metrics: dict[str, float]) -> None:
        writer = self._open()
        for key, value in metrics.items():
            if isinstance(value, int | float):
                writer.add_scalar(f"{split}/{key}", float(value), global_step=step)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class FanOut(Reporter):
    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def resumed(self, step: int) -> None:
        for r in self.reporters:
            r.resumed(step)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        for r in self.reporters:
            r.step(step, metrics)

    def progress(self, progress: Progress) -> None:
        for r in self.reporters:
            r.progress(progress)

    def evaluation(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for r in self.reporters:
            r.evaluation(step, split, metrics)

    def checkpoint_done(self, path: Path, step: int, seconds: float) -> None:
        for r in self.reporters:
            r.checkpoint_done(path, step, seconds)

    def message(self, text: str) -> None:
        for r in self.reporters:
            r.message(text)

    def finish(self, result: dict[str, Any]) -> None:
        for r in self.reporters:
            r.finish(result)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


def format_summary(
    result: dict, run_dir: Path, vse_pp_memory: bool = True, plots: list[Path] | None = None
) -> str:
    """The printed summary: strict and group-aware retrieval (ties against the match), the
    last epoch's diagnostics of the loss in use (``result["loss"]``), wall time, pictures."""
    t, v, d = result["test"], result["val"], result["diagnostics"]
    lines = [
        "=" * 72,
        *retrieval_lines("test", t),
        f"val   rsum {v['rsum']:.1f}, " + group_rsum_text(v),
    ]
    if d:
        lines += diagnostic_lines(result["loss"], d, result["staleness"], vse_pp_memory)
    lines += [
        f"steps {result['steps']} on {result['world_size']} rank(s), wall time "
        f"{result['wall_time_s']:.1f} s, run directory {run_dir}",
    ]
    if plots:
        where = plots[0].parent
        lines.append(f"pictures in {where}: " + ", ".join(p.name for p in plots))
    lines += [
        "=" * 72,
    ]
    return "\n".join(lines)
