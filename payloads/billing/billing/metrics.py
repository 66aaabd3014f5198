"""Prometheus metrics (FSD §9: requests/second, credit operations, webhook outcomes). Labels are
route templates and outcome codes only: never a user id, key or amount.

Several uvicorn workers serve one /metrics, and a scrape reaches any one of them: each worker's
values alone would read as counters that jump and reset. So `python -m billing` runs them in
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a fresh directory per start):
each worker writes its values to its own file there, and a scrape sums every worker's."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from billing import ledger_check

REGISTRY = CollectorRegistry()
REQUESTS = Histogram("billing_request_seconds", "Request latency by route template and status", ["route", "method", "status"], registry=REGISTRY)
CONSUMES = Counter("billing_consumes_total", "Consume requests by outcome", ["outcome"], registry=REGISTRY)
WEBHOOKS = Counter("billing_webhook_events_total", "Stripe webhook deliveries by event type and outcome", ["type", "outcome"], registry=REGISTRY)
FORCED = Counter("billing_forced_debits_total", "Forced debits (answered calls charged late) by kind and outcome", ["kind", "outcome"], registry=REGISTRY)
FORCED_SHORTFALL = Counter("billing_forced_debit_shortfall_cents_total", "Cents forced debits could not take (the balance reached zero)", registry=REGISTRY)
REFUND_SHORTFALL = Counter("billing_refund_shortfall_cents_total", "Refunded credits that could not be taken back (already spent)", registry=REGISTRY)


class _Ledger:
    """The background ledger check's gauges, read from the server's shared state at each scrape
    (ledger_check.py); none before create_app names the state directory."""

    state_dir: Path | None = None

    def collect(self):
        return ledger_check.collect(self.state_dir) if self.state_dir else iter(())


LEDGER = _Ledger()
REGISTRY.register(LEDGER)


def exposition() -> bytes:
    """The scrape's text: every worker's values summed (or this process's alone, outside
    `python -m billing`), and the ledger check's gauges."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(LEDGER)
    return generate_latest(registry)

_children: dict[tuple, object] = {}  # labels() takes a lock and builds a key each call: once per label set


def _child(metric, *labels: str):
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def observe(route: str, method: str, status: int, seconds: float) -> None:
    _child(REQUESTS, route, method, str(status)).observe(seconds)


def consumed(outcome: str) -> None:
    _child(CONSUMES, outcome).inc()


def forced(kind: str, shortfall: int, replayed: bool) -> None:
    if replayed:
        _child(FORCED, kind, "replayed").inc()
        return
    _child(FORCED, kind, "short" if shortfall else "taken").inc()
    if shortfall:
        FORCED_SHORTFALL.inc(shortfall)
