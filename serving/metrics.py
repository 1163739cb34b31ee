"""Prometheus metrics of the service, in a registry of its own (so that several apps in one process, as in tests,
do not collide, and nothing else's metrics leak into ours).

Under ``bentoml serve`` the worker processes get ``PROMETHEUS_MULTIPROC_DIR``; prometheus_client then keeps every
value in a per-process file, and `ServingMetrics.exposition` aggregates the files of all workers (BentoML's own
metrics included), so a scrape of any worker sees the whole server.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

NAMESPACE = "sessionrec"
#: Latency buckets (seconds) around the 50 ms budget.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram(
            "request_latency_seconds", "Time to answer a request", ["endpoint", "variant"],
            namespace=NAMESPACE, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "requests", "Requests answered, by status code", ["endpoint", "status"],
            namespace=NAMESPACE, registry=r,
        )
        self.fallbacks = Counter(
            "fallbacks", "Responses served by a fallback", ["reason", "variant"], namespace=NAMESPACE, registry=r
        )
        self.errors = Counter(
            "errors", "Failures absorbed without an error response (model, store, log)", ["kind"],
            namespace=NAMESPACE, registry=r,
        )
        self.model_info = Gauge(
            "model_info", "1 for the model version served under each alias", ["alias", "name", "version"],
            namespace=NAMESPACE, registry=r, multiprocess_mode="mostrecent",
        )
        self.candidate_recall = Gauge(
            "candidate_index_recall", "ANN recall@100 vs exact measured at load (1 for an exact index)", ["alias"],
            namespace=NAMESPACE, registry=r, multiprocess_mode="mostrecent",
        )
        self.registry_up = Gauge(
            "registry_up", "1 when the last registry poll succeeded", namespace=NAMESPACE, registry=r,
            multiprocess_mode="mostrecent",
        )
        self.store_sessions = Gauge(
            "session_store_sessions", "Live sessions in the session store", namespace=NAMESPACE, registry=r,
            multiprocess_mode="mostrecent",
        )
        self.canary_share = Gauge(
            "canary_share", "Share of sessions routed to the challenger", namespace=NAMESPACE, registry=r,
            multiprocess_mode="mostrecent",
        )
        self.shadow_enabled = Gauge(
            "shadow_enabled", "1 when the challenger shadows champion traffic", namespace=NAMESPACE, registry=r,
            multiprocess_mode="mostrecent",
        )
        self.rollbacks = Counter(
            "canary_rollbacks", "Canaries stopped by the rollback guard", namespace=NAMESPACE, registry=r
        )
        self.shadow_dropped = Counter(
            "shadow_dropped", "Shadow scorings skipped because too many were in flight",
            namespace=NAMESPACE, registry=r,
        )

    def set_model(self, alias: str, name: str, version: str, previous: tuple[str, str] | None) -> None:
        if previous is not None:
            self.model_info.labels(alias, *previous).set(0)
        self.model_info.labels(alias, name, version).set(1)

    def exposition(self) -> tuple[bytes, str]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            aggregate = CollectorRegistry()
            MultiProcessCollector(aggregate)
            return generate_latest(aggregate), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
