"""The metrics reporter, its /metrics server and discovery file, the Prometheus rules.

Fast tests (no training run): the series a rank exports before its first step, what each
reporter call changes, a busy port, the file-discovery JSON, the generated Ray-name rules, the
path each launcher takes, and promtool's checks and alert unit tests (skipped only where
promtool is absent; CI installs Debian's prometheus through .ci/apt-packages.txt).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fne_dist.config import load_config
from fne_dist.data.decode import REASONS
from fne_dist.monitoring import launcher_name, mode, node_rank
from fne_dist.monitoring.catalog import METRICS, initial_label_values
from fne_dist.monitoring.metrics_reporter import MetricsReporter
from fne_dist.monitoring.rules import render
from fne_dist.monitoring.serve import gather_targets, serve_metrics, write_targets
from fne_dist.monitoring.sinks import PromSink
from fne_dist.reporters import Progress

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "cluster" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian prometheus) absent")

INFO = {"version": "0.1.0", "config_hash": "abc", "launcher": "torchrun", "world_size": "2"}
LIMITS = {
    "stall_after_s": 600.0,
    "max_bad_fraction": 0.05,
    "checkpoint_max_age_s": 0.0,
    "checkpoint_every_steps": 10.0,
}


def scrape(sink: PromSink) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(series name, sorted labels): value} of everything the registry exposes."""
    text = generate_latest(sink.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def value(series: dict, name: str, **labels: str) -> float:
    want = {"run": "r", "rank": "1", "node": "0", **labels}
    return series[(name, tuple(sorted(want.items())))]


def make_reporter() -> tuple[MetricsReporter, PromSink]:
    sink = PromSink({"run": "r", "rank": "1", "node": "0"})
    return MetricsReporter(sink, INFO, LIMITS, REASONS), sink


def test_every_series_exists_before_the_first_step() -> None:
    """Invariant: right after construction (before any step) every catalog series a CPU rank
    exports is exposed, with exactly run/rank/node plus its declared labels (never job or
    instance), counters at 0, and fne_run_info carrying version, config hash, launcher and
    world size; every name starts with fne_."""
    _, sink = make_reporter()
    series = scrape(sink)
    exposed = {name for name, _ in series}
    for m in METRICS:
        assert m.name.startswith("fne_"), m.name
        assert not {"job", "instance"} & set(m.labels), m.name
        if m.gpu_only:
            assert not set(m.exported) & exposed, f"{m.name} exported on the CPU"
            continue
        for labels in initial_label_values(m, REASONS):
            for name in m.exported:
                if name.endswith("_bucket"):
                    continue
                info = m.name == "fne_run_info"
                extra = INFO if info else dict(zip(m.labels, labels, strict=True))
                got = value(series, name, **extra)
                zero = m.kind == "counter" or name.endswith(("_count", "_sum"))
                if zero and m.name != "fne_process_cpu_seconds":  # CPU time so far
                    assert got == 0.0, (name, labels, got)
    for (_, labels), _v in series.items():
        assert {"run", "rank", "node"} <= {k for k, _ in labels}
        assert not {"job", "instance"} & {k for k, _ in labels}


def test_reporter_calls_set_the_series() -> None:
    """Invariant: a log window's loss terms, lr and FNE internals land on their series; a NaN
    loss counts once in fne_nonfinite_loss_total; counters grow by exactly the progress
    deltas after the baseline (a resumed run's earlier counts are not new work); evaluations
    and a checkpoint set their gauges."""
    reporter, sink = make_reporter()
    base = Progress(opt_step=5, micro_steps=5, samples=40, bad_samples={}, dropped={"plan": 3})
    reporter.progress(base)  # the baseline: nothing counted
    reporter.step(9, {"loss": 0.5, "loss_i2t": 0.2, "loss_t2i": 0.3, "lr": 1e-3, "n_pos": 7})
    reporter.progress(
        Progress(
            opt_step=10,
            micro_steps=10,
            samples=80,
            bad_samples={"corrupt_image": 2},
            dropped={"plan": 3, "cut_short": 8},
            phase_seconds={"gather": 0.25, "data": 1.0},
            memory_fill=0.5,
        )
    )
    reporter.step(14, {"loss": math.nan, "frac_pfn_gt_eps": 0.125, "mu_pos": 0.7})
    reporter.evaluation(10, "val", {"i2t_r1": 12.5, "t2i_r10": 50.0, "rsum": 180.0})
    s = scrape(sink)
    assert math.isnan(value(s, "fne_loss", direction="total"))  # the newest window
    assert value(s, "fne_loss", direction="i2t") == 0.2
    assert value(s, "fne_learning_rate") == 1e-3 and value(s, "fne_positives") == 7
    assert value(s, "fne_fn_share") == 0.125 and value(s, "fne_gaussian_mean", side="pos") == 0.7
    assert value(s, "fne_nonfinite_loss_total") == 1.0
    assert value(s, "fne_samples_total") == 40.0 and value(s, "fne_micro_steps_total") == 5.0
    assert value(s, "fne_bad_samples_total", reason="corrupt_image") == 2.0
    assert value(s, "fne_bad_samples_total", reason="bad_utf8") == 0.0
    assert value(s, "fne_dropped_samples_total", cause="plan") == 0.0  # unchanged since base
    assert value(s, "fne_dropped_samples_total", cause="cut_short") == 8.0
    assert value(s, "fne_phase_seconds_total", phase="gather") == 0.25
    assert value(s, "fne_memory_fill") == 0.5 and value(s, "fne_optimizer_step") == 10
    assert value(s, "fne_step_seconds_count") == 1.0
    assert value(s, "fne_eval_recall", split="val", direction="i2t", k="1") == 12.5
    assert value(s, "fne_eval_rsum", split="val") == 180.0
    assert math.isnan(value(s, "fne_eval_rsum", split="test"))
    # twice every_steps (10) × the median step time: finite once a step was timed
    assert math.isfinite(value(s, "fne_checkpoint_max_age_seconds"))


def test_checkpoint_done_sets_size_and_age(tmp_path: Path) -> None:
    """Invariant: a finished checkpoint counts once, with its directory's byte size, duration
    and a newer timestamp than the run start."""
    reporter, sink = make_reporter()
    before = value(scrape(sink), "fne_checkpoint_timestamp_seconds")
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 23)
    reporter.checkpoint_done(tmp_path, 3, 1.5)
    s = scrape(sink)
    assert value(s, "fne_checkpoints_total") == 1.0
    assert value(s, "fne_checkpoint_bytes") == 123.0
    assert value(s, "fne_checkpoint_seconds") == 1.5
    assert value(s, "fne_checkpoint_timestamp_seconds") >= before


