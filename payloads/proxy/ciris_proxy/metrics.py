"""Prometheus metrics of the credit gate and the upstreams, at /metrics (internal: the public edge
routes only /health and /v1/*). Labels are outcomes and provider names, never request text."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("ciris_proxy_requests_total", "Gated requests by kind", ["kind"])  # paid | byok
HOLDS = Counter("ciris_proxy_holds_total", "Billing hold attempts by outcome", ["outcome"])
SETTLED = Counter("ciris_proxy_settled_total", "Holds settled by outcome", ["outcome"])
CAPTURE_RETRIES = Counter("ciris_proxy_capture_retries_total", "Capture attempts that must be retried")
CALL_LOG_FAILURES = Counter("ciris_proxy_call_log_failures_total", "Call log lines that could not be written (audit only)")
UPSTREAM = Counter("ciris_proxy_upstream_total", "Upstream calls by provider and result", ["provider", "result"])
UPSTREAM_SECONDS = Histogram("ciris_proxy_upstream_seconds", "Upstream call latency by provider", ["provider"])

# Stand-in authorisation while billing cannot write (gate.py, README "Proxy": stand-in).
STANDIN = Counter("ciris_proxy_standin_total", "Stand-in decisions while billing could not place a hold",
                  ["outcome"])  # authorised | over_user_cap | over_instance_cap | no_recent_balance
STANDIN_ACTIVE = Gauge("ciris_proxy_standin_active", "1 while billing cannot place holds and the proxy stands in")
STANDIN_EXPOSURE = Gauge("ciris_proxy_standin_exposure_cents", "Cents authorised on stand-in not yet debited by billing")
OWED = Gauge("ciris_proxy_owed", "Journal entries billing has not confirmed yet, by kind", ["kind"])  # capture | advice | release
FORCED_SHORTFALL = Counter("ciris_proxy_forced_debit_shortfall_cents_total",
                           "Cents of answered calls billing could not take (the balance had reached zero)")

# One charge per agent interaction (gate.py, README "Proxy": interactions).
INTERACTION_CALLS = Counter("ciris_proxy_interaction_calls_total", "Paid calls by how billing was involved",
                            ["kind"])  # single (no interaction_id) | first (its window's charge) | followup (no billing)
WINDOWS = Counter("ciris_proxy_interaction_windows_total", "Interaction window keys met at billing by outcome",
                  ["outcome"])  # placed | joined (another region's or process's) | skipped (released, past, void) | stood_in
