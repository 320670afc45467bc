"""One real Prometheus per test session, and the Ray temp dir whose discovery file it watches.

``prometheus``: Debian's server on 127.0.0.1 with a free port, a temporary storage directory and
a config derived from cluster/prometheus/prometheus.yml (the same jobs, rule files and
discovery; only intervals of 1 s and the paths differ: ``targets/`` is a temporary directory),
stopped by its PID. Runs write their file-discovery JSON (monitor.targets_file) into
``targets``, as the cluster scripts do (FNE_PROM_TARGETS); the "ray" job reads
``targets/ray/*.json`` (where cluster/slurm/ray.sbatch copies its Ray head's discovery file) and
the discovery file of the Ray instance whose --temp-dir is ``ray_temp_root / "ray"`` (the Ray
head of tests/test_cluster_ray.py, in place of Ray's default /tmp/ray). Every request goes to
loopback; every polling loop is bounded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
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


def _templated(pattern: str, work: Path, ray_temp: Path) -> str:
    """A discovery path of the shipped config with this session's directories: relative
    paths (targets/..., relative to the config file) under ``work``, Ray's default temp dir
    /tmp/ray replaced by ``ray_temp``. Anything else is a path the shipped config must not
    have (the test would silently not watch it)."""
    if pattern.startswith("/tmp/ray/"):
        return str(ray_temp / pattern.removeprefix("/tmp/ray/"))
    assert not pattern.startswith("/"), f"prometheus.yml: unexpected absolute path {pattern}"
    return str(work / pattern)


def server_config(work: Path, port: int, ray_temp: Path) -> Path:
    """cluster/prometheus/prometheus.yml with 1 s intervals and this session's paths."""
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM / f) for f in cfg["rule_files"]]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    for job in ("fne", "ray"):
        for sd in jobs[job]["file_sd_configs"]:
            sd["files"] = [_templated(f, work, ray_temp) for f in sd["files"]]
            sd["refresh_interval"] = "1s"
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
    (work / "targets" / "ray").mkdir(parents=True)
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


def targets_of(server: Prometheus, job: str, where: Callable[[dict], bool]) -> list[dict]:
    """The active targets of scrape job ``job`` that ``where`` keeps (from /api/v1/targets)."""
    active = server.get("/api/v1/targets", state="active")["activeTargets"]
    return [t for t in active if t["labels"].get("job") == job and where(t)]


def wait_targets_up(
    server: Prometheus,
    job: str,
    where: Callable[[dict], bool],
    want: int,
    running: Callable[[], bool],
) -> list[dict]:
    """The job's kept targets once ``want`` of them are up, polled while ``running()`` (a run
    empties its discovery file when it ends: its targets exist only while it runs); the last
    seen list otherwise. Bounded by the run and by a deadline."""
    deadline = time.monotonic() + 4 * QUERY_S
    seen: list[dict] = []
    while time.monotonic() < deadline:
        seen = targets_of(server, job, where)
        if len(seen) >= want and all(t["health"] == "up" for t in seen):
            return seen
        if not running():
            break
        time.sleep(0.5)
    return seen


class TargetWatch(threading.Thread):
    """``wait_targets_up`` in a thread started as the job is submitted, so that the targets of
    a run are seen while it runs whichever test asks first (``seen``)."""

    def __init__(self, server: Prometheus, job: str, where: Callable[[dict], bool],
                 want: int, running: Callable[[], bool]) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.args_ = (server, job, where, want, running)
        self.result: list[dict] = []
        self.start()

    def run(self) -> None:
        self.result = wait_targets_up(*self.args_)

    def seen(self) -> list[dict]:
        self.join(timeout=5 * QUERY_S)
        return self.result


def target_lines(targets: list[dict]) -> list[str]:
    """One line per target, as /api/v1/targets shows it: labels, URL, health, last error."""
    keep = ("job", "run", "rank", "node", "instance")
    return [
        f"{ {k: t['labels'][k] for k in keep if k in t['labels']} } {t['scrapeUrl']} "
        f"health={t['health']} lastError={t['lastError']!r}"
        for t in sorted(targets, key=lambda t: (t["labels"].get("rank", ""), t["scrapeUrl"]))
    ]


def every_family(
    server: Prometheus, selector: str, ranks: set[str], upto: str | None = None
) -> list[str]:
    """Every fne_* name a CPU rank exports (the catalog's, GPU-only ones excepted; with
    ``upto``, those before that name) has a series from each of ``ranks`` under ``selector``;
    one line per name."""
    from fne_dist.monitoring.catalog import METRICS

    lines = []
    for m in METRICS:
        if m.gpu_only:
            continue
        if m.name == upto:
            break
        for name in m.exported:
            result = server.poll(recorded(f"{name}{{{selector}}}"), want=len(ranks))
            assert {s["metric"].get("rank") for s in result} == ranks, (name, result)
            lines.append(f"{name}: ranks {sorted(ranks)}")
    return lines
