"""A small metrics registry and `GET /metrics` in Prometheus' text exposition format (version 0.0.4).

Modules increment metrics of one process-wide registry, `REGISTRY`:

    from eldric_p2p.api import metrics
    metrics.REQUESTS.inc(endpoint="chat", model="qwen", status="200")
    metrics.STAGE_STEP.observe(0.012, stage="0-8")
    metrics.LINK_RTT.set(0.0004, peer="ab12cd")
    metrics.FETCH_BYTES.inc(1 << 20, peer="ab12cd")

Kinds: `Counter` (only goes up), `Gauge` (set, or a function read at scrape time), `Summary` (sum and count:
a rate of `sum` over a rate of `count` gives the mean) and `Rate` (events per second over a sliding window,
exposed as a gauge: the dashboard's live tokens/s). Label values are escaped; label sets per metric are capped
(`MAX_SERIES`) so a peer cannot grow the registry without bound by sending new names.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MAX_SERIES = 1000  # label sets per metric; more are folded into one series labelled "_other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelKey = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(key: LabelKey) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in key) + "}"


def _fmt_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self._lock = threading.Lock()  # forward passes report from worker threads

    def _key(self, labels: dict[str, Any]) -> LabelKey:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(labels)}")
        return tuple((k, str(labels[k])) for k in self.labels)

    def _slot(self, store: dict[LabelKey, Any], key: LabelKey) -> LabelKey:
        if key in store or len(store) < MAX_SERIES:
            return key
        return tuple((k, "_other") for k, _ in key)

    def samples(self) -> list[tuple[str, LabelKey, float]]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for name, key, value in self.samples():
            lines.append(f"{name}{_fmt_labels(key)} {_fmt_value(value)}")
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            key = self._slot(self._values, self._key(labels))
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: Any) -> float:
        return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        return sum(self._values.values())

    def samples(self) -> list[tuple[str, LabelKey, float]]:
        with self._lock:
            return [(self.name, k, v) for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelKey, float] = {}
        self._functions: dict[str, Callable[[], Iterable[tuple[dict[str, Any], float]]]] = {}

    def set(self, value: float, **labels: Any) -> None:
        with self._lock:
            self._values[self._slot(self._values, self._key(labels))] = float(value)

    def remove(self, **labels: Any) -> None:
        with self._lock:
            self._values.pop(self._key(labels), None)

    def value(self, **labels: Any) -> float:
        return self._values.get(self._key(labels), 0.0)

    def set_function(
        self, fn: Callable[[], Iterable[tuple[dict[str, Any], float]]], *, key: str = ""
    ) -> None:
        """Read `fn()` -> [(labels, value), ...] at every scrape (e.g. the router's queue depths).

        A later function with the same `key` replaces the earlier one.
        """
        self._functions[key] = fn

    def samples(self) -> list[tuple[str, LabelKey, float]]:
        with self._lock:
            out = dict(self._values)
        for fn in list(self._functions.values()):
            for labels, value in fn():
                out[self._key(labels)] = float(value)
        return [(self.name, k, v) for k, v in sorted(out.items())]


class Summary(_Metric):
    """Sum and count of observations (seconds, bytes), with the last value as `<name>_last` for dashboards."""

    kind = "summary"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelKey, list[float]] = {}  # key -> [sum, count, last]

    def observe(self, value: float, **labels: Any) -> None:
        with self._lock:
            key = self._slot(self._values, self._key(labels))
            s = self._values.setdefault(key, [0.0, 0.0, 0.0])
            s[0] += value
            s[1] += 1
            s[2] = value

    def mean(self, **labels: Any) -> float:
        s = self._values.get(self._key(labels))
        return s[0] / s[1] if s and s[1] else 0.0

    def samples(self) -> list[tuple[str, LabelKey, float]]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        out: list[tuple[str, LabelKey, float]] = []
        for k, (total, count, _last) in items:
            out += [(f"{self.name}_sum", k, total), (f"{self.name}_count", k, count)]
        return out

    def render(self) -> str:
        text = super().render()
        with self._lock:
            items = sorted((k, v[2]) for k, v in self._values.items())
        if items:
            text += f"# HELP {self.name}_last the most recent observation of {self.name}\n"
            text += f"# TYPE {self.name}_last gauge\n"
            text += "".join(f"{self.name}_last{_fmt_labels(k)} {_fmt_value(v)}\n" for k, v in items)
        return text


class Rate(_Metric):
    """Events per second over the last `window` seconds (a gauge), e.g. tokens/s per model."""

    kind = "gauge"

    def __init__(
        self, name: str, help: str, labels: Iterable[str] = (), *, window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        super().__init__(name, help, labels)
        self.window = window
        self.clock = clock
        self._events: dict[LabelKey, deque[tuple[float, float]]] = {}

    def add(self, amount: float = 1.0, **labels: Any) -> None:
        now = self.clock()
        with self._lock:
            key = self._slot(self._events, self._key(labels))
            q = self._events.setdefault(key, deque())
            q.append((now, amount))
            self._trim(q, now)

    def _trim(self, q: deque[tuple[float, float]], now: float) -> None:
        while q and q[0][0] < now - self.window:
            q.popleft()

    def rate(self, **labels: Any) -> float:
        return self._rates().get(self._key(labels), 0.0)

    def total_rate(self) -> float:
        return sum(self._rates().values())

    def _rates(self) -> dict[LabelKey, float]:
        now = self.clock()
        out = {}
        with self._lock:
            for key, q in self._events.items():
                self._trim(q, now)
                out[key] = sum(a for _, a in q) / self.window
        return out

    def samples(self) -> list[tuple[str, LabelKey, float]]:
        return [(self.name, k, v) for k, v in sorted(self._rates().items())]


class Registry:
    """Metrics by name; `render()` is the `/metrics` body."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> Any:
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric) or existing.labels != metric.labels:
                raise ValueError(f"metric {metric.name} already registered differently")
            return existing
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        return self._add(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labels))

    def summary(self, name: str, help: str, labels: Iterable[str] = ()) -> Summary:
        return self._add(Summary(name, help, labels))

    def rate(self, name: str, help: str, labels: Iterable[str] = (), *, window: float = 10.0) -> Rate:
        return self._add(Rate(name, help, labels, window=window))

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def render(self) -> str:
        return "".join(m.render() for _, m in sorted(self._metrics.items()))


