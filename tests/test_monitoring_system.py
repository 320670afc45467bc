"""A real Prometheus scrapes a real 2-rank torchrun run of the tiny config.

The session's Prometheus (tests/fixtures_prometheus.py) finds the run through the file-discovery
JSON the run writes (monitor.targets_file). The Ray path (Ray's metrics agent and discovery
file) is tested on the session's Ray head in tests/test_cluster_ray.py. Every request goes to
loopback; every polling loop is bounded in time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fne_dist.distributed.launch import free_port
from fne_dist.monitoring.catalog import METRICS
from tests.fixtures_prometheus import PROMETHEUS, QUERY_S, Prometheus, recorded
from tests.launch_helpers import Run, Sandbox, launch, reap, sandbox_env

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "cluster" / "prometheus"
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
        sandbox_env(ray_tmp, marker), tmp_path_factory.mktemp("monitor"), ray_tmp, marker
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
        reap(marker, grace_s=5.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)


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
            result = prometheus.poll(recorded(f'{name}{{run="{RUN}"}}'), want=2)
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
        result = prometheus.poll(recorded(f'{rule["record"]}{{run="{RUN}"}}'), want=1)
        assert len(result) == 1, (rule["record"], result)
        lines.append(f"{rule['record']}: {result[0]['value'][1]}")
    rate = prometheus.query(recorded(f'run:fne_samples:rate1m{{run="{RUN}"}}'))
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
        if panel["type"] == "row" or panel["description"].startswith("GPU only"):
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
