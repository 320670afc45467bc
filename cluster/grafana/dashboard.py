"""Generates cluster/grafana/fne_dashboard.json: ``python cluster/grafana/dashboard.py``.

One panel list, reviewable here rather than in Grafana's JSON. Variables: ``run`` (from
fne_run_info) and ``rank`` (multi-select, all by default). Queries use the fne_* names of both
paths (Ray's are recorded under them by cluster/prometheus/rules/fne_ray_names.yml) and the
per-run recording rules. Panels that only a GPU feeds say so in their description ("GPU only");
tests/test_monitoring_system.py runs every other panel's queries against a real Prometheus
that scraped a real run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "fne_dashboard.json"
SEL = '{run=~"$run", rank=~"$rank"}'
RUN = '{run=~"$run"}'
RI = "$__rate_interval"
GPU_ONLY = "GPU only: "

# (section, title, unit, [(query, legend)], description)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], str]] = [
    (
        "Throughput",
        "Samples/s (run)",
        "short",
        [(f"fne:samples_per_second:run{RUN}", "{{run}}")],
        "",
    ),
    (
        "Throughput",
        "Samples/s per rank",
        "short",
        [(f"fne_samples_per_second{SEL}", "rank {{rank}}")],
        "",
    ),
    (
        "Throughput",
        "Step time by phase",
        "s",
        [
            (
                f"sum by (phase) (rate(fne_phase_seconds_total{SEL}[{RI}]))"
                f" / ignoring(phase) group_left sum(rate(fne_micro_steps_total{SEL}[{RI}]))",
                "{{phase}}",
            )
        ],
        "seconds per micro step (train.profile_phases=true)",
    ),
    (
        "Throughput",
        "Step time p50 / p90",
        "s",
        [
            (
                f"histogram_quantile(0.5, sum by (le) (rate(fne_step_seconds_bucket{SEL}[{RI}])))",
                "p50",
            ),
            (
                f"histogram_quantile(0.9, sum by (le) (rate(fne_step_seconds_bucket{SEL}[{RI}])))",
                "p90",
            ),
        ],
        "",
    ),
    (
        "Throughput",
        "Share of the step in collectives",
        "percentunit",
        [(f"fne:collective_share:run{RUN}", "{{run}}")],
        "all-gather + statistics all-reduce",
    ),
    ("Loss", "Loss by direction", "short", [(f"fne_loss{SEL}", "{{direction}} rank {{rank}}")], ""),
    (
        "Loss",
        "Learning rate and temperature",
        "short",
        [
            (f"fne_learning_rate{SEL}", "lr rank {{rank}}"),
            (f"fne_temperature{SEL}", "temperature rank {{rank}}"),
        ],
        "temperature: infonce only",
    ),
    (
        "Progress",
        "Optimizer step, epoch, warm-up",
        "short",
        [
            (f"fne_optimizer_step{SEL}", "step rank {{rank}}"),
            (f"fne_epoch{SEL}", "epoch rank {{rank}}"),
            (f"fne_warmup{SEL}", "warm-up rank {{rank}}"),
        ],
        "",
    ),
    (
        "Progress",
        "Time since the last step",
        "s",
        [
            (f"time() - fne_last_step_timestamp_seconds{SEL}", "rank {{rank}}"),
            (f"fne_stall_after_seconds{SEL}", "alert after rank {{rank}}"),
        ],
        "",
    ),
    (
        "Loss",
        "Non-finite loss windows and skipped steps",
        "short",
        [
            (f"increase(fne_nonfinite_loss_total{SEL}[{RI}])", "non-finite rank {{rank}}"),
            (f"increase(fne_skipped_steps_total{SEL}[{RI}])", "skipped rank {{rank}}"),
        ],
        "",
    ),
    (
        "Loss",
        "Gradient norm",
        "short",
        [(f"fne_grad_norm{SEL}", "rank {{rank}}")],
        "global norm of the last optimizer step before clipping (optim.grad_clip)",
    ),
    (
        "FNE",
        "Gate open and positives n+",
        "short",
        [
            (f"fne_gate_open{SEL}", "gate rank {{rank}}"),
            (f"fne_positives{SEL}", "n+ rank {{rank}}"),
        ],
        "",
    ),
    (
        "FNE",
        "Gaussians mu / sigma, mean drawn-negative similarity",
        "short",
        [
            (f"fne_gaussian_mean{SEL}", "mu {{side}} rank {{rank}}"),
            (f"fne_gaussian_stddev{SEL}", "sigma {{side}} rank {{rank}}"),
            (f"fne_mean_negative_similarity{SEL}", "drawn negatives rank {{rank}}"),
        ],
        "",
    ),
    (
        "FNE",
        "Share P_fn > eps and in the hard-cut window",
        "percentunit",
        [
            (f"fne:fn_share:run{RUN}", "P_fn > eps (run)"),
            (f"fne_fn_share{SEL}", "P_fn > eps rank {{rank}}"),
            (f"fne_window_share{SEL}", "window rank {{rank}}"),
        ],
        "",
    ),
    (
        "FNE",
        "Fallbacks, no-violator anchors per step",
        "short",
        [
            (f"fne_fallbacks_per_step{SEL}", "fallbacks rank {{rank}}"),
            (f"fne_no_violator_per_step{SEL}", "no violator rank {{rank}}"),
        ],
        "",
    ),
    (
        "FNE",
        "Zero-hinge draws and same-group negatives",
        "percentunit",
        [
            (f"fne_zero_hinge_share{SEL}", "zero hinge rank {{rank}}"),
            (f"fne_same_group_share{SEL}", "same group rank {{rank}}"),
        ],
        "",
    ),
    (
        "FNE",
        "Memory fill and staleness",
        "short",
        [
            (f"fne_memory_fill{SEL}", "fill rank {{rank}}"),
            (f"fne_memory_staleness{SEL}", "staleness rank {{rank}}"),
        ],
        "",
    ),
    (
        "Data",
        "Samples read and bad samples /s",
        "short",
        [
            (f"sum(rate(fne_samples_total{SEL}[{RI}]))", "read"),
            (f"sum by (reason) (rate(fne_bad_samples_total{SEL}[{RI}]))", "bad {{reason}}"),
        ],
        "",
    ),
    (
        "Data",
        "Bad-sample fraction vs limit",
        "percentunit",
        [
            (f"fne:bad_sample_fraction:run{RUN}", "bad fraction"),
            (f"max by (run) (fne_max_bad_fraction{RUN})", "data.max_bad_fraction"),
        ],
        "",
    ),
    (
        "Data",
        "Shard errors",
        "short",
        [(f"sum by (reason) (fne_shard_errors_total{SEL})", "{{reason}}")],
        "shard pieces that ended early (truncated or corrupt archives)",
    ),
    (
        "Data",
        "Dropped samples",
        "short",
        [(f"sum by (cause) (fne_dropped_samples_total{SEL})", "{{cause}}")],
        "",
    ),
    (
        "Checkpoints",
        "Checkpoints written, duration and size",
        "s",
        [
            (f"fne_checkpoint_seconds{SEL}", "seconds rank {{rank}}"),
            (f"fne_checkpoint_bytes{SEL} / 1e6", "MB rank {{rank}}"),
            (f"fne_checkpoints_total{SEL}", "written rank {{rank}}"),
        ],
        "",
    ),
    (
        "Checkpoints",
        "Age of the newest checkpoint",
        "s",
        [
            (f"time() - fne_checkpoint_timestamp_seconds{SEL}", "age rank {{rank}}"),
            (f"fne_checkpoint_max_age_seconds{SEL}", "alert age rank {{rank}}"),
        ],
        "",
    ),
    (
        "Evaluation",
        "Recall@k",
        "short",
        [('fne_eval_recall{run=~"$run", rank="0"}', "{{split}} {{direction}} R@{{k}}")],
        "",
    ),
    (
        "Evaluation",
        "rsum",
        "short",
        [
            ('fne_eval_rsum{run=~"$run", rank="0"}', "{{split}} rsum"),
            ('fne_eval_group_rsum{run=~"$run", rank="0"}', "{{split}} group rsum"),
        ],
        "",
    ),
    (
        "Progress",
        "Long tasks (feature cache, shard index, evaluation, upload)",
        "percentunit",
        [
            (f"fne_task_progress{SEL}", "{{task}} rank {{rank}}"),
            (f"fne_task_seconds{SEL} / 3600", "{{task}} hours rank {{rank}}"),
        ],
        "share done of each long task (fne_dist/progress.py) and hours spent; NaN until the "
        "task first runs",
    ),
    (
        "Process",
        "Resident memory",
        "bytes",
        [(f"fne_process_resident_memory_bytes{SEL}", "rank {{rank}}")],
        "",
    ),
    (
        "Process",
        "CPU (cores)",
        "short",
        [(f"rate(fne_process_cpu_seconds_total{SEL}[{RI}])", "rank {{rank}}")],
        "",
    ),
    (
        "Process",
        "CUDA memory",
        "bytes",
        [
            (f"fne_cuda_memory_allocated_bytes{SEL}", "allocated rank {{rank}}"),
            (f"fne_cuda_memory_reserved_bytes{SEL}", "reserved rank {{rank}}"),
        ],
        GPU_ONLY + "the CUDA caching allocator's counters",
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


def _panel(i: int, title: str, unit: str, targets: list[tuple[str, str]], text: str) -> dict:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "description": text,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
            for j, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> dict:
    panels = [
        _panel(i, f"{section}: {title}", unit, targets, text)
        for i, (section, title, unit, targets, text) in enumerate(PANELS)
    ]
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
