"""Consumes that arrive while a batch is in the database commit together (batches.py,
migrations/0006): each keeps its own answer, the commit is shared, nothing is lost or doubled when
that commit fails. A row held locked from the test decides what is in flight and what queues."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx
import psycopg
import pytest

from tests.billing.conftest import SERVICE, Billing, balance, database_url, new_user, service_env
from tests.postgres.conftest import free_port

from billing import chain  # noqa: E402 (the payload's modules: tests.billing.conftest puts them on the path)


@pytest.fixture
def one_batch(cluster, tmp_path):
    """A billing that keeps one batch in the database at a time (one worker), 1.5 s write budget."""
    service = Billing({**service_env(cluster), "PORT": str(free_port()), "WORKERS": "1", "CONSUME_BATCHES": "1",
                       "DB_WRITE_TIMEOUT_SECONDS": "1.5"}, tmp_path / "billing.log")
    service.start()
    yield service
    service.stop()


@contextlib.contextmanager
def locked(cluster, *users: str):
    """Each user's balance row locked, as a movement in progress would hold it; released on exit."""
    with psycopg.connect(database_url(cluster)) as conn:
        for user in users:
            conn.execute("SELECT 1 FROM credit_balances WHERE user_id = %s FOR UPDATE", (user,))
        yield
        conn.rollback()


async def consumes_in_order(url: str, bodies: list[dict], gap: float = 0.05) -> list[httpx.Response]:
    """Sent `gap` apart, so they reach billing in this order; answered whenever billing answers."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        tasks = []
        for body in bodies:
            tasks.append(asyncio.ensure_future(client.post("/v1/credits/consume", json=body, headers=SERVICE)))
            await asyncio.sleep(gap)
        return await asyncio.gather(*tasks)


def run(coro):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def xmins(cluster, keys: list[str]) -> dict[str, int]:
    """The transaction that wrote each key's ledger row."""
    with psycopg.connect(database_url(cluster)) as conn:
        rows = conn.execute("SELECT idempotency_key, xmin::text::bigint FROM transactions WHERE idempotency_key = ANY(%s)", (keys,))
        return dict(rows.fetchall())


def test_a_batch_commits_together_and_answers_each_consume_its_own_outcome(cluster, one_batch):
    with httpx.Client(base_url=one_batch.url, timeout=30) as api:
        first, rich, poor = new_user(api, 100), new_user(api, 100), new_user(api, 3)
        tag = uuid.uuid4().hex[:8]
        bodies = [
            {"user_id": first, "amount": 1, "idempotency_key": f"{tag}-alone"},  # in the database alone, waiting for the lock
            {"user_id": rich, "amount": 5, "idempotency_key": f"{tag}-a"},       # queued from here on: one batch
            {"user_id": rich, "amount": 5, "idempotency_key": f"{tag}-a"},       # its twin in the same batch: replayed
            {"user_id": rich, "amount": 6, "idempotency_key": f"{tag}-a"},       # the same key for another amount
            {"user_id": poor, "amount": 5, "idempotency_key": f"{tag}-p"},       # more than the balance
            {"user_id": str(uuid.uuid4()), "amount": 1, "idempotency_key": f"{tag}-u"},  # nobody
            {"user_id": rich, "amount": 7, "idempotency_key": f"{tag}-b"},
            {"user_id": first, "amount": 2, "idempotency_key": f"{tag}-first-again"},
        ]

        async def scenario():
            with locked(cluster, first):
                sent = asyncio.ensure_future(consumes_in_order(one_batch.url, bodies))
                await asyncio.sleep(len(bodies) * 0.05 + 0.3)
                assert not sent.done()  # all of them wait behind the lock
            return await sent

        results = run(scenario())
        assert [r.status_code for r in results] == [200, 200, 200, 409, 402, 404, 200, 200], [r.text for r in results]
        alone, a, twin, _, short, _, b, again = (r.json() for r in results)
        assert twin == {**a, "replayed": True} and not a["replayed"] and not b["replayed"]
        assert short["error"]["balance"] == 3
        assert (a["balance"], b["balance"]) == (95, 88)
        assert (alone["balance"], again["balance"]) == (99, 97)
        assert balance(api, rich) == 88 and balance(api, poor) == 3 and balance(api, first) == 97

    written = xmins(cluster, [f"{tag}-{k}" for k in ("alone", "a", "b", "first-again")])
    assert written[f"{tag}-a"] == written[f"{tag}-b"] == written[f"{tag}-first-again"]  # one transaction
    assert written[f"{tag}-alone"] != written[f"{tag}-a"]
    assert one_batch.run("verify-ledger").returncode == 0


