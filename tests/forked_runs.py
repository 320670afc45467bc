"""Training processes forked from one process that has imported torch, DeepSpeed and fne_dist
once (multiprocessing's fork server with those modules preloaded).

Why: a tiny DeepSpeed run spends most of its CPU on imports (torch, DeepSpeed, torch._dynamo
through AdamW and DeepSpeed's optimizer check, transformers): ~5 s of a ~6 s process on CI's
2 cores. A test that needs many separate runs (tests/test_elastic_resume.py: 18 ranks) pays
that once here instead of once per rank. Each run is still its own OS process with its own
environment (the launcher's variables), torch.distributed group, DeepSpeed engine, files and
exit status; it enters through ``fne_dist.train.main``, what ``python -m fne_dist.train`` runs.
The server imports only (no tensor work, no threads), so forking it is safe.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a DeepSpeed run of the tiny config imports beyond fne_dist.train: the loop, DeepSpeed,
# torch._dynamo (AdamW's constructor imports it), DeepSpeed's Muon module (its optimizer check
# imports it, and it calls torch.compile at import: torch._inductor) and the text tower's
# transformers. A name that does not import (another DeepSpeed) is skipped by the server.
PRELOAD = [
    "tests.forked_runs",
    "fne_dist.train",
    "fne_dist.loop",
    "fne_dist.engine",
    "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "torch._dynamo",
    "transformers",
]


def _run(argv: list[str], env: dict[str, str], log: str, cwd: str) -> None:
    """The forked child: the run's environment, working directory and log, then the entry
    point of ``python -m fne_dist.train``; exits with its status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    code: int = 1
    try:
        from fne_dist.train import main

        code = main(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        # what the interpreter's exit would run (multiprocessing's children end with os._exit)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class ForkedRun:
    """One forked run, with the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"forked run {self.process.pid}", timeout or 0)
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)


@contextlib.contextmanager
def fork_server(env: dict[str, str]) -> Iterator[Callable[[list[str], dict, Path], ForkedRun]]:
    """A fork server started with ``env`` (read at import by some libraries: OpenMP, Hugging
    Face's offline switches), stopped at the end; yields ``start(argv, env, log)``, which forks
    one run of ``fne_dist.train`` with that environment in the repository root, its output
    appended to ``log``."""
    ctx = multiprocessing.get_context("forkserver")
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        ctx.set_forkserver_preload(PRELOAD)
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    started: list[ForkedRun] = []

    def start(argv: list[str], run_env: dict, log: Path) -> ForkedRun:
        process = ctx.Process(target=_run, args=(argv, run_env, str(log), str(ROOT)))
        process.start()
        started.append(ForkedRun(process))
        return started[-1]

    try:
        yield start
    finally:
        for run in started:
            if run.poll() is None:
                run.kill()
        # the server holds the imported modules (~0.5 GB): not for the rest of the session
        multiprocessing.forkserver._forkserver._stop()
