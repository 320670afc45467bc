"""Generates cluster/grafana/fne_dashboard.json: ``python cluster/grafana/dashboard.py``.

One panel list, reviewable here rather than in Grafana's JSON, in rows (throughput, training,
FNE, data, checkpoints, system); every query carries its own unit (a per-series override), so
seconds, bytes and counts in one panel are each labelled in theirs. Variables: ``run`` (from
fne_run_info) and ``rank`` (multi-select, all by default). Queries use the fne_* names of both
paths (Ray's are recorded under them by cluster/prometheus/rules/fne_ray_names.yml) and the
per-run recording rules. Panels that only a GPU feeds say so in their description ("GPU only");
tests/test_monitoring_system.py runs every other panel's queries against a real Prometheus
that scraped a real run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "fne_dashboard.json"
SEL = '{run=~"$run", rank=~"$rank"}'
RUN = '{run=~"$run"}'
RI = "$__rate_interval"
GPU_ONLY = "GPU only: "

# Grafana unit ids; a custom "suffix:" unit where Grafana has none (samples/s, steps).
SAMPLES_S = "suffix: samples/s"
COUNT = "short"
SECONDS = "s"
SHARE = "percentunit"  # 0..1
PERCENT = "percent"  # 0..100
BYTES = "bytes"


@dataclass(frozen=True)
class Series:
    """One query of a panel, with its own legend and unit (a per-series override)."""

    expr: str
    legend: str
    unit: str


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    text: str = ""


def _s(expr: str, legend: str, unit: str = COUNT) -> Series:
    return Series(expr, legend, unit)


# (row, panels): each row one concern an operator looks at together.
ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Throughput",
        [
            Panel("Samples/s (run)", (_s(f"run:fne_samples:rate1m{RUN}", "{{run}}", SAMPLES_S),)),
            Panel(
                "Samples/s per rank",
                (_s(f"fne_samples_per_second{SEL}", "rank {{rank}}", SAMPLES_S),),
            ),
            Panel(
                "Step time by phase",
                (
                    _s(
                        f"sum by (phase) (rate(fne_phase_seconds_total{SEL}[{RI}]))"
                        " / ignoring(phase) group_left"
                        f" sum(rate(fne_micro_steps_total{SEL}[{RI}]))",
                        "{{phase}}",
                        SECONDS,
                    ),
                ),
                "seconds per micro step (train.profile_phases=true)",
            ),
            Panel(
                "Step time p50 / p90",
                tuple(
                    _s(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(fne_step_seconds_bucket{SEL}[{RI}])))",
                        f"p{int(q * 100)}",
                        SECONDS,
                    )
                    for q in (0.5, 0.9)
                ),
            ),
            Panel(
                "Share of the step in collectives",
                (
                    _s(
                        f"run:fne_collective_seconds_per_phase_seconds:ratio_rate1m{RUN}",
                        "{{run}}",
                        SHARE,
                    ),
                ),
                "all-gather + statistics all-reduce",
            ),
        ],
    ),
    (
        "Training",
        [
            Panel("Loss by direction", (_s(f"fne_loss{SEL}", "{{direction}} rank {{rank}}"),)),
            Panel(
                "Learning rate and temperature",
                (
                    _s(f"fne_learning_rate{SEL}", "lr rank {{rank}}"),
                    _s(f"fne_temperature{SEL}", "temperature rank {{rank}}"),
                ),
                "temperature: infonce only",
            ),
            Panel(
                "Non-finite loss windows and skipped steps",
                (
                    _s(
                        f"increase(fne_nonfinite_loss_total{SEL}[{RI}])", "non-finite rank {{rank}}"
                    ),
                    _s(f"increase(fne_skipped_steps_total{SEL}[{RI}])", "skipped rank {{rank}}"),
                ),
            ),
            Panel(
                "Gradient norm",
                (_s(f"fne_grad_norm{SEL}", "rank {{rank}}"),),
                "global norm of the last optimizer step before clipping (optim.grad_clip)",
            ),
            Panel(
                "Optimizer step, epoch, warm-up",
                (
                    _s(f"fne_optimizer_step{SEL}", "step rank {{rank}}"),
                    _s(f"fne_epoch{SEL}", "epoch rank {{rank}}"),
                    _s(f"fne_warmup{SEL}", "warm-up rank {{rank}}"),
                ),
            ),
            Panel(
                "Time since the last step",
                (
                    _s(f"time() - fne_last_step_timestamp_seconds{SEL}", "rank {{rank}}", SECONDS),
                    _s(f"fne_stall_after_seconds{SEL}", "alert after rank {{rank}}", SECONDS),
                ),
            ),
            Panel(
                "Recall@k",
                (
                    _s(
                        'fne_eval_recall{run=~"$run", rank="0"}',
                        "{{split}} {{direction}} R@{{k}}",
                        PERCENT,
                    ),
                ),
            ),
            Panel(
                "rsum",
                (
                    _s('fne_eval_rsum{run=~"$run", rank="0"}', "{{split}} rsum"),
                    _s('fne_eval_group_rsum{run=~"$run", rank="0"}', "{{split}} group rsum"),
                ),
            ),
        ],
    ),
    (
        "FNE",
        [
            Panel(
                "Gate open and positives n+",
                (
                    _s(f"fne_gate_open{SEL}", "gate rank {{rank}}"),
                    _s(f"fne_positives{SEL}", "n+ rank {{rank}}"),
                ),
            ),
            Panel(
                "Gaussians mu / sigma, mean drawn-negative similarity",
                (
                    _s(f"fne_gaussian_mean{SEL}", "mu {{side}} rank {{rank}}"),
                    _s(f"fne_gaussian_stddev{SEL}", "sigma {{side}} rank {{rank}}"),
                    _s(f"fne_mean_negative_similarity{SEL}", "drawn negatives rank {{rank}}"),
                ),
            ),
            Panel(
                "Share P_fn > eps and in the hard-cut window",
                (
                    _s(f"run:fne_fn_share:avg{RUN}", "P_fn > eps (run)", SHARE),
                    _s(f"fne_fn_share{SEL}", "P_fn > eps rank {{rank}}", SHARE),
                    _s(f"fne_window_share{SEL}", "window rank {{rank}}", SHARE),
                ),
            ),
            Panel(
                "Fallbacks, no-violator anchors per step",
                (
                    _s(f"fne_fallbacks_per_step{SEL}", "fallbacks rank {{rank}}"),
                    _s(f"fne_no_violator_per_step{SEL}", "no violator rank {{rank}}"),
                ),
            ),
            Panel(
                "Zero-hinge draws and same-group negatives",
                (
                    _s(f"fne_zero_hinge_share{SEL}", "zero hinge rank {{rank}}", SHARE),
                    _s(f"fne_same_group_share{SEL}", "same group rank {{rank}}", SHARE),
                ),
            ),
            Panel(
                "Memory fill and staleness",
                (
                    _s(f"fne_memory_fill{SEL}", "fill rank {{rank}}", SHARE),
                    _s(f"fne_memory_staleness{SEL}", "staleness rank {{rank}}"),
                ),
                "staleness: mean cosine between momentum embeddings and their memory rows",
            ),
        ],
    ),
    (
        "Data",
        [
            Panel(
                "Samples read and bad samples /s",
                (
                    _s(f"sum(rate(fne_samples_total{SEL}[{RI}]))", "read", SAMPLES_S),
                    _s(
                        f"sum by (reason) (rate(fne_bad_samples_total{SEL}[{RI}]))",
                        "bad {{reason}}",
                        SAMPLES_S,
                    ),
                ),
            ),
            Panel(
                "Bad-sample fraction vs limit",
                (
                    _s(
                        f"run:fne_bad_samples_per_samples_read:ratio_rate5m{RUN}",
                        "bad fraction",
                        SHARE,
                    ),
                    _s(f"max by (run) (fne_max_bad_fraction{RUN})", "data.max_bad_fraction", SHARE),
                ),
            ),
            Panel(
                "Shard errors",
                (_s(f"sum by (reason) (fne_shard_errors_total{SEL})", "{{reason}}"),),
                "shard pieces that ended early (truncated or corrupt archives)",
            ),
            Panel(
                "Dropped samples",
                (_s(f"sum by (cause) (fne_dropped_samples_total{SEL})", "{{cause}}"),),
            ),
            Panel(
                "Long tasks (feature cache, shard index, evaluation, upload)",
                (
                    _s(f"fne_task_progress{SEL}", "{{task}} done rank {{rank}}", SHARE),
                    _s(f"fne_task_seconds{SEL}", "{{task}} time rank {{rank}}", SECONDS),
                ),
                "share done of each long task (fne_dist/progress.py) and time spent; NaN until "
                "the task first runs",
            ),
        ],
    ),
    (
        "Checkpoints",
        [
            Panel(
                "Checkpoints written, duration and size",
                (
                    _s(f"fne_checkpoint_seconds{SEL}", "duration rank {{rank}}", SECONDS),
                    _s(f"fne_checkpoint_bytes{SEL}", "size rank {{rank}}", BYTES),
                    _s(f"fne_checkpoints_total{SEL}", "written rank {{rank}}"),
                ),
            ),
            Panel(
                "Age of the newest checkpoint",
                (
                    _s(
                        f"time() - fne_checkpoint_timestamp_seconds{SEL}",
                        "age rank {{rank}}",
                        SECONDS,
                    ),
                    _s(f"fne_checkpoint_max_age_seconds{SEL}", "alert age rank {{rank}}", SECONDS),
                ),
            ),
        ],
    ),
    (
        "System",
        [
            Panel(
                "Resident memory",
                (_s(f"fne_process_resident_memory_bytes{SEL}", "rank {{rank}}", BYTES),),
            ),
            Panel(
                "CPU (cores)",
                (_s(f"rate(fne_process_cpu_seconds_total{SEL}[{RI}])", "rank {{rank}}"),),
            ),
            Panel(
                "CUDA memory",
                (
                    _s(f"fne_cuda_memory_allocated_bytes{SEL}", "allocated rank {{rank}}", BYTES),
                    _s(f"fne_cuda_memory_reserved_bytes{SEL}", "reserved rank {{rank}}", BYTES),
                ),
                GPU_ONLY + "the CUDA caching allocator's counters",
            ),
        ],
    ),
]


def _variable(name: str, query: str) -> dict:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": name == "rank",
        "multi": name == "rank",
        "allValue": ".*" if name == "rank" else None,
        "current": {},
    }


def _panel(pid: int, panel: Panel, x: int, y: int) -> dict:
    """A time series panel; each query's unit is an override on its refId, so series of
    different units (seconds, bytes, a count) are each drawn and labelled in their own."""
    refs = [chr(ord("A") + j) for j in range(len(panel.series))]
    return {
        "id": pid,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.text,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": panel.series[0].unit},
            "overrides": [
                {
                    "matcher": {"id": "byFrameRefID", "options": ref},
                    "properties": [{"id": "unit", "value": s.unit}],
                }
                for ref, s in zip(refs, panel.series, strict=True)
            ],
        },
        "targets": [
            {"refId": ref, "expr": s.expr, "legendFormat": s.legend}
            for ref, s in zip(refs, panel.series, strict=True)
        ],
    }


def _row(pid: int, title: str, y: int) -> dict:
    return {
        "id": pid,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        "panels": [],
    }


def dashboard() -> dict:
    panels: list[dict] = []
    y = 0
    for row, members in ROWS:
        panels.append(_row(len(panels) + 1, row, y))
        y += 1
        for i, panel in enumerate(members):
            panels.append(_panel(len(panels) + 1, panel, 12 * (i % 2), y + 8 * (i // 2)))
        y += 8 * ((len(members) + 1) // 2)
    datasource = {"name": "datasource", "type": "datasource", "query": "prometheus"}
    return {
        "uid": "fne-dist",
        "title": "fne_dist training",
        "tags": ["fne_dist"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                datasource,
                _variable("run", "label_values(fne_run_info, run)"),
                _variable("rank", 'label_values(fne_run_info{run=~"$run"}, rank)'),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=1) + "\n"


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(0 if OUT.read_text() == render() else "fne_dashboard.json is out of date")
    OUT.write_text(render())
