"""The service's Prometheus metrics (GET /metrics)."""

from __future__ import annotations


class ServiceMetrics:
    """Prometheus metrics in a registry of their own (one per app, so in-process tests do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("moderation_requests", "POST /v1/moderations requests by HTTP status.",
                                ["code"], registry=self.registry)
        self.latency = Histogram(
            "moderation_request_duration_seconds", "Time from request to response, POST /v1/moderations.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry,
        )
        self.inputs = Counter("moderation_inputs", "Texts scored.", registry=self.registry)
        self.batch_texts = Histogram("moderation_batch_size", "Texts per batch scored in one call to the model.",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.batch_requests = Histogram("moderation_batch_requests", "Requests gathered into one batch.",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_seconds = Histogram(
            "moderation_batch_duration_seconds", "Model time per batch.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        )
        self.batch_failures = Counter("moderation_batch_failures", "Batches whose scoring raised.", registry=self.registry)
        self.queued = Gauge("moderation_queued_requests", "Requests waiting for, or in, a batch.", registry=self.registry)
        self.auth_refusals = Counter("moderation_auth_refusals", "Requests refused for a missing or wrong API key.",
                                     ["reason"], registry=self.registry)
        self.ready = Gauge("moderation_ready", "1 once the model is loaded and warmed up.", registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
