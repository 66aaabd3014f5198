"""The ledger's gauges (billing_ledger_verify_ok, billing_negative_balances): verify-ledger in the
background, served the same by every worker, against a real billing with two workers on its own
real PostgreSQL (the ledger is tampered with here, so not the session's cluster)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from components import postgres_config as pgc
from tests.billing.conftest import SERVICE, Billing, new_user, service_env
from tests.postgres.conftest import PRIMARY_ADDR, free_port, init_primary, workspace

INTERVAL = 2  # seconds between checks (production: 300)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """(billing with WORKERS=2 and a short check interval, its cluster, its state directory's parent)."""
    root, tls = workspace()
    db = init_primary(root, tls[PRIMARY_ADDR], replicas=())
    tmp = tmp_path_factory.mktemp("ledger-metrics")
    (tmp / "state").mkdir()
    env = {**service_env(db), "PORT": str(free_port()), "WORKERS": "2", "LEDGER_VERIFY_INTERVAL_SECONDS": str(INTERVAL),
           "TMPDIR": str(tmp / "state")}  # where python -m billing makes its fresh state directory
    service = Billing(env, tmp / "billing.log")
    service.start()
    yield service, db, tmp / "state"
    service.stop()
    db.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


def scrape(service) -> dict[str, float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith(("billing_ledger_", "billing_negative_"))}


def settled(service, after: float, timeout: float = 60) -> dict[str, float]:
    """The gauges of the first check that started after `after` (or failed after it), as every worker
    serves them: a check already running at `after` read the ledger as it was before."""
    deadline = time.time() + timeout
    while True:
        got = scrape(service)
        started = (got.get("billing_ledger_verify_last_run_timestamp_seconds", 0)
                   - got.get("billing_ledger_verify_duration_seconds", 0))
        if max(started, got.get("billing_ledger_verify_last_error_timestamp_seconds", 0)) > after:
            return got
        assert time.time() < deadline, f"no check finished after {after}: {got}"
        time.sleep(0.5)


@pytest.fixture
def su(checked):
    with psycopg.connect(checked[1].conninfo(dbname=pgc.DATABASE), autocommit=True) as conn:
        yield conn


def test_a_clean_ledger_is_ok_on_every_worker(checked):
    service, _, state_parent = checked
    with httpx.Client(base_url=service.url, timeout=30) as api:
        user = new_user(api, 100)
        api.post("/v1/credits/consume", json={"user_id": user, "amount": 7, "idempotency_key": "k"}, headers=SERVICE)
    got = settled(service, time.time())
    assert got["billing_ledger_verify_ok"] == 1 and got["billing_negative_balances"] == 0
    assert 0 < got["billing_ledger_verify_duration_seconds"] < INTERVAL * 5
    # Every worker serves the one shared result: twenty scrapes spread over both agree.
    seen = [scrape(service) for _ in range(20)]
    assert all(s.get("billing_ledger_verify_ok") == 1 for s in seen), seen
    # One check at a time per server: runs come one interval (plus their duration) apart, not one per worker.
    [state_dir] = state_parent.glob("ciris-billing-*")
    first = json.loads((state_dir / "ledger-check.json").read_text())
    time.sleep(INTERVAL * 4)
    runs = json.loads((state_dir / "ledger-check.json").read_text())["runs"] - first["runs"]
    assert 2 <= runs <= 5, runs


def test_a_tampered_row_makes_verify_ok_0(checked, su):
    service = checked[0]
    row = su.execute("SELECT id, amount FROM transactions WHERE type = 'consume' LIMIT 1").fetchone()
    su.execute("SET session_replication_role = replica")  # past the append-only trigger
    su.execute("UPDATE transactions SET amount = -1 WHERE id = %s", (row[0],))
    try:
        got = settled(service, time.time())
        assert got["billing_ledger_verify_ok"] == 0 and got["billing_negative_balances"] == 0
        assert "hash mismatch" in checked[0].log.read_text()
    finally:
        su.execute("UPDATE transactions SET amount = %s WHERE id = %s", (row[1], row[0]))
    assert settled(service, time.time())["billing_ledger_verify_ok"] == 1


def test_a_negative_balance_is_counted(checked, su):
    service = checked[0]
    with httpx.Client(base_url=service.url, timeout=30) as api:
        users = [new_user(api, 10) for _ in range(2)]
    # The CHECK forbids it; an administrator can still drop the CHECK and force one.
    su.execute("ALTER TABLE credit_balances DROP CONSTRAINT credit_balances_balance_check")
    su.execute("UPDATE credit_balances SET balance = -5 WHERE user_id = ANY(%s)", ([uuid.UUID(u) for u in users],))
    try:
        got = settled(service, time.time())
        assert got["billing_negative_balances"] == 2 and got["billing_ledger_verify_ok"] == 0
    finally:
        su.execute("UPDATE credit_balances SET balance = 10 WHERE user_id = ANY(%s)", ([uuid.UUID(u) for u in users],))
        su.execute("ALTER TABLE credit_balances ADD CONSTRAINT credit_balances_balance_check CHECK (balance >= 0)")
    got = settled(service, time.time())
    assert got["billing_negative_balances"] == 0 and got["billing_ledger_verify_ok"] == 1


def test_an_unreadable_database_never_reports_ok(checked):
    service, db, _ = checked
    before = settled(service, time.time())
    assert before["billing_ledger_verify_ok"] == 1
    db.stop("immediate")
    try:
        stopped = time.time()
        deadline = time.time() + 60
        while scrape(service).get("billing_ledger_verify_last_error_timestamp_seconds", 0) <= stopped:
            assert time.time() < deadline, "no failed check reported"
            time.sleep(0.5)
        for _ in range(10):  # on every worker: neither ok nor a count, only the age of the last good check
            got = scrape(service)
            assert "billing_ledger_verify_ok" not in got and "billing_negative_balances" not in got, got
            assert got["billing_ledger_verify_last_run_timestamp_seconds"] <= stopped
    finally:
        db.start()
    assert settled(service, time.time())["billing_ledger_verify_ok"] == 1


def test_one_check_runs_at_a_time(checked, tmp_path):
    """Two checkers sharing a state directory (as two workers do): both due, one runs the real
    verify-ledger, the other finds it running and serves its result."""
    import sys

    from tests.billing.conftest import PAYLOAD

    sys.path.insert(0, str(PAYLOAD))
    from billing import ledger_check

    service = checked[0]
    a, b = (ledger_check.Checker(tmp_path, 60) for _ in range(2))
    assert list(ledger_check.collect(tmp_path)) == []  # before any check: no gauge at all

    async def both():
        return await asyncio.gather(a.check_if_due(), b.check_if_due())

    old = os.environ.copy()
    os.environ.update(service.env)  # the child reads DATABASE_URL ... as a worker's would
    try:
        assert sorted(asyncio.run(both())) == [False, True]
        assert asyncio.run(both()) == [False, False]  # and neither again within the interval
    finally:
        os.environ.clear()
        os.environ.update(old)
    names = {m.name: m.samples[0].value for m in ledger_check.collect(tmp_path)}
    assert names["billing_ledger_verify_ok"] == 1 and names["billing_negative_balances"] == 0


def test_counters_are_every_workers_sum(checked):
    """Two workers, one /metrics: a scrape may reach either, and must count what both did (a
    counter that flips between two workers' values reads to Prometheus as resets and rises that
    never happened: StandInShortfall would fire for as long as the workers live)."""
    service = checked[0]
    with httpx.Client(base_url=service.url, timeout=30) as api:
        user = new_user(api, 100)

        def consumes() -> set[float]:
            values = set()
            for _ in range(12):
                text = httpx.get(f"{service.url}/metrics", timeout=10).text
                values |= {s.value for f in text_string_to_metric_families(text) for s in f.samples
                           if s.name == "billing_consumes_total" and s.labels["outcome"] == "debited"}
            return values

        before = consumes()
        assert len(before) <= 1, before
        for i in range(20):  # new connections: uvicorn's workers share the socket and take them in turn
            r = httpx.post(f"{service.url}/v1/credits/consume", json={"user_id": user, "amount": 1, "idempotency_key": f"w{i}"},
                           headers=SERVICE, timeout=30)
            assert r.status_code == 200, r.text
        assert consumes() == {(before.pop() if before else 0) + 20}
