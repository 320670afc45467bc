"""The check that keeps the unit tier free of processes and servers (tests/process_guard.py),
run by pytester on a made-up test file, in this process."""

from __future__ import annotations

import pytest

INNER = '''
import multiprocessing
import socket
import subprocess
import sys
import threading

import pytest


def layers(fn):
    """How many guards wrap ``fn`` (the outer test's own guard is one)."""
    n = 0
    while hasattr(fn, "__wrapped__"):
        fn, n = fn.__wrapped__, n + 1
    return n


def test_runs_a_command():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_swallows_the_refusal():
    try:
        subprocess.run(["true"], check=False)
    except Exception:
        pass


def _nothing():
    pass


def test_starts_a_worker_process():
    proc = multiprocessing.get_context("spawn").Process(target=_nothing)
    proc.start()
    proc.join()


def test_serves_on_a_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()


def test_forks():
    import os

    os.fork()


@pytest.fixture
def daemon():
    subprocess.Popen(["sleep", "1"])
    yield


def test_uses_a_daemon_fixture(daemon):
    pass


def test_binds_without_listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))


def test_uses_threads():
    thread = threading.Thread(target=_nothing)
    thread.start()
    thread.join()
    assert layers(subprocess.Popen._execute_child) == 2


@pytest.mark.system
def test_marked_system():
    assert layers(subprocess.Popen._execute_child) == 1
'''

REFUSED = {
    "test_runs_a_command": "a process (subprocess)",
    "test_swallows_the_refusal": "a process (subprocess)",
    "test_starts_a_worker_process": "a process (multiprocessing)",
    "test_serves_on_a_port": "a server (a listening socket)",
    "test_forks": "a process (os.fork)",
}


def test_an_unmarked_test_that_starts_a_process_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: a test without the ``system`` marker that starts a process (subprocess,
    multiprocessing, fork), a server (a listening socket), or uses a fixture that does, fails
    with one line naming the test and the marker, even when the code swallows the refusal;
    threads, a bound but not listening socket and marked tests are let through."""
    pytester.makepyfile(test_inner=INNER)
    # only the guard: an installed plugin may run a command of its own at start-up
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_inprocess("-p", "tests.process_guard", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=len(REFUSED), errors=1, passed=3)
    for name, what in REFUSED.items():
        result.stdout.fnmatch_lines(
            [
                f"*StartsProcess: test test_inner.py::{name} starts {what}: mark it "
                "@pytest.mark.system*"
            ]
        )
    result.stdout.fnmatch_lines(
        ["*test test_inner.py::test_uses_a_daemon_fixture starts a process (subprocess)*"]
    )


def test_the_guard_is_lifted_after_each_test() -> None:
    """Invariant: the patched entry points are restored as they were (an inherited one, like
    ``socket.socket.listen``, is removed again rather than pinned on the subclass)."""
    import socket
    import subprocess

    from tests.process_guard import StartsProcess, forbid_processes

    before = subprocess.Popen._execute_child, vars(socket.socket).get("listen")
    with (
        forbid_processes("t::x") as seen,
        socket.socket() as sock,
        pytest.raises(StartsProcess),
    ):
        sock.listen()
    assert seen == ["test t::x starts a server (a listening socket): mark it @pytest.mark.system"]
    assert (subprocess.Popen._execute_child, vars(socket.socket).get("listen")) == before


def test_markers_are_strict(pytestconfig: pytest.Config) -> None:
    """Invariant: a misspelt marker (``@pytest.mark.sytem``) is an error, not an unmarked test
    that ``-m "not system"`` would run."""
    assert pytestconfig.getoption("strict_markers")
