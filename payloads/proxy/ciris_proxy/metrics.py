"""Prometheus metrics of the credit gate and the upstreams, at /metrics (internal: the public edge
routes only /health and /v1/*). Labels are outcomes and provider names, never request text."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter("ciris_proxy_requests_total", "Gated requests by kind", ["kind"])  # paid | byok
HOLDS = Counter("ciris_proxy_holds_total", "Billing hold attempts by outcome", ["outcome"])
SETTLED = Counter("ciris_proxy_settled_total", "Holds settled by outcome", ["outcome"])
CAPTURE_RETRIES = Counter("ciris_proxy_capture_retries_total", "Capture attempts that must be retried")
UPSTREAM = Counter("ciris_proxy_upstream_total", "Upstream calls by provider and result", ["provider", "result"])
UPSTREAM_SECONDS = Histogram("ciris_proxy_upstream_seconds", "Upstream call latency by provider", ["provider"])
