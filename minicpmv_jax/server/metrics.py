"""The server's Prometheus metrics, served at ``GET /metrics``.

Each :class:`Metrics` has its own ``prometheus_client`` registry (not the process-wide one), so that
several servers can live in one process. It is also the engine's observer: the engine thread reports
each token's latency to it (:meth:`Metrics.first_token`, :meth:`Metrics.token`).

==========================================================  =====================================================
``minicpmv_queue_length``                                    requests waiting for a decode slot (read at scrape)
``minicpmv_running_slots``                                   slots generating or being prefilled (read at scrape)
``minicpmv_generated_tokens_total``                          tokens generated
``minicpmv_http_requests_total{endpoint, status}``           HTTP requests answered, by endpoint and status code
``minicpmv_completions_total{finish_reason}``                engine requests (one per choice) ended: stop, length,
                                                             cancelled (client gone), error
``minicpmv_time_to_first_token_seconds``                     histogram: submission → first token (queue included)
``minicpmv_time_per_output_token_seconds``                   histogram: between two tokens of one request
``minicpmv_request_duration_seconds``                        histogram: submission → end, per engine request
==========================================================  =====================================================
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

#: The ``Content-Type`` of :meth:`Metrics.render`'s text.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Metrics:
    """The metrics of one server (see the module docstring), in :attr:`registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("minicpmv_queue_length", "Requests waiting for a decode slot", registry=r)
        self.running_slots = Gauge("minicpmv_running_slots", "Decode slots generating or being prefilled",
                                   registry=r)
        self.generated_tokens = Counter("minicpmv_generated_tokens", "Tokens generated", registry=r)
        self.http_requests = Counter("minicpmv_http_requests", "HTTP requests answered", ["endpoint", "status"],
                                     registry=r)
        self.completions = Counter("minicpmv_completions", "Engine requests (one per choice) ended",
                                   ["finish_reason"], registry=r)
        self.ttft = Histogram("minicpmv_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("minicpmv_time_per_output_token_seconds", "Time between two tokens of a request",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("minicpmv_request_duration_seconds", "Time from submission to the end of an "
                                  "engine request", buckets=_DURATION_BUCKETS, registry=r)

    def watch(self, engine) -> None:
        """Reads the queue length and running slots from ``engine.stats()`` at every scrape."""
        self.queue_length.set_function(lambda: engine.stats().queued)
        self.running_slots.set_function(lambda: engine.stats().running)

    # ------------------------------------------------------------------ the engine's observer

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated_tokens.inc()

    def token(self, seconds: float) -> None:
        self.tpot.observe(seconds)
        self.generated_tokens.inc()

    def finished(self, handle) -> None:
        """Nothing: the server counts each request where it knows how it ended (:meth:`request_ended`),
        the engine only when a slot ends."""

    # ------------------------------------------------------------------ the server's side

    def request_ended(self, reason: str, seconds: float) -> None:
        """One engine request ended (``reason``: stop, length, cancelled or error) after ``seconds``."""
        self.completions.labels(reason).inc()
        self.duration.observe(seconds)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
