"""Prometheus metrics. One registry per app instance (tests run several in one process).

Label values are bounded: task types and models beyond `MAX_LABEL_VALUES` distinct
values collapse to "other", so a client cannot blow up cardinality.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_LABEL_VALUES = 50

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class BoundedLabel:
    """Maps raw values to at most `limit` label values, the rest to 'other'."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.task_label = BoundedLabel()
        self.model_label = BoundedLabel()
        self.requests = Counter(
            "thermostat_requests", "Completion requests by outcome", ["model", "task_type", "mode", "arm", "status"], registry=r
        )
        self.request_duration = Histogram(
            "thermostat_request_duration_seconds", "Total request latency", ["task_type", "mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "thermostat_time_to_first_token_seconds", "Time to first streamed byte", ["task_type", "mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.overhead = Histogram(
            "thermostat_overhead_seconds", "Time spent inside Thermostat, upstream excluded", buckets=OVERHEAD_BUCKETS, registry=r
        )
        self.tokens = Counter("thermostat_tokens", "Tokens reported by upstreams", ["task_type", "kind"], registry=r)
        self.upstream_errors = Counter(
            "thermostat_upstream_errors", "Upstream failures by class", ["upstream", "error_class"], registry=r
        )
        self.queue_depth = Gauge("thermostat_writer_queue_depth", "Entries waiting for the decision-log writer", registry=r)
        self.queue_dropped = Counter("thermostat_writer_dropped", "Entries dropped because the writer queue was full", registry=r)
        self.written = Counter("thermostat_writer_written", "Entries written to the decision log", registry=r)
        self.client_errors = Counter(
            "thermostat_rejected_requests", "Requests Thermostat answered itself with an error", ["code"], registry=r
        )
