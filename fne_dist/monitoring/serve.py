"""Each rank's /metrics server and the run's Prometheus file-discovery JSON."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist_ops
from ..config import ConfigError

log = logging.getLogger("fne_dist")
PORT_TRIES = 100  # a busy port moves up at most this far
LAST_PORT = 65_535


def ports_to_try(port: int) -> range:
    """``port`` and the ports above it that a busy ``port`` may move to (never past 65535)."""
    return range(port, min(port + PORT_TRIES, LAST_PORT + 1))


def _no_free_port(host: str, port: int) -> str:
    tried = ports_to_try(port)
    if not tried:
        return (
            f"monitor.port: port {port} (monitor.port + local rank) is above {LAST_PORT}: "
            "pick a lower monitor.port"
        )
    span = f"port {port} is" if len(tried) == 1 else f"ports {port}..{tried[-1]} are all"
    return f"monitor.port: {span} busy on {host} (ports end at {LAST_PORT}): pick another"


def _bind_problem(host: str, port: int, err: OSError) -> str:
    """One line saying why ``host:port`` cannot be listened on, naming the setting at fault."""
    why = err.strerror or str(err)
    if isinstance(err, socket.gaierror):
        return f"monitor.host={host}: not an IPv4 address or a known host name ({why})"
    if err.errno == errno.EADDRNOTAVAIL:
        return f"monitor.host={host} is not an address of this machine ({why})"
    if err.errno == errno.EACCES:
        return f"monitor.port: not allowed to listen on {host}:{port} ({why})"
    return f"monitor.host/monitor.port: cannot listen on {host}:{port} ({why})"


def check_endpoint(host: str, port: int, local_ranks: int) -> None:
    """Before the run starts: ``host`` is an IPv4 address of this machine and the local ranks'
    ports (``port`` + local rank) stay below 65536; one-line ``ConfigError`` otherwise. A busy
    port is found when the server starts (it moves up; a port free now may be taken by then)."""
    if not ports_to_try(port + local_ranks - 1):
        raise ConfigError(_no_free_port(host, port + local_ranks - 1))
    try:
        address = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))  # any free port: only the address is checked
    except OSError as err:
        raise ConfigError(_bind_problem(host, port, err)) from None


def serve_metrics(registry: Any, host: str, port: int) -> tuple[Any, int]:
    """Serve ``registry`` on ``host:port``, or the next free port above it (logged).
    Returns (server, port); the server's thread is a daemon, ``server.shutdown()`` stops it.
    No free port, or an address that cannot be listened on, is a one-line ``ConfigError``."""
    from prometheus_client import start_http_server

    for candidate in ports_to_try(port):
        try:
            server, _thread = start_http_server(candidate, addr=host, registry=registry)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise ConfigError(_bind_problem(host, candidate, err)) from None
            continue
        if candidate != port:
            log.info("metrics port %d was busy: serving /metrics on %s:%d", port, host, candidate)
        return server, candidate
    raise ConfigError(_no_free_port(host, port))


def advertised_address(host: str) -> str:
    """The IPv4 address Prometheus should scrape: the bind address, or for a wildcard bind
    (0.0.0.0) this node's own address."""
    if host in ("", "0.0.0.0"):
        return socket.gethostbyname(socket.gethostname())
    return socket.gethostbyname(host)


def gather_targets(address: str, port: int, node: int, device: torch.device) -> list[dict]:
    """Every rank's (address, port, node), in rank order (a collective: every rank calls it,
    once, at set-up; the ints travel as one small tensor on the process group's device)."""
    octets = [int(x) for x in address.split(".")]
    mine = torch.tensor([[*octets, port, node]], dtype=torch.long, device=device)
    rows = dist_ops.all_gather_no_grad(mine).cpu().tolist()
    return [
        {"address": ".".join(map(str, r[:4])), "port": r[4], "node": r[5], "rank": rank}
        for rank, r in enumerate(rows)
    ]


def write_targets(path: Path, run: str, targets: list[dict]) -> None:
    """Prometheus file_sd JSON: one group per rank, labelled like its series. Written to a
    temporary name and renamed, so Prometheus never reads half a file."""
    groups = [
        {
            "targets": [f"{t['address']}:{t['port']}"],
            "labels": {"run": run, "rank": str(t["rank"]), "node": str(t["node"])},
        }
        for t in targets
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(groups, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # a failed write leaves no stray temporary file
            tmp.unlink(missing_ok=True)
        raise
