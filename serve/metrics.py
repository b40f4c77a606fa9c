"""The server's Prometheus metrics, in a registry of their own (``prometheus_client``), served at ``/metrics``.

- ``fluxrt_requests_total{status}``: image requests answered, by HTTP status
- ``fluxrt_request_duration_seconds``: image requests, arrival to answer (histogram)
- ``fluxrt_stage_duration_seconds{stage}``: per pipeline call, each stage's wall time (clip, t5, transformer,
  vae_decoder, total)
- ``fluxrt_queue_depth``: requests accepted and waiting; ``fluxrt_requests_running``: in the call being made
- ``fluxrt_batch_size``: images per pipeline call (histogram)
- ``fluxrt_errors_total{kind}``: invalid_request, too_large, queue_full, timeout, not_ready, numeric, backend,
  unauthorized, internal
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)
IMAGES = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fluxrt_requests", "image requests answered, by HTTP status", ["status"], registry=r)
        self.duration = Histogram("fluxrt_request_duration_seconds", "image requests, arrival to answer",
                                  buckets=SECONDS, registry=r)
        self.stage_seconds = Histogram("fluxrt_stage_duration_seconds", "per pipeline call, one stage's wall time",
                                       ["stage"], buckets=SECONDS, registry=r)
        self.queue_depth = Gauge("fluxrt_queue_depth", "requests accepted and waiting", registry=r)
        self.running = Gauge("fluxrt_requests_running", "requests in the pipeline call being made", registry=r)
        self.batch_size = Histogram("fluxrt_batch_size", "images per pipeline call", buckets=IMAGES, registry=r)
        self.errors = Counter("fluxrt_errors", "errors answered, by kind", ["kind"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
