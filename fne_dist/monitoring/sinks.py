"""Two back ends for the catalog's metrics, one interface: ``set`` a gauge, ``add`` to a
counter, ``observe`` a histogram, each with the extra label values of one series.

``PromSink`` keeps prometheus_client metrics in its own registry (served on a rank's /metrics).
``RaySink`` records through ``ray.util.metrics`` (Ray's metrics agent exports them as
``ray_fne_*``). Ray's counters refuse an increment of 0, so a series could not exist before its
first event: ``RaySink`` exports each counter as a gauge named ``<name>_total`` holding the
cumulative value (rate() reads it the same), which keeps one set of names for both paths.
Ray also forgets a gauge that was not set for ~20 s (seen with Ray 2.60), and its agent drops
values that are not finite: ``RaySink`` sets every known value again every ``REFRESH_S`` from a
daemon thread, and sends NaN as ``catalog.RAY_NAN`` (the recording rules of
``monitoring.rules`` turn it back into NaN) and ±Inf as the largest finite values.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

from .catalog import BASE_LABELS, METRICS, RAY_NAN, STEP_BUCKETS, Metric

# ±Inf through Ray: the largest finite values (RAY_NAN, the most negative float, stands for NaN)
_RAY_INF = sys.float_info.max
_RAY_MINUS_INF = math.nextafter(RAY_NAN, 0.0)


def ray_value(value: float) -> float:
    """A gauge value as Ray's agent carries it: finite values as they are, NaN as RAY_NAN."""
    if math.isnan(value):
        return RAY_NAN
    if math.isinf(value):
        return _RAY_INF if value > 0 else _RAY_MINUS_INF
    return value


REFRESH_S = 5.0  # RaySink: well under the ~20 s after which Ray drops a gauge not set again


class PromSink:
    def __init__(self, base: dict[str, str], metrics: tuple[Metric, ...] = METRICS) -> None:
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry(auto_describe=True)
        self.base = tuple(base[k] for k in BASE_LABELS)
        kinds = {"gauge": pc.Gauge, "counter": pc.Counter, "histogram": pc.Histogram}
        self.metrics: dict[str, Any] = {}
        for m in metrics:
            extra = {"buckets": STEP_BUCKETS} if m.kind == "histogram" else {}
            self.metrics[m.name] = kinds[m.kind](
                m.name, m.help, (*BASE_LABELS, *m.labels), registry=self.registry, **extra
            )

    def _child(self, name: str, labels: tuple[str, ...]) -> Any:
        return self.metrics[name].labels(*self.base, *labels)

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._child(name, labels).set(value)

    def add(self, name: str, labels: tuple[str, ...], amount: float) -> None:
        self._child(name, labels).inc(amount)

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._child(name, labels).observe(value)

    def touch(self, name: str, labels: tuple[str, ...]) -> None:
        """Create the series (a histogram's buckets at 0) without an observation."""
        self._child(name, labels)

    def close(self) -> None:
        pass


class RaySink:
    def __init__(self, base: dict[str, str], metrics: tuple[Metric, ...] = METRICS) -> None:
        from ray.util import metrics as rm

        self.tags = {k: base[k] for k in BASE_LABELS}
        self.keys: dict[str, tuple[str, ...]] = {}
        self.metrics: dict[str, Any] = {}
        self.values: dict[tuple[str, tuple[str, ...]], float] = {}  # every gauge's last value
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        for m in metrics:
            keys = (*BASE_LABELS, *m.labels)
            self.keys[m.name] = m.labels
            if m.kind == "histogram":
                self.metrics[m.name] = rm.Histogram(
                    m.name, m.help, boundaries=list(STEP_BUCKETS), tag_keys=keys
                )
            else:
                name = f"{m.name}_total" if m.kind == "counter" else m.name
                self.metrics[m.name] = rm.Gauge(name, m.help, tag_keys=keys)
        self.thread = threading.Thread(target=self._refresh, name="fne-ray-metrics", daemon=True)
        self.thread.start()

    def _refresh(self) -> None:
        while not self.stopped.wait(REFRESH_S):
            with self.lock:
                values = list(self.values.items())
            for (name, labels), value in values:
                self.metrics[name].set(ray_value(value), tags=self._tags(name, labels))

    def _tags(self, name: str, labels: tuple[str, ...]) -> dict[str, str]:
        return {**self.tags, **dict(zip(self.keys[name], labels, strict=True))}

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self.lock:
            self.values[(name, labels)] = value
        self.metrics[name].set(ray_value(value), tags=self._tags(name, labels))

    def add(self, name: str, labels: tuple[str, ...], amount: float) -> None:
        with self.lock:
            total = self.values[(name, labels)] = self.values.get((name, labels), 0.0) + amount
        self.metrics[name].set(total, tags=self._tags(name, labels))

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self.metrics[name].observe(value, tags=self._tags(name, labels))

    def touch(self, name: str, labels: tuple[str, ...]) -> None:
        pass  # Ray's histograms appear with their first observation

    def close(self) -> None:
        self.stopped.set()
