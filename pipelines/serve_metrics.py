"""The ingress's metrics: a Prometheus text endpoint (``GET /metrics`` on the API port, as vLLM and Serve users
scrape) from the ingress replica's own registry, plus the tallies ``/healthz`` reports and the Ray metrics
counters exported by Ray's agent (``ray_crosslayer_requests_total``, ``ray_crosslayer_rejected_requests_total``).

  crosslayer_requests_total{model,status}             chat completion requests by HTTP status (model "unknown"
                                                      until the request names a served model)
  crosslayer_rejected_requests_total{model,reason}    the 4xx answers (and 503 overloaded), by error code
  crosslayer_cancelled_requests_total{model}          clients that went away before their answer ended
  crosslayer_prompt_tokens_total{model}               prompt tokens of accepted requests (image tokens included)
  crosslayer_generated_tokens_total{model}            tokens generated for the clients (EOS included, as usage)
  crosslayer_requests_waiting                         forwarded to a model replica, no token yet (preparing,
                                                      queued for free rows, or in prefill)
  crosslayer_rows_running                             choices decoding
  crosslayer_time_to_first_token_seconds{model}       request arrival -> first token, as this ingress sees it
  crosslayer_inter_token_latency_seconds{model}       between a choice's consecutive tokens, by the engine's clock
  crosslayer_request_latency_seconds{model}           request arrival -> its last event
Every figure covers the requests that went through this ingress replica (one by default), whichever model
replica decoded them.
"""

import time
from collections import Counter

from .serve_api import Delta

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class IngressMetrics:
    """The counters, gauges and histograms of one ingress replica."""

    def __init__(self) -> None:
        import prometheus_client as prom
        from ray.util import metrics as ray_metrics

        self.registry = prom.CollectorRegistry(auto_describe=True)
        reg = {"registry": self.registry}
        self.requests = prom.Counter("crosslayer_requests", "Chat completion requests, by model and HTTP status.",
                                ["model", "status"], **reg)
        self.rejected = prom.Counter("crosslayer_rejected_requests", "Requests refused (4xx: auth, limits, bad input; "
                                "503 overloaded), by model and error code.", ["model", "reason"], **reg)
        self.cancelled = prom.Counter("crosslayer_cancelled_requests", "Requests whose client went away before the end.",
                                 ["model"], **reg)
        self.prompt_tokens = prom.Counter("crosslayer_prompt_tokens", "Prompt tokens of accepted requests.", ["model"],
                                     **reg)
        self.generated = prom.Counter("crosslayer_generated_tokens", "Tokens generated (EOS included).", ["model"], **reg)
        self.waiting = prom.Gauge("crosslayer_requests_waiting", "Requests forwarded to a model replica that have no "
                             "token yet (preparing, queued for free rows, or in prefill).", **reg)
        self.running = prom.Gauge("crosslayer_rows_running", "Choices (batch rows) decoding.", **reg)
        self.ttft = prom.Histogram("crosslayer_time_to_first_token_seconds", "Request arrival to its first token.",
                              ["model"], buckets=TTFT_BUCKETS, **reg)
        self.itl = prom.Histogram("crosslayer_inter_token_latency_seconds", "Time between consecutive tokens of a "
                             "choice (engine clock).", ["model"], buckets=ITL_BUCKETS, **reg)
        self.latency = prom.Histogram("crosslayer_request_latency_seconds", "Request arrival to its last event.",
                                 ["model"], buckets=LATENCY_BUCKETS, **reg)
        self.tally: Counter[str] = Counter()  # "requests", "rejected", "rejected:<reason>", "cancelled" (/healthz)
        self.ray_requests = ray_metrics.Counter("crosslayer_requests_total", tag_keys=("model", "status"),
                                                description="Chat completion requests, by model and HTTP status.")
        self.ray_rejected = ray_metrics.Counter("crosslayer_rejected_requests_total", tag_keys=("model", "reason"),
                                                description="Requests refused (4xx: auth, limits, bad input; "
                                                            "503 overloaded), by model and error code.")

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def answered(self, model: str, status: int) -> None:
        self.tally["requests"] += 1
        self.requests.labels(model, str(status)).inc()
        self.ray_requests.inc(tags={"model": model, "status": str(status)})

    def rejected_as(self, model: str, reason: str) -> None:
        self.tally["rejected"] += 1
        self.tally[f"rejected:{reason}"] += 1
        self.rejected.labels(model, reason).inc()
        self.ray_rejected.inc(tags={"model": model, "reason": reason})

    def track(self, model: str, choices: int, arrived: float) -> "RequestTrack":
        return RequestTrack(self, model, choices, arrived)


class RequestTrack:
    """One request's share of the gauges and histograms; ``close`` (always called) settles the gauges."""

    def __init__(self, metrics: IngressMetrics, model: str, choices: int, arrived: float):
        self.m, self.model, self.choices, self.arrived = metrics, model, choices, arrived
        self.first = False  # a token arrived
        self.tokens: dict[int, int] = {}  # choice -> tokens seen
        self.last: dict[int, float] = {}  # choice -> engine time of its last token
        self.open_rows = 0  # choices counted in crosslayer_rows_running
        self.closed = False
        metrics.waiting.inc()

    def started(self, prompt_tokens: int) -> None:
        self.m.prompt_tokens.labels(self.model).inc(prompt_tokens)

    def delta(self, event: Delta) -> None:
        m = self.m
        if not self.first:
            self.first = True
            m.waiting.dec()
            m.ttft.labels(self.model).observe(time.monotonic() - self.arrived)
            m.running.inc(self.choices)
            self.open_rows = self.choices
        new = event.tokens - self.tokens.get(event.index, 0)
        if new > 0:
            m.generated.labels(self.model).inc(new)
            if event.index in self.last:
                m.itl.labels(self.model).observe(max(0.0, event.time - self.last[event.index]) / new)
            self.tokens[event.index], self.last[event.index] = event.tokens, event.time
        if event.finish_reason is not None and self.open_rows:
            m.running.dec()
            self.open_rows -= 1

    def close(self, cancelled: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        m = self.m
        if not self.first:
            m.waiting.dec()
        if self.open_rows:
            m.running.dec(self.open_rows)
        m.latency.labels(self.model).observe(time.monotonic() - self.arrived)
        if cancelled:
            m.tally["cancelled"] += 1
            m.cancelled.labels(self.model).inc()