@pytest.mark.system
@pytest.mark.timeout(30)
def test_busy_port_moves_to_the_next_free_one(caplog: pytest.LogCaptureFixture) -> None:
    """Invariant: when monitor.port is taken, the rank serves on a higher free port, says so
    in the log, and that port answers /metrics with the rank's series."""
    _, sink = make_reporter()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.INFO, logger="fne_dist"):
            server, got = serve_metrics(sink.registry, "127.0.0.1", port)
        try:
            assert got > port
            assert f"metrics port {port} was busy" in caplog.text
            with urllib.request.urlopen(f"http://127.0.0.1:{got}/metrics", timeout=10) as r:
                body = r.read().decode()
            assert 'fne_samples_total{node="0",rank="1",run="r"} 0.0' in body
        finally:
            server.shutdown()
            server.server_close()


def test_discovery_file_lists_every_rank(tmp_path: Path) -> None:
    """Invariant: the file-discovery JSON has one target group per rank, labelled with the
    run, rank and node its series carry (world size 1: the gather is the identity)."""
    targets = gather_targets("127.0.0.1", 9400, 0, torch.device("cpu"))
    assert targets == [{"address": "127.0.0.1", "port": 9400, "node": 0, "rank": 0}]
    targets.append({"address": "127.0.0.2", "port": 9401, "node": 1, "rank": 1})
    path = tmp_path / "d" / "targets.json"
    write_targets(path, "r", targets)
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:9400"], "labels": {"run": "r", "rank": "0", "node": "0"}},
        {"targets": ["127.0.0.2:9401"], "labels": {"run": "r", "rank": "1", "node": "1"}},
    ]
    assert not list(path.parent.glob(".*.tmp"))


