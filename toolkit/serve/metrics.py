"""GET /metrics: Prometheus text format (prometheus-client), the measures operators of vLLM and TGI scrape.

Counters and histograms are updated as requests finish (`RequestCounter`, an ASGI middleware, counts responses by
endpoint, model and status; the serving core reports tokens and latencies per choice); gauges are read from
`engine.stats` at scrape time (queue depth, running rows, KV cache bytes). Each server has its own registry,
so several servers in one process (tests) do not collide. Names follow Prometheus conventions with a
`toolkit_` prefix; docs/API.md maps them to vLLM's.
"""

from __future__ import annotations

from typing import Any

from toolkit.serve.errors import routes_at

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, engine: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "toolkit_requests",
            "HTTP requests answered, by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("toolkit_prompt_tokens", "Prompt tokens prefilled", ["model"], registry=r)
        self.completion_tokens = Counter(
            "toolkit_generation_tokens", "Tokens generated (stop tokens included)", ["model"], registry=r
        )
        self.ttft = Histogram(
            "toolkit_time_to_first_token_seconds",
            "From submission to the first generated token, per choice",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "toolkit_time_per_output_token_seconds",
            "Time between two generated tokens of a choice",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "toolkit_e2e_choice_latency_seconds",
            "From submission to the engine finishing a choice",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineGauges(engine))

    def prompt(self, model: str, n: int) -> None:
        self.prompt_tokens.labels(model).inc(n)

    def choice_finished(self, s: Any) -> None:  # engine thread or event loop; prometheus-client is thread-safe
        import time

        times = list(s.times)
        self.completion_tokens.labels(s.model).inc(len(times))
        self.e2e.labels(s.model).observe(time.monotonic() - s.submitted)
        if times:
            self.ttft.labels(s.model).observe(times[0] - s.submitted)
            per_token = self.tpot.labels(s.model)
            for a, b in zip(times, times[1:], strict=False):
                per_token.observe(b - a)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineGauges:
    """Gauges read from the engine when scraped (no thread keeps them up to date)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        stats = dict(self.engine.stats)
        waiting = stats.get("waiting", getattr(self.engine, "waiting", 0))
        running = stats.get("running", stats.get("active", 0))
        yield GaugeMetricFamily("toolkit_num_requests_waiting", "Rows queued for the engine", value=waiting)
        yield GaugeMetricFamily("toolkit_num_requests_running", "Rows being decoded", value=running)
        used, budget = stats.get("kv_bytes_used"), stats.get("kv_bytes_budget")
        if used is not None:
            yield GaugeMetricFamily("toolkit_kv_cache_bytes_used", "KV cache bytes held by running rows", value=used)
        if budget is not None:
            yield GaugeMetricFamily("toolkit_kv_cache_bytes_budget", "KV cache budget (--kv-cache-gb)", value=budget)
            if budget:
                yield GaugeMetricFamily(
                    "toolkit_kv_cache_usage_ratio",
                    "KV cache used / budget (vLLM's kv_cache_usage_perc)",
                    value=(used or 0) / budget,
                )


UNMATCHED = "unmatched"  # the endpoint label of a request no route matched (404s must not make a series per path)


def endpoint_label(scope: dict) -> str:
    """The route's path template (`/v1/responses/{response_id}`), never the raw path: a label per response id or per
    mistyped URL would grow the registry without bound. Routing puts the matched route in the scope (405s too:
    the route matched all but the method); a request answered before routing (BodyLimit's 413) is matched here."""
    route = scope.get("route") or next(iter(routes_at(scope)), None)
    return getattr(route, "path_format", None) or UNMATCHED


class RequestCounter:
    """ASGI middleware: counts every /v1/ response by endpoint (the route's path template), model (set by the route
    in request.state) and HTTP status, after the body is sent (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = [500]

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            model = (scope.get("state") or {}).get("model") or ""
            self.metrics.requests.labels(endpoint_label(scope), model, str(status[0])).inc()
