"""Billing on a primary with a synchronous standby, through a two-host DATABASE_URL (as every
region's billing is configured): it follows a promotion by itself, answers 503 `unavailable`
within its write budget instead of hanging, never counts an unconfirmed commit as done, and never
answers a read from a server that cannot write. Real PostgreSQL processes, a real billing process.

BILLING_TEST_WRITE_BUDGET (seconds, default 2) is the billing's DB_WRITE_TIMEOUT_SECONDS here;
BILLING_TEST_OUTAGE (seconds, default 17) how long no member is writable before the promotion."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from components import postgres_config as pgc
from tests.billing.conftest import (ADMIN, KEY_PEM, SERVICE, Billing, Locks, consumes_in_order,  # (puts the payload on sys.path)
                                   database_url, run)
from billing.db import HEALTH_BUDGET, HEALTH_INTERVAL
from tests.postgres.conftest import (PASSWORDS, PRIMARY_ADDR, Cluster, _ppid, free_port, init_primary, start_replica,
                                     workspace)

BUDGET = float(os.environ.get("BILLING_TEST_WRITE_BUDGET", "2"))
MARGIN = 1.5  # an answer within BUDGET + MARGIN counts as "within the budget" on a busy machine
OUTAGE = float(os.environ.get("BILLING_TEST_OUTAGE", "17"))
# /health: a probe at most HEALTH_INTERVAL old, which takes at most its own budget
HEALTH_TAKES = min(HEALTH_BUDGET, BUDGET)
HEALTH_WITHIN = HEALTH_INTERVAL + HEALTH_TAKES + MARGIN


@dataclass
class Pair:
    primary: Cluster
    replica: Cluster
    billing: Billing
    api: httpx.Client


def two_host_url(*members: Cluster) -> str:
    hosts = ",".join(f"{m.addr}:{m.port}" for m in members)
    return (f"postgresql://{pgc.APP_ROLE}:{PASSWORDS[pgc.APP_ROLE]}@{hosts}/{pgc.DATABASE}"
            f"?sslmode=verify-full&sslrootcert={members[0].tls.ca_file}&target_session_attrs=read-write&connect_timeout=1")


def pids(cluster: Cluster) -> list[int]:
    """The postmaster and every process it started (backends, walsender, checkpointer ...)."""
    pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
    return [pid, *(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid)]


def freeze(cluster: Cluster) -> None:
    for p in pids(cluster):
        os.kill(p, signal.SIGSTOP)


def thaw(cluster: Cluster) -> None:
    for p in pids(cluster):
        try:
            os.kill(p, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.fixture
def pair(tmp_path):
    root, tls = workspace()
    primary = init_primary(root, tls[PRIMARY_ADDR])
    replica = start_replica(root, tls, primary)
    env = {**os.environ, "DATABASE_URL": two_host_url(primary, replica), "BILLING_JWT_PRIVATE_KEY": KEY_PEM,
           "DB_WRITE_TIMEOUT_SECONDS": str(BUDGET), "HOST": "127.0.0.1", "PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    billing = Billing(env, tmp_path / "billing.log")
    try:
        billing.start()
        with httpx.Client(base_url=billing.url, timeout=60) as api:
            yield Pair(primary, replica, billing, api)
    finally:
        for c in (replica, primary):
            if (c.data / "postmaster.pid").exists():
                thaw(c)  # a frozen postmaster cannot stop
        try:
            billing.stop()
        finally:
            for c in (replica, primary):
                c.stop("immediate")
            shutil.rmtree(root, ignore_errors=True)


def new_user(api: httpx.Client, credits: int = 100) -> str:
    r = api.post("/v1/users", json={"email": f"{time.time_ns()}@example.org"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    user = r.json()["id"]
    r = api.post("/v1/credits/grant", json={"user_id": user, "amount": credits - r.json()["balance"], "idempotency_key": "top-up",
                                            "reason": "test"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return user


def timed(call, *args, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = call(*args, **kwargs)
    return r, time.monotonic() - started


def consume(api: httpx.Client, user: str, key: str, amount: int = 7) -> tuple[httpx.Response, float]:
    return timed(api.post, "/v1/credits/consume", json={"user_id": user, "amount": amount, "idempotency_key": key}, headers=SERVICE)


def assert_unavailable(r: httpx.Response, *, write: bool) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "unavailable" and int(r.headers["retry-after"]) > 0
    if write:
        assert "outcome is unknown" in error["message"] and "same idempotency key" in error["message"]


def health_becomes(api: httpx.Client, status: int, within: float) -> httpx.Response:
    deadline = time.monotonic() + within
    while True:
        r, took = timed(api.get, "/health")
        assert took < HEALTH_TAKES + MARGIN, f"/health took {took:.1f} s"
        if r.status_code == status:
            return r
        assert time.monotonic() < deadline, f"/health still {r.status_code} after {within:.1f} s: {r.text}"
        time.sleep(0.2)


def debits(cluster: Cluster, user: str, key: str) -> int:
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        return conn.execute("SELECT count(*) FROM transactions WHERE user_id = %s AND idempotency_key = %s", (user, key)).fetchone()[0]


def wait_synchronous(primary: Cluster, within: float = 30) -> None:
    deadline = time.monotonic() + within
    with primary.connect() as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'").fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the standby never became synchronous again"
            time.sleep(0.2)


def writes_resume(api: httpx.Client, user: str, within: float = 20) -> int:
    """Consume once a second-ish until one succeeds; every answer on the way is quick and either 200 or
    503 `unavailable`. Returns how many failed."""
    deadline, failed = time.monotonic() + within, 0
    while True:
        r, took = consume(api, user, f"resume-{time.monotonic_ns()}", amount=1)
        assert took < BUDGET + MARGIN, f"a consume took {took:.1f} s"
        if r.status_code == 200:
            return failed
        assert_unavailable(r, write=True)
        failed += 1
        assert time.monotonic() < deadline, "writes did not resume"
        time.sleep(0.3)


def test_writes_follow_a_promoted_standby_without_a_restart(pair):
    user = new_user(pair.api)
    pid = pair.billing.proc.pid
    pair.primary.stop("immediate")
    # As under an HA engine: the standby is promoted once the dead primary's lease has run out,
    # and meanwhile a write a second gets a quick 503 (long enough for the pool's reconnection
    # attempts to have backed off past the promotion, were they left to back off).
    end = time.monotonic() + OUTAGE
    while time.monotonic() < end:
        r, took = consume(pair.api, user, f"outage-{time.monotonic_ns()}", amount=1)
        assert_unavailable(r, write=True)
        assert took < BUDGET + MARGIN, took
        time.sleep(1)
    pair.replica.promote()
    writes_resume(pair.api, user, within=BUDGET + 3)
    r = pair.api.post("/v1/credits/consume", json={"user_id": user, "amount": 5, "idempotency_key": "on-the-new-primary"}, headers=SERVICE)
    assert r.status_code == 200, r.text
    assert debits(pair.replica, user, "on-the-new-primary") == 1
    r = pair.api.get(f"/v1/credits/{user}", headers=SERVICE)
    assert r.status_code == 200 and r.json()["balance"] == r.json()["balance"] < 100
    assert pair.billing.proc.pid == pid and pair.billing.proc.poll() is None


def test_a_commit_waiting_for_a_lost_standby_answers_503_in_time_and_its_retry_debits_once(pair):
    user = new_user(pair.api)
    pair.replica.stop("immediate")
    r, took = consume(pair.api, user, "while-the-standby-is-away")
    assert_unavailable(r, write=True)
    assert BUDGET - 0.2 < took < BUDGET + MARGIN, took
    r = health_becomes(pair.api, 503, HEALTH_WITHIN)
    assert r.json()["status"] == "unhealthy" and "did not confirm" in r.json()["database"]
    # A write in a transaction block (users, Stripe webhooks): its COMMIT waits the same way.
    r, took = timed(pair.api.post, "/v1/users", json={"email": "while-away@example.org"}, headers=ADMIN)
    assert_unavailable(r, write=True)
    assert took < BUDGET + MARGIN, took
    # Reads wait for a commit too (the fence): no answer the database has not confirmed.
    r, took = timed(pair.api.get, f"/v1/credits/{user}", headers=SERVICE)
    assert_unavailable(r, write=False)
    assert took < BUDGET + MARGIN
    pair.replica.start()
    wait_synchronous(pair.primary)
    health_becomes(pair.api, 200, HEALTH_WITHIN + 5)
    r, _ = consume(pair.api, user, "while-the-standby-is-away")  # the client's retry, same key
    assert r.status_code == 200, r.text
    assert debits(pair.primary, user, "while-the-standby-is-away") == 1
    assert pair.api.get(f"/v1/credits/{user}", headers=SERVICE).json()["balance"] == 93


def test_a_cancelled_commit_wait_is_an_unknown_outcome_not_a_success(pair):
    """PostgreSQL ends a cancelled synchronous commit wait with a WARNING and commits locally: the
    call looks successful, but that commit was never confirmed by the standby."""
    user = new_user(pair.api)
    pair.replica.stop("immediate")
    answer: list = []
    request = threading.Thread(target=lambda: answer.append(consume(pair.api, user, "cancelled-wait")))
    request.start()
    with pair.primary.connect() as su:
        deadline = time.monotonic() + BUDGET
        while not su.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
                             "AND query LIKE '%billing_move%'").fetchall():
            assert time.monotonic() < deadline, "the consume never waited for the standby"
            time.sleep(0.02)
    request.join(BUDGET + MARGIN)
    r, took = answer[0]
    assert_unavailable(r, write=True)
    assert took < BUDGET - 0.2, f"{took:.2f} s: the deadline answered, not the warning"
    pair.replica.start()
    wait_synchronous(pair.primary)
    r, _ = consume(pair.api, user, "cancelled-wait")
    assert r.status_code == 200 and r.json()["replayed"] is True, r.text  # it had committed, unconfirmed
    assert debits(pair.primary, user, "cancelled-wait") == 1


def test_a_frozen_primary_answers_503_within_the_budget_and_recovers_when_thawed(pair):
    user = new_user(pair.api)
    freeze(pair.primary)
    try:
        r, took = consume(pair.api, user, "frozen")
        assert_unavailable(r, write=True)
        assert took < BUDGET + MARGIN, took
        r, took = timed(pair.api.get, f"/v1/credits/{user}", headers=SERVICE)
        assert_unavailable(r, write=False)
        assert took < BUDGET + MARGIN, took
        health_becomes(pair.api, 503, HEALTH_WITHIN)
        r, took = consume(pair.api, user, "frozen")  # pool drained, new connections cannot reach a writable member
        assert_unavailable(r, write=True)
        assert took < BUDGET + MARGIN, took
    finally:
        thaw(pair.primary)
    writes_resume(pair.api, user)
    health_becomes(pair.api, 200, HEALTH_WITHIN + 5)
    r, _ = consume(pair.api, user, "frozen")
    assert r.status_code == 200, r.text
    assert debits(pair.primary, user, "frozen") == 1


def test_a_burst_of_consumes_at_a_frozen_primary_all_answer_503_in_time_and_each_retry_debits_once(pair):
    """What clients see of a frozen region's database under load: the consumes in the database and
    the ones queued behind them (batches.py) all answer 503 within the budget, none hangs."""
    users = [new_user(pair.api) for _ in range(4)]
    bodies = [{"user_id": users[i % 4], "amount": 3, "idempotency_key": f"burst-{i}"} for i in range(24)]

    async def burst():
        async with httpx.AsyncClient(base_url=pair.billing.url, timeout=60) as client:
            async def one(body):
                started = time.monotonic()
                r = await client.post("/v1/credits/consume", json=body, headers=SERVICE)
                return r, time.monotonic() - started
            return await asyncio.gather(*(one(b) for b in bodies))

    freeze(pair.primary)
    try:
        answers = run(burst())
    finally:
        thaw(pair.primary)
    for r, took in answers:
        assert_unavailable(r, write=False)  # outcome unknown (sent) or nothing charged (never sent)
        assert took < BUDGET + MARGIN, took
    writes_resume(pair.api, users[0])
    for body in bodies:
        assert pair.api.post("/v1/credits/consume", json=body, headers=SERVICE).status_code == 200
    assert [debits(pair.primary, b["user_id"], b["idempotency_key"]) for b in bodies] == [1] * 24


def test_a_batch_in_flight_when_the_standby_is_lost_answers_503_to_all_and_their_retries_debit_once(pair, tmp_path):
    """A batch's shared commit waiting for a standby that is gone: every consume in it gets the
    unknown-outcome 503 within the budget; the retries with the same keys debit each exactly once."""
    billing = Billing({**pair.billing.env, "PORT": str(free_port()), "CONSUME_BATCHES": "1"}, tmp_path / "one-batch.log")
    billing.start()
    try:
        first, *batched = (new_user(pair.api) for _ in range(3))
        bodies = [{"user_id": u, "amount": 5, "idempotency_key": f"lost-{i}"} for i, u in enumerate([first, *batched])]

        async def scenario():
            with Locks(database_url(pair.primary)) as locks, pair.primary.connect() as su:
                locks.insert(first)  # the first consume waits in the database; the other two queue behind it
                sent = await consumes_in_order(billing.url, bodies)
                pair.replica.stop("immediate")
                # The first consume ends (cancelled: 503); the queued two go as one batch, whose
                # commit now waits for the standby until the budget runs out.
                assert su.execute("SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND query LIKE '%billing_move%'").fetchone()[0] == 1
                started = time.monotonic()
                answers = await asyncio.wait_for(asyncio.gather(*sent), BUDGET + 10)
                return answers, time.monotonic() - started

        answers, took = run(scenario())
        for r in answers:
            assert_unavailable(r, write=True)
        assert took < BUDGET + MARGIN, took
        with pair.primary.connect(dbname=pgc.DATABASE) as conn:  # the two shared one commit, local and unconfirmed
            assert conn.execute("SELECT count(*), count(DISTINCT xmin::text) FROM transactions "
                                "WHERE idempotency_key IN ('lost-1', 'lost-2')").fetchone() == (2, 1)
        pair.replica.start()
        wait_synchronous(pair.primary)
        with httpx.Client(base_url=billing.url, timeout=60) as api:
            retries = [api.post("/v1/credits/consume", json=body, headers=SERVICE) for body in bodies]
        assert [r.status_code for r in retries] == [200] * 3, [r.text for r in retries]
        assert [r.json()["replayed"] for r in retries[1:]] == [True, True]
        assert [debits(pair.primary, b["user_id"], b["idempotency_key"]) for b in bodies] == [1, 1, 1]
    finally:
        billing.stop()


def test_a_read_only_server_gets_503_on_health_writes_and_reads_then_recovers(pair):
    user = new_user(pair.api)
    with pair.primary.connect() as su:
        su.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        su.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)  # the pool's open connections pick the setting up at their next statement
    r = health_becomes(pair.api, 503, HEALTH_WITHIN)
    assert r.json()["database"] in ("the database is read-only", "no connection to a writable database")
    r, took = consume(pair.api, user, "read-only")
    assert_unavailable(r, write=True)
    assert took < BUDGET + MARGIN
    r, took = timed(pair.api.get, f"/v1/credits/{user}", headers=SERVICE)
    assert_unavailable(r, write=False)
    assert debits(pair.primary, user, "read-only") == 0
    with pair.primary.connect() as su:
        su.execute("ALTER SYSTEM RESET default_transaction_read_only")
        su.execute("SELECT pg_reload_conf()")
    writes_resume(pair.api, user)
    health_becomes(pair.api, 200, HEALTH_WITHIN)
    assert pair.api.get(f"/v1/credits/{user}", headers=SERVICE).status_code == 200


def test_an_old_primary_thawed_after_a_promotion_never_serves_its_stale_balance(pair, tmp_path):
    """The old primary, frozen through a failover, thaws still believing it is primary (until its HA
    engine demotes it). A billing that connects to it first (its own region's member) must not
    answer a balance from it: its reads' fence cannot commit without the standby, now primary."""
    user = new_user(pair.api)
    freeze(pair.primary)
    pair.replica.promote()
    writes_resume(pair.api, user)  # through the promoted standby
    r = pair.api.post("/v1/credits/consume", json={"user_id": user, "amount": 20, "idempotency_key": "after-failover"}, headers=SERVICE)
    assert r.status_code == 200, r.text
    current = r.json()["balance"]
    pair.billing.stop()
    thaw(pair.primary)
    # A fresh billing (as after a restart): its first member is the thawed old primary, still read-write.
    fresh = Billing({**pair.billing.env, "PORT": str(free_port())}, tmp_path / "fresh.log")
    try:
        fresh.start(healthy=False)
        with httpx.Client(base_url=fresh.url, timeout=60) as api:
            for _ in range(3):
                r, took = timed(api.get, f"/v1/credits/{user}", headers=SERVICE)
                assert r.status_code == 503 or r.json()["balance"] == current, r.text  # never the stale one
                assert_unavailable(r, write=False)  # all its connections are to the old primary
                assert took < BUDGET + MARGIN, took
            r = health_becomes(api, 503, HEALTH_WITHIN)
            assert "did not confirm" in r.json()["database"]
    finally:
        fresh.stop()