def test_ray_name_rules_are_current_and_cover_the_catalog() -> None:
    """Invariant: the committed Ray-name rules equal what the catalog generates, and every
    exported fne_* series name is recorded from its ray_ twin (a gauge's through the rule that
    turns the Ray sink's NaN stand-in back into NaN)."""
    committed = (PROM / "rules" / "fne_ray_names.yml").read_text()
    assert committed == render(), "regenerate: python -m fne_dist.monitoring.rules"
    rules = yaml.safe_load(committed)["groups"][0]["rules"]
    recorded = {r["record"]: r["expr"] for r in rules}
    for m in METRICS:
        for name in m.exported:
            if m.kind == "gauge":
                assert recorded[name].startswith(f"ray_{name} / (ray_{name} != bool "), name
            else:
                assert recorded[name] == f"ray_{name}"


@pytest.mark.system
@needs_promtool
@pytest.mark.timeout(120)
def test_ray_name_rules_give_back_what_the_ray_sink_was_given(tmp_path: Path) -> None:
    """Invariant: a gauge value the Ray sink sends (``ray_value``: NaN as a finite stand-in,
    since Ray's agent drops NaN) comes out of the ray-name rules as the value the reporter
    set: NaN as NaN, a finite value unchanged; a counter unchanged (promtool on the
    committed rules)."""
    from fne_dist.monitoring.sinks import ray_value

    rules = PROM / "rules" / "fne_ray_names.yml"
    series = {"0": ray_value(float("nan")), "1": ray_value(0.07), "2": ray_value(-3.5)}
    inputs = [
        {"series": f'ray_fne_temperature{{run="r",rank="{rank}",node="0"}}', "values": repr(v)}
        for rank, v in series.items()
    ] + [{"series": 'ray_fne_samples_total{run="r",rank="0",node="0"}', "values": "0 40"}]
    expect = [  # NaN != NaN keeps only the NaN sample; x == x every other one, unchanged
        ("count(fne_temperature != fne_temperature) by (rank)", [({"rank": "0"}, 1)]),
        ("fne_temperature == fne_temperature", [({"rank": "1"}, 0.07), ({"rank": "2"}, -3.5)]),
        ("fne_samples_total", [({"rank": "0"}, 40)]),
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": inputs,
            "promql_expr_test": [
                {
                    "expr": expr,
                    "eval_time": "1m",
                    "exp_samples": [
                        {"labels": _labels(name_of(expr), labels), "value": value}
                        for labels, value in samples
                    ],
                }
                for expr, samples in expect
            ],
        }
    ]
    case = tmp_path / "ray_names_test.yml"
    case.write_text(yaml.safe_dump({"rule_files": [str(rules)], "tests": tests}))
    out = promtool("test", "rules", str(case))
    assert out.returncode == 0, out.stdout + out.stderr


def name_of(expr: str) -> str | None:
    """The metric name a promql_expr_test result keeps (comparisons with == keep it)."""
    return None if expr.startswith("count") else expr.split()[0]


def _labels(name: str | None, labels: dict[str, str]) -> str:
    full = {} if name is None else {"run": "r", **labels, "node": "0"}
    inner = ",".join(f'{k}="{v}"' for k, v in (full or labels).items())
    return f"{name or ''}{{{inner}}}"


