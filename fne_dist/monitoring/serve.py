"""Each rank's /metrics server and the run's Prometheus file-discovery JSON."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist_ops

log = logging.getLogger("fne_dist")
PORT_TRIES = 100  # a busy port moves up at most this far


def serve_metrics(registry: Any, host: str, port: int) -> tuple[Any, int]:
    """Serve ``registry`` on ``host:port``, or the next free port above it (logged).
    Returns (server, port); the server's thread is a daemon, ``server.shutdown()`` stops it."""
    from prometheus_client import start_http_server

    for candidate in range(port, min(port + PORT_TRIES, 65536)):
        try:
            server, _thread = start_http_server(candidate, addr=host, registry=registry)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            continue
        if candidate != port:
            log.info("metrics port %d was busy: serving /metrics on %s:%d", port, host, candidate)
        return server, candidate
    raise OSError(f"monitor.port: no free port in {port}..{port + PORT_TRIES - 1} on {host}")


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
    tmp.write_text(json.dumps(groups, indent=1) + "\n")
    os.replace(tmp, path)
