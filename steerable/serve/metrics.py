"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, gauges and histograms need no
dependency. Updated from the event loop and the worker thread, hence one lock."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

LabelValues = tuple[str, ...]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(names: Sequence[str], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self.value = 0.0
        self._read = read

    def set(self, value: float) -> None:
        self.value = float(value)

    def lines(self) -> list[str]:
        return [f"{self.name} {_num(self._read() if self._read else self.value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelValues, tuple[list[int], list[float]]] = {}  # bucket counts, [sum, count]
        if not labels:  # an unlabelled series exists from the start, at zero
            self.series[()] = ([0] * len(self.buckets), [0.0, 0.0])

    def observe(self, value: float, **labels: str) -> None:
        counts, total = self.series.setdefault(self._key(labels), ([0] * len(self.buckets), [0.0, 0.0]))
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
                break
        total[0] += value
        total[1] += 1

    def count(self, **labels: str) -> int:
        s = self.series.get(self._key(labels))
        return int(s[1][1]) if s else 0

    def lines(self) -> list[str]:
        out = []
        for key, (counts, (total, n)) in sorted(self.series.items()):
            running = 0
            for b, c in zip(self.buckets, counts, strict=True):
                running += c
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, key, inf)} {_num(n)}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {_num(n)}")
        return out


class Metrics:
    """Everything /metrics reports. Call the methods, not the metric objects, so updates take the lock."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0) -> None:
        self.lock = threading.Lock()
        p = "steerable_serve_"
        self.requests = Counter(p + "requests_total", "Requests answered, by endpoint and HTTP status.",
                                ("endpoint", "status"))
        self.errors = Counter(p + "errors_total", "Requests refused or failed, by kind.", ("kind",))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generated_tokens = Counter(p + "generated_tokens_total", "Tokens generated.")
        self.cancelled = Counter(p + "cancelled_total",
                                 "Generations stopped early because the client went away or timed out.", ("reason",))
        self.batches = Counter(p + "batches_total", "Batches the worker ran.")
        self.batch_failures = Counter(p + "batch_failures_total",
                                      "Batches that raised; their open rows were rerun alone.")
        self.steps = Counter(p + "decode_steps_total", "Forward passes (prefill and decode steps) the worker ran.")
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for a batch.", queue_depth)
        self.running = Gauge(p + "running_rows", "Rows in the batch being decoded.")
        self.batch_rows = Histogram(p + "batch_size", "Rows per batch when it starts.", BATCH_BUCKETS)
        self.ttft = Histogram(p + "time_to_first_token_seconds",
                              "Admission (request read and checked) to its first generated token.", LATENCY_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between a request's consecutive tokens.",
                             LATENCY_BUCKETS)
        self.duration = Histogram(p + "request_duration_seconds", "Admission to the answer's last event.",
                                  DURATION_BUCKETS, ("endpoint",))
        self._all: list[_Metric] = [self.requests, self.errors, self.prompt_tokens, self.generated_tokens,
                                    self.cancelled, self.batches, self.batch_failures, self.steps,
                                    self.queue_depth, self.running,
                                    self.batch_rows, self.ttft, self.itl, self.duration]

    def answered(self, endpoint: str, status: int, seconds: float | None = None, error: str | None = None) -> None:
        with self.lock:
            self.requests.inc(endpoint=endpoint, status=str(status))
            if error is not None:
                self.errors.inc(kind=error)
            if seconds is not None:
                self.duration.observe(seconds, endpoint=endpoint)

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors.inc(kind=kind)

    def admitted(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens.inc(prompt_tokens)

    def cancel(self, reason: str) -> None:
        with self.lock:
            self.cancelled.inc(reason=reason)

    def batch_started(self, rows: int) -> None:
        with self.lock:
            self.batches.inc()
            self.batch_rows.observe(rows)
            self.running.set(rows)

    def batch_failed(self) -> None:
        with self.lock:
            self.batch_failures.inc()

    def step(self, rows: int, tokens: int, ttft: Sequence[float], itl: Sequence[float]) -> None:
        with self.lock:
            self.steps.inc()
            self.running.set(rows)
            self.generated_tokens.inc(tokens)
            for x in ttft:
                self.ttft.observe(x)
            for x in itl:
                self.itl.observe(x)

    def idle(self) -> None:
        with self.lock:
            self.running.set(0)

    def render(self) -> str:
        with self.lock:
            lines: list[str] = []
            for m in self._all:
                lines += m.header() + m.lines()  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"