def test_a_batch_whose_commit_is_not_confirmed_answers_503_to_all_and_the_retry_debits_once(cluster, one_batch):
    with httpx.Client(base_url=one_batch.url, timeout=30) as api:
        first, free, stuck = new_user(api, 100), new_user(api, 100), new_user(api, 100)
        tag = uuid.uuid4().hex[:8]
        batch = [{"user_id": free, "amount": 4, "idempotency_key": f"{tag}-free"},
                 {"user_id": stuck, "amount": 4, "idempotency_key": f"{tag}-stuck"}]

        async def scenario():
            with locked(cluster, stuck):
                with locked(cluster, first):
                    sent = asyncio.ensure_future(consumes_in_order(
                        one_batch.url, [{"user_id": first, "amount": 1, "idempotency_key": f"{tag}-first"}, *batch]))
                    await asyncio.sleep(0.4)
                # `first` is through; the batch now waits for `stuck` past the 1.5 s budget.
                await asyncio.sleep(2.0)
                return await sent

        results = run(scenario())
        assert [r.status_code for r in results] == [200, 503, 503], [r.text for r in results]
        assert all(r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"] for r in results[1:])
        assert balance(api, free) == 100 and balance(api, stuck) == 100  # the shared commit never happened

        retried = [api.post("/v1/credits/consume", json=body, headers=SERVICE) for body in batch * 2]
        assert [r.status_code for r in retried] == [200] * 4
        assert [r.json()["replayed"] for r in retried] == [False, False, True, True]
        assert balance(api, free) == 96 and balance(api, stuck) == 96
    assert one_batch.run("verify-ledger").returncode == 0


def test_a_batch_locks_its_users_in_one_order_and_keeps_each_users_order(cluster):
    """Two batches locking the same users in opposite orders would deadlock; the function takes
    them in user id order whatever the arrival order, and a user's own consumes in arrival order."""
    low, high = sorted(uuid.uuid4() for _ in range(2))
    tag = uuid.uuid4().hex[:8]
    with psycopg.connect(database_url(cluster), autocommit=True) as conn:
        for user in (low, high):
            conn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (user, f"{user.hex[:12]}@example.org"))
            conn.execute("INSERT INTO credit_balances (user_id, balance, settled, last_seq, last_hash) VALUES (%s, 0, 0, 0, %s)",
                         (user, chain.GENESIS))
            conn.execute("SELECT billing_move(%s, 'grant', 100, 'seed', 'x', 'seed')", (user,))
        keys = [f"{tag}-h1", f"{tag}-l1", f"{tag}-h2", f"{tag}-l2"]
        rows = conn.execute("SELECT i, outcome, transaction_id FROM billing_move_many(%s, %s, %s, %s, %s)",
                            ([high, low, high, low], [1, 2, 3, 4], keys, ["r"] * 4, [None] * 4)).fetchall()
    assert [r[1] for r in rows] == ["done"] * 4
    ids = {keys[i - 1]: tx for i, _, tx in rows}
    assert ids[f"{tag}-l1"] < ids[f"{tag}-l2"] < ids[f"{tag}-h1"] < ids[f"{tag}-h2"]


def test_concurrent_consumes_share_commits(cluster, billing):
    """The shipped defaults under a burst: fewer transactions than consumes, every one debited once."""
    with httpx.Client(base_url=billing.url, timeout=30) as api:
        users = [new_user(api, 1000) for _ in range(20)]
    tag = uuid.uuid4().hex[:8]
    bodies = [{"user_id": users[i % 20], "amount": 1, "idempotency_key": f"{tag}-{i}"} for i in range(200)]

    async def burst():
        async with httpx.AsyncClient(base_url=billing.url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post("/v1/credits/consume", json=b, headers=SERVICE) for b in bodies))

    results = run(burst())
    assert {r.status_code for r in results} == {200} and not any(r.json()["replayed"] for r in results)
    written = xmins(cluster, [b["idempotency_key"] for b in bodies])
    commits = len(set(written.values()))
    assert len(written) == 200 and commits < 200, commits  # one commit per consume without batches