def test_launcher_mode_and_node_rank() -> None:
    """Invariant: monitoring is on by default for in-place launchers (a /metrics server),
    goes through Ray under Ray Train, is off for a plain process unless forced, and off when
    disabled; the node label is the launcher's node rank, else rank // local world size."""
    cfg = load_config()
    assert mode(cfg, "local") == "off" and mode(cfg, "torchrun") == "http"
    assert mode(cfg, "srun") == "http" and mode(cfg, "ray") == "ray"
    assert mode(load_config(None, ["monitor.prometheus=always"]), "local") == "http"
    assert mode(load_config(None, ["monitor.prometheus=never"]), "torchrun") == "off"
    assert launcher_name({}) == "local"
    assert launcher_name({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}) == "torchrun"
    assert launcher_name({"RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no"}) == (
        "accelerate"
    )
    assert launcher_name({"RANK": "0", "WORLD_SIZE": "2"}) == "deepspeed"
    step = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}
    assert launcher_name(step) == "srun"
    # an sbatch script's own shell is one process, not rank 1 of an srun step
    assert launcher_name({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == "local"
    assert node_rank({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_NODEID": "1"}) == 1
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert node_rank(env) == 1 and node_rank({**env, "GROUP_RANK": "0"}) == 0


# ---- promtool ------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.system
@needs_promtool
@pytest.mark.timeout(120)
def test_promtool_accepts_config_and_rules() -> None:
    """Invariant: promtool accepts prometheus.yml (with its rule files) and every rule file."""
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    rules = sorted(str(p.relative_to(PROM)) for p in (PROM / "rules").glob("*.yml"))
    out = promtool("check", "rules", *rules)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.system
@needs_promtool
@pytest.mark.timeout(120)
def test_promtool_alert_unit_tests_cover_every_alert() -> None:
    """Invariant: `promtool test rules` passes, and each alert in fne_alerts.yml has a case
    where it must stay silent and one where it must fire."""
    out = promtool("test", "rules", "tests/alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {
        r["alert"]
        for g in yaml.safe_load((PROM / "rules" / "fne_alerts.yml").read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    cases = [
        c
        for t in yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
        for c in t["alert_rule_test"]
    ]
    for alert in alerts:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no silent case"
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no firing case"


# ---- Grafana dashboard -----------------------------------------------------------------------

GRAFANA = ROOT / "cluster" / "grafana"


def dashboard_queries() -> list[tuple[str, str, bool]]:
    """(panel title, PromQL expression, GPU only) of every panel target."""
    board = json.loads((GRAFANA / "fne_dashboard.json").read_text())
    return [
        (p["title"], t["expr"], p["description"].startswith("GPU only"))
        for p in board["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def test_dashboard_rows_and_a_unit_per_series() -> None:
    """Invariant: the dashboard is laid out in rows (throughput, FNE, data, checkpoints, system
    among them, each with panels under it), and every query of every panel has its own unit
    override on its refId, so a panel mixing seconds, bytes and counts labels each in its
    own unit (no bytes scaled into "MB" under a seconds axis, no hours under a share)."""
    board = json.loads((GRAFANA / "fne_dashboard.json").read_text())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert {"Throughput", "FNE", "Data", "Checkpoints", "System"} <= set(rows), rows
    assert board["panels"][0]["type"] == "row"
    kinds = [p["type"] for p in board["panels"]]
    assert all(a != "row" or b != "row" for a, b in itertools.pairwise(kinds)), "an empty row"
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        units = {
            o["matcher"]["options"]: [q["value"] for q in o["properties"] if q["id"] == "unit"]
            for o in p["fieldConfig"]["overrides"]
            if o["matcher"]["id"] == "byFrameRefID"
        }
        for t in p["targets"]:
            assert len(units.get(t["refId"], [])) == 1, (p["title"], t["refId"], units)
            assert "/ 1e6" not in t["expr"] and "/ 3600" not in t["expr"], (p["title"], t)
    by_title = {p["title"]: p for p in board["panels"]}
    ckpt = by_title["Checkpoints written, duration and size"]["fieldConfig"]["overrides"]
    assert [o["properties"][0]["value"] for o in ckpt] == ["s", "bytes", "short"]


@pytest.mark.system  # runs the generator as the docs do
def test_dashboard_is_generated_and_shows_every_metric() -> None:
    """Invariant: the committed dashboard equals its generator's output, has run and rank
    variables, and every catalog metric appears in a panel query (fne_run_info feeds the
    variables)."""
    out = subprocess.run(
        [sys.executable, str(GRAFANA / "dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    board = json.loads((GRAFANA / "fne_dashboard.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert "fne_run_info" in variables["run"]["definition"]
    assert variables["rank"]["multi"] and variables["rank"]["includeAll"]
    text = " ".join(expr for _, expr, _ in dashboard_queries())
    for m in METRICS:
        if m.name != "fne_run_info":
            assert any(name in text for name in m.exported), f"no panel shows {m.name}"
