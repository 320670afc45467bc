"""The unit tier starts no process and no server: a test that does is marked ``system``.

Registered by ``tests/conftest.py``. While an unmarked test's fixtures are set up and while it
runs, every way of starting one of these raises ``StartsProcess`` with the line
``test <node id> starts <what>: mark it @pytest.mark.system``, and the test fails with that line
even if the code under test swallowed the exception.

What counts as starting one:
- a child process, by any route Python offers: ``subprocess`` (``run``, ``Popen``,
  ``check_output``; also ``os.popen``), ``multiprocessing`` and ``torch.multiprocessing``
  (``Process.start``, pools, ``spawn``, a DataLoader's worker processes), ``os.fork``,
  ``os.forkpty``, ``os.posix_spawn[p]`` and ``os.system``. Ray, the launchers, Slurm and
  Prometheus all start their daemons through one of these.
- a server: a socket put to listening from Python (``socket.listen``: ``http.server``,
  ``socketserver``, prometheus_client's ``start_http_server``, asyncio servers).

What does not count:
- threads, and torch.distributed groups inside the test's own process (ranks as threads, or
  world size 1). Their TCPStore and gloo connections are opened in C++ for the process's own
  collectives, bound to loopback, and they end with the test: nothing outlives it or serves
  another process.
- binding a socket without listening (``free_port`` asks the kernel for a free port so).
- fixture teardown: stopping a daemon (``scancel``, ``ray stop``) is not starting one, and a
  session fixture may be torn down after whichever test ran last.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing.process
import multiprocessing.util
import os
import socket
import subprocess
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

MARKER = "system"


class StartsProcess(RuntimeError):
    """An unmarked test started a process or a server."""


# The class itself, taken at import: a test may replace ``subprocess.Popen`` with a spy
# function, and the guard must still patch (and restore) the real class under it.
_POPEN = subprocess.Popen


def _targets() -> list[tuple[Any, str, str]]:
    """(owner, attribute, what it starts) for every patched entry point."""
    found = [
        (_POPEN, "_execute_child", "a process (subprocess)"),
        (multiprocessing.process.BaseProcess, "start", "a process (multiprocessing)"),
        # how multiprocessing starts its resource tracker and fork server
        (multiprocessing.util, "spawnv_passfds", "a process (multiprocessing)"),
        (socket.socket, "listen", "a server (a listening socket)"),
    ]
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            found.append((os, name, f"a process (os.{name})"))
    return found


@contextlib.contextmanager
def forbid_processes(nodeid: str) -> Iterator[list[str]]:
    """Within the block, starting a process or a server raises ``StartsProcess``; the lines
    raised are collected in the yielded list (so a swallowed one is still seen)."""
    seen: list[str] = []

    def refuse(what: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def refused(*args: Any, **kwargs: Any) -> Any:
            line = f"test {nodeid} starts {what}: mark it @pytest.mark.{MARKER}"
            seen.append(line)
            raise StartsProcess(line)

        return refused

    targets = _targets()
    # (owner, name, its own attribute or None when inherited, e.g. socket.socket.listen)
    saved = [(owner, name, vars(owner).get(name)) for owner, name, _ in targets]
    try:
        for owner, name, what in targets:
            setattr(owner, name, refuse(what, getattr(owner, name)))
        yield seen
    finally:
        for owner, name, own in saved:
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def _checked(item: pytest.Item) -> Generator[None, Any, Any]:
    """Run one phase of ``item`` under ``forbid_processes`` unless it is marked system."""
    if item.get_closest_marker(MARKER) is not None:
        return (yield)
    with forbid_processes(item.nodeid) as seen:
        try:
            result = yield
        except StartsProcess:
            raise
        except BaseException as err:
            if seen:  # the library turned our refusal into another error: say what happened
                raise StartsProcess(seen[0]) from err
            raise
    if seen:  # swallowed by the code under test
        raise StartsProcess(seen[0])
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _checked(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _checked(item))
