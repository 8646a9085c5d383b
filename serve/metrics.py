"""Prometheus metrics of one server: its own registry (several apps may share a process).

Request outcomes, time to first token and inter-token latency are observed by the routes; queue
length, busy slots and token totals are read from `Engine.stats()` at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpt2_onnx.runtime.engine import EngineStats

# Outcomes of a request, the label of gpt2onnx_requests_total.
OUTCOMES = ("ok", "cancelled", "error", "rejected", "invalid", "unauthorized", "unavailable")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
                    5.0, 10.0, 30.0)


class _EngineCollector(Collector):
    """Engine gauges and totals, read at scrape time (nothing to keep in sync)."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        if s is None:  # still loading
            return
        for name, doc, value in (
                ("gpt2onnx_slots", "KV slots (requests decoded together)", s.slots),
                ("gpt2onnx_busy_slots", "Slots holding a request", s.busy_slots),
                ("gpt2onnx_prefilling_slots", "Busy slots still loading their prompt",
                 s.prefilling),
                ("gpt2onnx_queue_length", "Requests waiting for a slot", s.waiting),
                ("gpt2onnx_max_queue", "Requests that may wait before 429", s.max_queue)):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
                ("gpt2onnx_prompt_tokens", "Prompt tokens admitted into slots",
                 s.prompt_tokens),
                ("gpt2onnx_generation_tokens", "Tokens generated", s.generated_tokens),
                ("gpt2onnx_engine_steps", "Decode runs of the engine", s.steps),
                ("gpt2onnx_engine_cancelled", "Engine requests cancelled (disconnects, drain)",
                 s.cancelled)):
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gpt2onnx_requests", "HTTP requests to the API by outcome",
                                ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every series exists from the start
        self.finish = Counter("gpt2onnx_completion_choices", "Finished choices by finish_reason",
                              ["finish_reason"], registry=self.registry)
        self.in_flight = Gauge("gpt2onnx_requests_in_flight",
                               "Completion requests accepted and not yet answered",
                               registry=self.registry)
        self.ttft = Histogram("gpt2onnx_time_to_first_token_seconds",
                              "Request arrival to its first token, per choice",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("gpt2onnx_inter_token_latency_seconds",
                             "Time between consecutive tokens of a choice",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