REGISTRY = Registry()

# The metrics of the node. Other modules import and increment these.
REQUESTS = REGISTRY.counter(
    "eldric_requests_total",
    "HTTP API requests by endpoint, model and status code",
    ("endpoint", "model", "status"),
)
TOKENS = REGISTRY.counter("eldric_tokens_total", "tokens processed by model and kind (prompt|completion)",
                          ("model", "kind"))  # fmt: skip
TOKENS_PER_S = REGISTRY.rate(
    "eldric_tokens_per_second", "completion tokens per second over the last 10 s", ("model",)
)
ACTIVE = REGISTRY.gauge("eldric_active_requests", "generations streaming now, by model", ("model",))
QUEUE_DEPTH = REGISTRY.gauge(
    "eldric_queue_depth", "requests running or waiting per backend", ("model", "backend")
)
TTFT = REGISTRY.summary("eldric_time_to_first_token_seconds", "time from request to first token", ("model",))
STAGE_STEP = REGISTRY.summary(
    "eldric_stage_step_seconds", "forward time of one pipeline stage step", ("stage",)
)
LINK_RTT = REGISTRY.gauge("eldric_link_rtt_seconds", "round trip time of a peer link", ("peer", "path"))
FETCH_BYTES = REGISTRY.counter("eldric_fetch_bytes_total", "model bytes fetched from data peers", ("peer",))
REJECTED = REGISTRY.counter("eldric_rejected_total", "requests refused by admission (queue full, no backend)",
                            ("model", "reason"))  # fmt: skip


def metrics_routes(registry: Registry = REGISTRY) -> list[Route]:
    """`GET /metrics` serving `registry` in Prometheus text format."""

    async def metrics(request: Request) -> Response:
        return Response(registry.render(), media_type=CONTENT_TYPE)

    return [Route("/metrics", metrics, methods=["GET"])]
