"""Prometheus metrics, served at ``GET /metrics`` on the ops port.

prometheus_client does the exposition format, label handling and histogram
arithmetic. Each server has its own ``CollectorRegistry`` (no process-global
state), and live gauges are read from the engine at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics", "ServerStatistics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
GC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ANSWER_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)


class _Gauges(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        for name, help_text in (
            ("connections", "Open client connections"),
            ("users_online", "Users with at least one connection"),
            ("locals_online", "Verified locals in the live index"),
            ("open_questions", "Questions open or answered but not resolved"),
            ("escalations_running", "Escalation tasks running"),
            (
                "escalations_waiting",
                "Questions with escalation stages left that this node does not run (another node holds the lease)",
            ),
            ("store_writes_failing", "1 while commits to the database fail (writes are refused), else 0"),
            ("cluster_nodes", "Nodes registered on the database, this one included (SQLite: 1)"),
            ("escalation_lease_held", "1 while this node holds the escalation lease (SQLite: always), else 0"),
        ):
            yield GaugeMetricFamily(f"dongne_{name}", help_text, value=values.get(name, 0))


@attrs.frozen
class ServerStatistics:
    """Traffic so far, read from the metrics (counted once, there)."""

    connections_total: int
    frames_in: int
    deliveries: int
    slow_consumers: int
    refused_connections: int
    errors: dict[str, int]


class Metrics:
    """Every metric the server exports.

    Args:
        read_gauges: returns the live values of the gauges (called at scrape time).
    """

    def __init__(self, read_gauges: Callable[[], dict[str, Any]]) -> None:
        r = self.registry = CollectorRegistry()
        self.connections_total = Counter("dongne_connections", "Client connections opened (handshake done)", registry=r)
        self.frames_in = Counter("dongne_frames_in", "Client frames received, by operation", ["type"], registry=r)
        self.frames_out = Counter("dongne_frames_out", "Frames delivered to clients, by type", ["type"], registry=r)
        self.deliveries = Counter("dongne_deliveries", "Frames written or queued to client connections", registry=r)
        self.errors = Counter("dongne_errors", "Error replies and closes, by code", ["code"], registry=r)
        self.store_write_failures = Counter(
            "dongne_store_write_failures", "Commits, probe writes and WAL checkpoints the database refused", registry=r
        )
        self.seqs_renumbered = Counter(
            "dongne_seqs_renumbered",
            "Users whose events a commit numbered on from another node's: it had appended to their inboxes first",
            registry=r,
        )
        self.question_conflicts = Counter(
            "dongne_question_conflicts",
            "Commits refused because another node answered, accepted or closed one of their questions first",
            registry=r,
        )
        self.overflows = Counter("dongne_outbound_overflows", "Connections closed as slow consumers (4009)", registry=r)
        self.rate_limit_hits = Counter(
            "dongne_rate_limit_hits", "Requests or connections refused by a limit", ["scope"], registry=r
        )
        self.commit_seconds = Histogram(
            "dongne_store_commit_seconds", "Time to commit one group of writes", buckets=LATENCY_BUCKETS, registry=r
        )
        self.commit_batch = Histogram(
            "dongne_store_commit_batch_outcomes",
            "Requests committed together",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 1000),
            registry=r,
        )
        self.stage_latency = Histogram(
            "dongne_escalation_stage_latency_seconds",
            "From question created to its stage's notifications sent",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_answer = Histogram(
            "dongne_time_to_first_answer_seconds",
            "From question created to its first answer",
            ["region"],
            buckets=ANSWER_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "dongne_request_seconds",
            "From a request read off its socket to its reply written (incl. waiting for its commit), by operation",
            ["op"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._request_children: dict[str, Any] = {}
        self.gc_pauses = Histogram(
            "dongne_gc_pause_seconds",
            "Garbage collections (every task waits), by generation collected",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=r,
        )
        self._gc_children = [self.gc_pauses.labels(str(g)) for g in range(3)]
        r.register(_Gauges(read_gauges))
        self._frames_out_children: dict[str, Any] = {}
        self._frames_in_children: dict[str, Any] = {}
        self._error_children: dict[str, Any] = {}

    def request_counted(self, op: str, error: str | None) -> None:
        """Count a client frame of ``op`` (``""``: none to count) and its error code, if it failed.

        Every request passes here: the label children are cached
        (``labels()`` takes a lock and builds its key on each call).
        """
        if op:
            child = self._frames_in_children.get(op)
            if child is None:
                child = self._frames_in_children[op] = self.frames_in.labels(op)
            child.inc()
        if error is not None:
            child = self._error_children.get(error)
            if child is None:
                child = self._error_children[error] = self.errors.labels(error)
            child.inc()
            if error == "rate_limited":
                self.rate_limit_hits.labels("request").inc()

    def frames_sent(self, frame_type: str, count: int) -> None:
        """Count frames of one type delivered (the hot path: label children are cached)."""
        child = self._frames_out_children.get(frame_type)
        if child is None:
            child = self._frames_out_children[frame_type] = self.frames_out.labels(frame_type)
        child.inc(count)
        self.deliveries.inc(count)

    def request_done(self, op: str, seconds: float) -> None:
        """A request of ``op`` was answered ``seconds`` after it was read (the hot path: children cached)."""
        child = self._request_children.get(op)
        if child is None:
            child = self._request_children[op] = self.request_seconds.labels(op)
        child.observe(seconds)

    def gc_pause(self, generation: int, seconds: float) -> None:
        """One collection of ``generation`` stopped the process for ``seconds``."""
        self._gc_children[generation].observe(seconds)

    def observe(self, metric: str, seconds: float, label: str) -> None:
        if metric == "escalation_stage_latency":
            self.stage_latency.labels(label).observe(seconds)
        elif metric == "time_to_first_answer":
            self.first_answer.labels(label or "none").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def statistics(self) -> ServerStatistics:
        """Traffic so far, read back from this registry."""
        value = self.registry.get_sample_value

        def total(counter: Counter) -> dict[str, float]:
            return {
                ",".join(sample.labels.values()): sample.value
                for family in counter.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
            }

        return ServerStatistics(
            connections_total=int(value("dongne_connections_total") or 0),
            frames_in=int(sum(total(self.frames_in).values())),
            deliveries=int(value("dongne_deliveries_total") or 0),
            slow_consumers=int(value("dongne_outbound_overflows_total") or 0),
            refused_connections=int(value("dongne_rate_limit_hits_total", {"scope": "connection"}) or 0),
            errors={code: int(n) for code, n in total(self.errors).items()},
        )
