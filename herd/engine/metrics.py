"""The engine's Prometheus metrics, in a registry of its own (one per engine)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class EngineMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("herd_requests", "Requests finished, by finish reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("herd_prompt_tokens", "Prompt tokens prefilled (reused prefixes not counted)", registry=r)
        self.prefix_reused = Counter("herd_prefix_reused_tokens", "Prompt tokens taken from a cached prefix", registry=r)
        self.generation_tokens = Counter("herd_generation_tokens", "Tokens generated", registry=r)
        self.draft_tokens = Counter("herd_draft_tokens", "Tokens drafted for speculative decoding", registry=r)
        self.draft_accepted = Counter("herd_draft_accepted_tokens", "Drafted tokens the model accepted", registry=r)
        self.verify_steps = Counter("herd_verify_steps", "Forward passes that verified drafts", registry=r)
        self.queue_depth = Gauge("herd_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("herd_running_requests", "Requests holding a slot", registry=r)
        self.batch_size = Histogram("herd_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS, registry=r)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "From submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("herd_time_per_output_token_seconds", "Between two tokens of a request",
                                       buckets=LATENCY_BUCKETS, registry=r)

    def finished(self, reason: str) -> None:
        self.requests.labels(finish_reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)
