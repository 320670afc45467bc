"""A real Prometheus scrapes a real 2-rank torchrun run of the tiny config.

One Prometheus per test session (``prometheus`` fixture): Debian's server on 127.0.0.1 with a
free port, a temporary storage directory and a config derived from
cluster/prometheus/prometheus.yml (the same jobs, rule files and discovery; only intervals of
1 s and temporary paths differ), stopped by its PID. The run writes its file-discovery JSON
(monitor.targets_file) where that config looks for targets. Every request goes to loopback;
every polling loop is bounded in time.
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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fne_dist.distributed.launch import free_port
from fne_dist.monitoring.catalog import METRICS
from tests.test_launchers import Run, Sandbox, _reap, _sandbox_env, launch

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "cluster" / "prometheus"
PROMETHEUS = shutil.which("prometheus")
READY_S = 30.0  # the server answers /-/ready
QUERY_S = 60.0  # scraped samples and rule results become queryable (target sync takes ~5 s)
RUN = "tiny"  # run.name of tests/configs/tiny.yaml: the series' run label
RUN_ARGS = (
    "train.epochs=0.5",  # 91 steps at world size 2: ~15 s of scrapes at 1 s
    "train.log_every=2",
    "train.eval_every=40",
    "train.profile_phases=true",
    "debug.nan_at_step=80",  # well after the first scrape saw the counter at 0
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus (Debian package) not installed"),
]


@dataclass
class Prometheus:
    url: str
    targets: Path  # file-discovery directory of the fne job
    ray_tmp: Path  # RAY_TMPDIR of the Ray run: its discovery file is the ray job's

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]


def server_config(work: Path, port: int, ray_tmp: Path) -> Path:
    """cluster/prometheus/prometheus.yml with 1 s intervals and this session's paths."""
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM / f) for f in cfg["rule_files"]]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    jobs["fne"]["file_sd_configs"] = [
        {"files": [str(work / "targets" / "*.json")], "refresh_interval": "1s"}
    ]
    ray_file = ray_tmp / "ray" / "prom_metrics_service_discovery.json"
    jobs["ray"]["file_sd_configs"] = [{"files": [str(ray_file)], "refresh_interval": "1s"}]
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def prometheus() -> Iterator[Prometheus]:
    work = Path(tempfile.mkdtemp(prefix="fne-prom-"))
    (work / "targets").mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="fnp", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    cmd = [
        PROMETHEUS,
        f"--config.file={server_config(work, port, ray_tmp)}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", work / "targets", ray_tmp)
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
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def torchrun_run(
    prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Run, float]]:
    """2 ranks under torchrun, 91 steps logged every 2, phases timed, a NaN loss reported at
    micro step 80, /metrics on free loopback ports; Prometheus finds them via the run's
    discovery file."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="fnm", dir="/tmp"))
    marker = uuid.uuid4().hex
    sandbox = Sandbox(
        _sandbox_env(ray_tmp, marker), tmp_path_factory.mktemp("monitor"), ray_tmp, marker
    )
    extra = [
        *RUN_ARGS,
        "monitor.linger_s=4",  # the final evaluation's values get scraped
        f"monitor.port={free_port()}",
        f"monitor.targets_file={prometheus.targets / 'tiny.json'}",
    ]
    t0 = time.monotonic()
    run = launch(sandbox, "torchrun", 2, *extra)
    try:
        yield run, time.monotonic() - t0
    finally:
        _reap(marker, grace_s=5.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_run(
    prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Run, float]]:
    """The same run, 46 steps, with 2 Ray Train workers (Ray started by the driver under the
    RAY_TMPDIR whose discovery file Prometheus watches; workers report every second)."""
    marker = uuid.uuid4().hex
    env = {**_sandbox_env(prometheus.ray_tmp, marker), "RAY_metrics_report_interval_ms": "1000"}
    sandbox = Sandbox(env, tmp_path_factory.mktemp("monitor-ray"), prometheus.ray_tmp, marker)
    t0 = time.monotonic()
    # half the steps (Ray's start-up and workers cost more on 2 cores); a longer limit
    run = launch(sandbox, "ray", 2, *RUN_ARGS, "train.epochs=0.25", timeout_s=420.0)
    try:
        yield run, time.monotonic() - t0
    finally:
        _reap(marker, grace_s=5.0)


def poll(prometheus: Prometheus, expr: str, want: int) -> list[dict]:
    """The result of ``expr`` once it has ``want`` series (or the last one at the deadline)."""
    deadline = time.monotonic() + QUERY_S
    while True:
        result = prometheus.query(expr)
        if len(result) >= want or time.monotonic() > deadline:
            return result
        time.sleep(1.0)


def recorded(expr: str) -> str:
    """The newest value within the last 15 minutes: the run has ended and its series are
    stale by the time the assertions run."""
    return f"last_over_time({expr}[15m])"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prometheus_scrapes_every_series_of_both_ranks(
    torchrun_run: tuple[Run, float], prometheus: Prometheus
) -> None:
    """Invariant: every fne_* series a CPU rank exports reaches a real Prometheus from both
    ranks of a 2-rank torchrun run, labelled run/rank/node (node 0: one machine), job and
    instance being Prometheus's own (no exported_* clash); the counters counted real work
    (both ranks trained on samples) and the discovery file is empty after the run."""
    run, seconds = torchrun_run
    assert run.returncode == 0, run.tail()
    lines = [f"torchrun 2-rank run: {seconds:.1f} s"]
    for m in METRICS:
        if m.gpu_only:
            continue
        for name in m.exported:
            result = poll(prometheus, recorded(f'{name}{{run="{RUN}"}}'), want=2)
            ranks = {s["metric"].get("rank") for s in result}
            assert ranks == {"0", "1"}, (name, result)
            for series in result:
                labels = series["metric"]
                assert labels["node"] == "0" and labels["job"] == "fne", labels
                assert not any(k.startswith("exported_") for k in labels), labels
            sample = min(result, key=lambda s: s["metric"]["rank"])
            lines.append(f"{name}: {len(result)} series, rank 0 e.g. {sample['value'][1]}")
    samples = prometheus.query(recorded(f'fne_samples_total{{run="{RUN}"}}'))
    assert all(float(s["value"][1]) > 0 for s in samples), samples
    assert json.loads((prometheus.targets / "tiny.json").read_text()) == []
    print("\n".join(lines))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_recording_rule_returns_data(
    torchrun_run: tuple[Run, float], prometheus: Prometheus
) -> None:
    """Invariant: each per-run recording rule (samples/s, collective share, FN share, bad
    sample fraction) has a value for the run, and samples/s is positive."""
    run, _ = torchrun_run
    assert run.returncode == 0, run.tail()
    groups = yaml.safe_load((PROM / "rules" / "fne_recording.yml").read_text())["groups"]
    lines = []
    for rule in (r for g in groups for r in g["rules"]):
        result = poll(prometheus, recorded(f'{rule["record"]}{{run="{RUN}"}}'), want=1)
        assert len(result) == 1, (rule["record"], result)
        lines.append(f"{rule['record']}: {result[0]['value'][1]}")
    rate = prometheus.query(recorded(f'fne:samples_per_second:run{{run="{RUN}"}}'))
    assert float(rate[0]["value"][1]) > 0
    print("\n".join(lines))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nan_at_step_fires_the_non_finite_loss_alert(
    torchrun_run: tuple[Run, float], prometheus: Prometheus
) -> None:
    """Invariant: with debug.nan_at_step, the FneNonFiniteLoss alert of the real Prometheus
    becomes pending or firing for the run's ranks (the reported loss was NaN; the run itself
    finished)."""
    run, _ = torchrun_run
    assert run.returncode == 0, run.tail()
    deadline = time.monotonic() + QUERY_S
    while True:
        alerts = [
            a
            for a in prometheus.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == "FneNonFiniteLoss" and a["labels"].get("run") == RUN
        ]
        if alerts or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert alerts, prometheus.get("/api/v1/rules")
    assert {a["state"] for a in alerts} <= {"pending", "firing"}
    print("\n".join(f"{a['labels']} {a['state']} value={a['value']}" for a in alerts))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_dashboard_query_returns_data(
    torchrun_run: tuple[Run, float], prometheus: Prometheus
) -> None:
    """Invariant: with run = the run and rank = all, every query of every dashboard panel
    returns at least one series over the run's time range (panels only a GPU feeds are
    exempt on a CPU run), and the run/rank variables list the run and both ranks."""
    run, seconds = torchrun_run
    assert run.returncode == 0, run.tail()
    assert RUN in prometheus.get("/api/v1/label/run/values", **{"match[]": "fne_run_info"})
    ranks = prometheus.get(
        "/api/v1/label/rank/values", **{"match[]": f'fne_run_info{{run="{RUN}"}}'}
    )
    assert set(ranks) == {"0", "1"}
    board = json.loads((ROOT / "cluster" / "grafana" / "fne_dashboard.json").read_text())
    end = time.time()
    lines = []
    for panel in board["panels"]:
        if panel["description"].startswith("GPU only"):
            continue
        for target in panel["targets"]:
            expr = target["expr"].replace("$run", RUN).replace("$rank", ".*")
            expr = expr.replace("$__rate_interval", "1m")
            result = prometheus.get(
                "/api/v1/query_range",
                query=expr,
                start=str(end - seconds - 120),
                end=str(end),
                step="2",
            )["result"]
            assert result, (panel["title"], expr)
            lines.append(f"{panel['title']} [{target['refId']}]: {len(result)} series")
    print("\n".join(lines))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_run_arrives_under_the_same_names(
    ray_run: tuple[Run, float], prometheus: Prometheus
) -> None:
    """Invariant: a 2-worker Ray Train run's metrics reach Prometheus through Ray's metrics
    agent and its discovery file (job="ray", no port of ours), recorded under the fne_* names
    for both ranks, and the per-run recording rules return data for it."""
    run, seconds = ray_run
    assert run.returncode == 0, run.tail()
    info = poll(prometheus, recorded('fne_run_info{job="ray"}'), want=2)
    assert {s["metric"]["rank"] for s in info} == {"0", "1"}, info
    assert {s["metric"]["launcher"] for s in info} == {"ray"}
    ray_run_label = info[0]["metric"]["run"]
    lines = [f"Ray 2-worker run: {seconds:.1f} s, run label {ray_run_label}"]
    for name in ("fne_samples_total", "fne_loss", "fne_fn_share", "fne_phase_seconds_total"):
        result = poll(prometheus, recorded(f'{name}{{job="ray", run="{ray_run_label}"}}'), want=2)
        assert {s["metric"]["rank"] for s in result} == {"0", "1"}, (name, result)
        lines.append(f"{name}: {len(result)} series")
    groups = yaml.safe_load((PROM / "rules" / "fne_recording.yml").read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        expr = recorded(f'{rule["record"]}{{run="{ray_run_label}"}}')
        result = poll(prometheus, expr, want=1)
        assert len(result) == 1, (rule["record"], result)
        lines.append(f"{rule['record']}: {result[0]['value'][1]}")
    print("\n".join(lines))
