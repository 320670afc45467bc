"""Every metric a run exports: one table, read by both back ends (prometheus_client on each
rank's /metrics, Ray's metrics agent under Ray Train) and by the Ray name-mapping rules.

Every series carries ``run``, ``rank`` and ``node`` (the node rank, never a hostname; never
``job``/``instance``, which Prometheus owns). Counters are named without ``_total``: both
prometheus_client and Ray append it. Gauges hold the mean over the last log window.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..data.stream import SHARD_ERRORS
from ..progress import TASKS

BASE_LABELS = ("run", "rank", "node")
PHASES = (  # the PhaseTimer's names (train.profile_phases), loop order
    "data",
    "online_forward",
    "momentum_forward",
    "gather",
    "reduce",
    "posterior_fit",  # the running Gaussians and the posterior's fit (its EM), per step
    "fne_loss",
    "backward_step",
    "ema",
    "enqueue",
    "finite_check",  # the non-finite loss flag's all-reduce
    "log",  # log windows (they read the diagnostics on the host)
    "checkpoint",
    "evaluate",
)
COLLECTIVE_PHASES = ("gather", "reduce")  # the step's own collectives (data holds the agreement)
SPLITS = ("val", "test")
RECALL_KEYS = {f"{d}_r{k}": (d, str(k)) for d in ("i2t", "t2i") for k in (1, 5, 10)}
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Ray's metrics agent hands each worker's gauges to OpenTelemetry's SDK as observable gauges,
# and the SDK drops a value that is not finite ("Callback returned a non-finite value ...,
# ignoring measurement"): a gauge still NaN (not measured: fne_temperature of a hinge loss,
# recall before the first evaluation) would never reach Prometheus. The Ray sink sends this
# value for NaN instead, and the ray-name recording rules turn it back into NaN, so both paths
# show the same series. The most negative float: no measured value is ever that.
RAY_NAN = -sys.float_info.max


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # gauge, counter, histogram
    help: str
    labels: tuple[str, ...] = ()  # beyond BASE_LABELS
    gpu_only: bool = False

    @property
    def exported(self) -> list[str]:
        """The series names Prometheus sees for this metric."""
        if self.kind == "counter":
            return [f"{self.name}_total"]
        if self.kind == "histogram":
            return [f"{self.name}_{s}" for s in ("bucket", "sum", "count")]
        return [self.name]


def _g(name: str, text: str, *labels: str, gpu_only: bool = False) -> Metric:
    return Metric(name, "gauge", text, labels, gpu_only)


def _c(name: str, text: str, *labels: str) -> Metric:
    return Metric(name, "counter", text, labels)


METRICS: tuple[Metric, ...] = (
    _g(
        "fne_run_info",
        "1; the run's version, config hash, launcher and world size",
        "version",
        "config_hash",
        "launcher",
        "world_size",
    ),
    # progress and throughput
    _c("fne_samples", "training samples this rank consumed"),
    _c("fne_micro_steps", "micro-batches this rank trained on"),
    _g("fne_optimizer_step", "optimizer steps taken"),
    _g("fne_epoch", "current epoch"),
    _g("fne_samples_per_second", "this rank's samples/s over the last log window"),
    _g("fne_last_step_timestamp_seconds", "Unix time of the last logged step (stalls)"),
    _g("fne_stall_after_seconds", "monitor.stall_after_s: no step for this long alerts"),
    Metric("fne_step_seconds", "histogram", "mean micro-step wall time of each log window"),
    _c("fne_phase_seconds", "seconds spent per step phase (train.profile_phases)", "phase"),
    # loss and optimisation
    _g("fne_loss", "mean loss of the last log window, total and per direction", "direction"),
    _g("fne_learning_rate", "learning rate"),
    _g("fne_warmup", "1 during the in-batch warm-up, 0 after"),
    _g("fne_temperature", "infonce temperature (NaN for hinge losses)"),
    _c("fne_nonfinite_loss", "log windows whose mean loss was NaN or infinite"),
    _c("fne_skipped_steps", "optimizer steps the engine skipped (fp16 overflow)"),
    _g("fne_grad_norm", "global gradient norm of the last optimizer step (before clipping)"),
    # FNE internals
    _g("fne_gate_open", "1 when the positives gate is open"),
    _g("fne_positives", "n+: positives counted by the statistics this epoch"),
    _g("fne_gaussian_mean", "mu of the fitted similarity Gaussians", "side"),
    _g("fne_gaussian_stddev", "sigma of the fitted similarity Gaussians", "side"),
    _g("fne_fn_share", "share of candidates with P_fn > epsilon"),
    _g("fne_window_share", "share of candidates in the hard-cut window"),
    _g("fne_fallbacks_per_step", "anchors that fell back to the hardest negative, per step"),
    _g("fne_no_violator_per_step", "anchors without a violating negative, per step"),
    _g("fne_zero_hinge_share", "share of drawn negatives with a zero hinge"),
    _g("fne_same_group_share", "share of sampled negatives sharing the anchor's group"),
    _g("fne_mean_negative_similarity", "mean similarity of the drawn negatives"),
    _g("fne_memory_fill", "share of the momentum memory's slots written"),
    _g("fne_memory_staleness", "mean cosine between momentum embeddings and their memory rows"),
    # data
    _c("fne_bad_samples", "samples skipped as bad, by reason", "reason"),
    _c(
        "fne_dropped_samples", "samples never in a batch: by the plan, or epochs cut short", "cause"
    ),
    _c(
        "fne_shard_errors",
        "shard pieces that ended early (truncated, corrupt), by reason",
        "reason",
    ),
    _g("fne_max_bad_fraction", "data.max_bad_fraction (the bad-sample alert's limit)"),
    # checkpoints
    _c("fne_checkpoints", "checkpoints written"),
    _g("fne_checkpoint_seconds", "wall time of the last checkpoint (write and upload)"),
    _g("fne_checkpoint_bytes", "size of the last checkpoint directory"),
    _g("fne_checkpoint_timestamp_seconds", "Unix time of the newest checkpoint (run start: none)"),
    _g("fne_checkpoint_max_age_seconds", "alert when the newest checkpoint is older than this"),
    # evaluation
    _g("fne_eval_recall", "recall@k in percent", "split", "direction", "k"),
    _g("fne_eval_rsum", "sum of the six recalls", "split"),
    _g("fne_eval_group_rsum", "group-aware rsum", "split"),
    # long waits (fne_dist/progress.py): feature cache, shard index, evaluation, upload
    _g("fne_task_progress", "share done of the running or last long task, 0..1", "task"),
    _g("fne_task_seconds", "seconds spent so far in the running or last long task", "task"),
    # process
    _g("fne_process_resident_memory_bytes", "resident set size"),
    _c("fne_process_cpu_seconds", "user + system CPU time"),
    _g("fne_cuda_memory_allocated_bytes", "CUDA memory allocated", gpu_only=True),
    _g("fne_cuda_memory_reserved_bytes", "CUDA memory reserved", gpu_only=True),
)
BY_NAME = {m.name: m for m in METRICS}

# Loop metrics (train_log.jsonl keys) → (metric, extra label values)
LOGGED: dict[str, tuple[str, tuple[str, ...]]] = {
    "loss": ("fne_loss", ("total",)),
    "loss_i2t": ("fne_loss", ("i2t",)),
    "loss_t2i": ("fne_loss", ("t2i",)),
    "lr": ("fne_learning_rate", ()),
    "grad_norm": ("fne_grad_norm", ()),
    "warmup": ("fne_warmup", ()),
    "epoch": ("fne_epoch", ()),
    "temperature": ("fne_temperature", ()),
    "gate_open": ("fne_gate_open", ()),
    "n_pos": ("fne_positives", ()),
    "mu_pos": ("fne_gaussian_mean", ("pos",)),
    "mu_neg": ("fne_gaussian_mean", ("neg",)),
    "sigma_pos": ("fne_gaussian_stddev", ("pos",)),
    "sigma_neg": ("fne_gaussian_stddev", ("neg",)),
    "frac_pfn_gt_eps": ("fne_fn_share", ()),
    "frac_in_window": ("fne_window_share", ()),
    "fallback": ("fne_fallbacks_per_step", ()),
    "no_violator": ("fne_no_violator_per_step", ()),
    "frac_zero_hinge": ("fne_zero_hinge_share", ()),
    "frac_neg_same_group": ("fne_same_group_share", ()),
    "mean_neg_sim": ("fne_mean_negative_similarity", ()),
    "staleness": ("fne_memory_staleness", ()),
}


def initial_label_values(metric: Metric, bad_reasons: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The extra label values of every series that exists from the first scrape."""
    if not metric.labels or metric.name == "fne_run_info":
        return [()]
    if metric.name == "fne_eval_recall":
        return [(s, d, k) for s in SPLITS for d, k in RECALL_KEYS.values()]
    fixed = {
        "fne_loss": [(d,) for d in ("total", "i2t", "t2i")],
        "fne_gaussian_mean": [("pos",), ("neg",)],
        "fne_gaussian_stddev": [("pos",), ("neg",)],
        "fne_phase_seconds": [(p,) for p in PHASES],
        "fne_bad_samples": [(r,) for r in bad_reasons],
        "fne_shard_errors": [(r,) for r in SHARD_ERRORS],
        "fne_task_progress": [(t,) for t in TASKS],
        "fne_task_seconds": [(t,) for t in TASKS],
        "fne_dropped_samples": [("plan",), ("cut_short",)],
        "fne_eval_rsum": [(s,) for s in SPLITS],
        "fne_eval_group_rsum": [(s,) for s in SPLITS],
    }
    return fixed[metric.name]
