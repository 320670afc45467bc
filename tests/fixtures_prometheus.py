"""One real Prometheus per test session, and the Ray temp dir whose discovery file it watches.

``prometheus``: Debian's server on 127.0.0.1 with a free port, a temporary storage directory and
a config derived from cluster/prometheus/prometheus.yml (the same jobs, rule files and
discovery; only intervals of 1 s and temporary paths differ), stopped by its PID. Runs write
their file-discovery JSON (monitor.targets_file) into ``targets``; the "ray" job reads the
discovery file of the Ray instance whose --temp-dir is ``ray_temp_root / "ray"`` (the Ray head
of tests/test_cluster_ray.py). Every request goes to loopback; every polling loop is bounded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fne_dist.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "cluster" / "prometheus"
PROMETHEUS = shutil.which("prometheus")
READY_S = 30.0  # the server answers /-/ready
QUERY_S = 60.0  # scraped samples and rule results become queryable (target sync takes ~5 s)


@dataclass
class Prometheus:
    url: str
    targets: Path  # file-discovery directory of the fne job
    ray_temp: Path  # --temp-dir of the Ray instance whose discovery file is the ray job's

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def poll(self, expr: str, want: int) -> list[dict]:
        """The result of ``expr`` once it has ``want`` series (or the last one at the
        deadline)."""
        deadline = time.monotonic() + QUERY_S
        while True:
            result = self.query(expr)
            if len(result) >= want or time.monotonic() > deadline:
                return result
            time.sleep(1.0)


def recorded(expr: str) -> str:
    """The newest value within the last 15 minutes: the run has ended and its series are
    stale by the time the assertions run."""
    return f"last_over_time({expr}[15m])"


def server_config(work: Path, port: int, ray_temp: Path) -> Path:
    """cluster/prometheus/prometheus.yml with 1 s intervals and this session's paths."""
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM / f) for f in cfg["rule_files"]]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    jobs["fne"]["file_sd_configs"] = [
        {"files": [str(work / "targets" / "*.json")], "refresh_interval": "1s"}
    ]
    ray_file = ray_temp / "prom_metrics_service_discovery.json"
    jobs["ray"]["file_sd_configs"] = [{"files": [str(ray_file)], "refresh_interval": "1s"}]
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def ray_temp_root() -> Iterator[Path]:
    """A short directory (Ray's socket paths must fit in 107 bytes) for the session's Ray head:
    its --temp-dir is ``<this>/ray``, where Prometheus looks for Ray's discovery file."""
    root = Path(tempfile.mkdtemp(prefix="fnp", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def prometheus(ray_temp_root: Path) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("prometheus (Debian package) not installed")
    work = Path(tempfile.mkdtemp(prefix="fne-prom-"))
    (work / "targets").mkdir()
    port = free_port()
    ray_temp = ray_temp_root / "ray"
    cmd = [
        PROMETHEUS,
        f"--config.file={server_config(work, port, ray_temp)}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", work / "targets", ray_temp)
    try:
        deadline = time.monotonic() + READY_S
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{server.url}/-/ready", timeout=2).close()
                break
            assert time.monotonic() < deadline, "prometheus not ready"
            time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
