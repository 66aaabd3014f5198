"""Consumes that arrive while a batch is in the database commit together (batches.py,
migrations/0006): each keeps its own answer, the commit is shared, nothing is lost or doubled when
that commit fails. A row held locked from the test decides what is in flight and what queues."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import psycopg
import pytest

from tests.billing.conftest import SERVICE, Billing, Locks, balance, consumes_in_order, database_url, new_user, run, service_env
from tests.postgres.conftest import free_port

from billing import chain  # noqa: E402 (the payload's modules: tests.billing.conftest puts them on the path)


@pytest.fixture
def one_worker(cluster, tmp_path):
    """start(budget): a billing that keeps one batch in the database at a time (one worker)."""
    started = []

    def start(budget: float) -> Billing:
        service = Billing({**service_env(cluster), "PORT": str(free_port()), "WORKERS": "1", "CONSUME_BATCHES": "1",
                           "DB_WRITE_TIMEOUT_SECONDS": str(budget)}, tmp_path / f"billing{len(started)}.log")
        started.append(service)
        service.start()
        return service

    yield start
    for service in started:
        service.stop()


def xmins(cluster, keys: list[str]) -> dict[str, int]:
    """The transaction that wrote each key's ledger row."""
    with psycopg.connect(database_url(cluster)) as conn:
        rows = conn.execute("SELECT idempotency_key, xmin::text::bigint FROM transactions WHERE idempotency_key = ANY(%s)", (keys,))
        return dict(rows.fetchall())


def test_a_batch_commits_together_and_answers_each_consume_its_own_outcome(cluster, one_worker):
    billing = one_worker(10)
    with httpx.Client(base_url=billing.url, timeout=30) as api:
        first, rich, poor = new_user(api, 100), new_user(api, 100), new_user(api, 3)
    tag = uuid.uuid4().hex[:8]
    bodies = [
        {"user_id": first, "amount": 1, "idempotency_key": f"{tag}-alone"},  # in the database alone, held up
        {"user_id": rich, "amount": 5, "idempotency_key": f"{tag}-a"},       # queued from here on: one batch
        {"user_id": rich, "amount": 5, "idempotency_key": f"{tag}-a"},       # its twin in the same batch: replayed
        {"user_id": rich, "amount": 6, "idempotency_key": f"{tag}-a"},       # the same key for another amount
        {"user_id": poor, "amount": 5, "idempotency_key": f"{tag}-p"},       # more than the balance
        {"user_id": str(uuid.uuid4()), "amount": 1, "idempotency_key": f"{tag}-u"},  # nobody
        {"user_id": rich, "amount": 7, "idempotency_key": f"{tag}-b"},
        {"user_id": first, "amount": 2, "idempotency_key": f"{tag}-first-again"},
    ]

    async def scenario():
        with Locks(database_url(cluster)) as locks:
            locks.insert(first)
            sent = await consumes_in_order(billing.url, bodies)
            await asyncio.sleep(1.0)
            assert not any(t.done() for t in sent)  # all of them wait behind the first
        return await asyncio.gather(*sent)

    results = run(scenario())
    assert [r.status_code for r in results] == [200, 200, 200, 409, 402, 404, 200, 200], [r.text for r in results]
    alone, a, twin, _, short, _, b, again = (r.json() for r in results)
    assert twin == {**a, "replayed": True} and not a["replayed"] and not b["replayed"]
    assert short["error"]["balance"] == 3
    assert (a["balance"], b["balance"], alone["balance"], again["balance"]) == (95, 88, 99, 97)
    with httpx.Client(base_url=billing.url, timeout=30) as api:
        assert (balance(api, rich), balance(api, poor), balance(api, first)) == (88, 3, 97)
    written = xmins(cluster, [f"{tag}-{k}" for k in ("alone", "a", "b", "first-again")])
    assert written[f"{tag}-a"] == written[f"{tag}-b"] == written[f"{tag}-first-again"]  # one transaction
    assert written[f"{tag}-alone"] != written[f"{tag}-a"]
    assert billing.run("verify-ledger").returncode == 0


def test_a_consume_whose_user_is_locked_leaves_the_batch_and_waits_alone(cluster, one_worker):
    billing = one_worker(10)
    with httpx.Client(base_url=billing.url, timeout=30) as api:
        first, free, busy = new_user(api, 100), new_user(api, 100), new_user(api, 100)
    tag = uuid.uuid4().hex[:8]

    async def scenario():
        with Locks(database_url(cluster)) as locks:
            locks.insert(first)
            locks.balance(busy)
            alone, *batch = await consumes_in_order(billing.url, [
                {"user_id": first, "amount": 1, "idempotency_key": f"{tag}-first"},
                {"user_id": free, "amount": 2, "idempotency_key": f"{tag}-free"},
                {"user_id": busy, "amount": 3, "idempotency_key": f"{tag}-busy"}])
            await asyncio.sleep(1.0)
            locks.release(first)  # the batch goes: `free` at once, `busy` alone, behind the lock
            done = await asyncio.wait_for(batch[0], 8)
            await asyncio.sleep(0.5)
            assert not batch[1].done()
        return [await alone, done, await asyncio.wait_for(batch[1], 8)]

    results = run(scenario())
    assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
    assert [r.json()["balance"] for r in results] == [99, 98, 97]
    written = xmins(cluster, [f"{tag}-free", f"{tag}-busy"])
    assert written[f"{tag}-free"] != written[f"{tag}-busy"]
    assert billing.run("verify-ledger").returncode == 0


def test_a_batch_whose_commit_is_not_confirmed_answers_503_to_all_and_the_retry_debits_once(cluster, one_worker):
    billing = one_worker(3)
    with httpx.Client(base_url=billing.url, timeout=30) as api:
        first, free, stuck = new_user(api, 100), new_user(api, 100), new_user(api, 100)
    tag = uuid.uuid4().hex[:8]
    batch = [{"user_id": free, "amount": 4, "idempotency_key": f"{tag}-free"},
             {"user_id": stuck, "amount": 4, "idempotency_key": f"{tag}-stuck"}]

    async def scenario():
        with Locks(database_url(cluster)) as locks:
            locks.insert(first)
            locks.insert(stuck)  # the batch debits `free`, then waits here past its budget
            sent = await consumes_in_order(billing.url, [{"user_id": first, "amount": 1, "idempotency_key": f"{tag}-first"}, *batch])
            await asyncio.sleep(0.8)
            locks.release(first)
            return await asyncio.wait_for(asyncio.gather(*sent), 10)

    results = run(scenario())
    assert [r.status_code for r in results] == [200, 503, 503], [r.text for r in results]
    assert all(r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"] for r in results[1:])
    with httpx.Client(base_url=billing.url, timeout=30) as api:
        # Outcome unknown (the cancelled statement may yet have committed once the lock went): the
        # retries with the same keys make it one debit each, whichever it was.
        retried = [api.post("/v1/credits/consume", json=body, headers=SERVICE) for body in batch * 2]
        assert [r.status_code for r in retried] == [200] * 4
        assert [r.json()["transaction_id"] for r in retried[:2]] == [r.json()["transaction_id"] for r in retried[2:]]
        assert [r.json()["replayed"] for r in retried[2:]] == [True, True]
        assert balance(api, free) == 96 and balance(api, stuck) == 96
    assert billing.run("verify-ledger").returncode == 0


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
    with psycopg.connect(database_url(cluster)) as conn:  # each answer is its own consume's
        ids = dict(conn.execute("SELECT idempotency_key, id FROM transactions WHERE idempotency_key LIKE %s", (f"{tag}-%",)).fetchall())
    assert [r.json()["transaction_id"] for r in results] == [ids[b["idempotency_key"]] for b in bodies]
    written = xmins(cluster, [b["idempotency_key"] for b in bodies])
    commits = len(set(written.values()))
    assert len(written) == 200 and commits < 200, commits  # one commit per consume without batches


# --- the queue itself (batches.py), with a stand-in for the database call ----------------------

class FakeDatabase:
    """run(items, seconds) as the batches call it: records each call's items; a call waits while
    `gate` is closed; a user in `busy` answers 'busy' in a batch of two or more."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[list] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail, self.busy = fail, set()

    async def run(self, items: list, seconds: float) -> list:
        self.calls.append(list(items))
        await self.gate.wait()
        if self.fail:
            raise self.fail
        return [("busy", None, None) if len(items) > 1 and item in self.busy else ("done", item, 0) for item in items]


def batches(fake: FakeDatabase, budget: float = 4.0, in_flight: int = 1):
    from billing import batches as mod

    return mod.Batches(fake.run, budget, in_flight)


def test_batches_send_alone_when_there_is_room_and_queue_only_behind_a_full_house():
    async def go():
        fake = FakeDatabase()
        queue = batches(fake, in_flight=2)
        fake.gate.clear()
        waiting = [asyncio.ensure_future(queue.submit(i)) for i in range(70 + 2)]
        await asyncio.sleep(0.01)
        assert fake.calls == [[0], [1]]  # two alone, the rest queued
        fake.gate.set()
        answers = await asyncio.gather(*waiting)
        assert [a[1] for a in answers] == list(range(72))  # each gets its own row
        assert [len(c) for c in fake.calls] == [1, 1, 64, 6]
        assert queue.running == 0 and not queue.queue
    run(go())


def test_batches_answer_a_shared_failure_to_each_consume_and_never_send_what_ran_out_of_time():
    from billing.errors import Problem

    async def go():
        fake = FakeDatabase(fail=Problem(503, "unavailable", "unknown", headers={"Retry-After": "2"}))
        queue = batches(fake)
        fake.gate.clear()
        waiting = [asyncio.ensure_future(queue.submit(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        fake.gate.set()
        errors = await asyncio.gather(*waiting, return_exceptions=True)
        assert [e.status for e in errors] == [503] * 3 and len({id(e) for e in errors}) == 3
        assert [len(c) for c in fake.calls] == [1, 2]

        fake.fail = RuntimeError("a bug")
        errors = await asyncio.gather(queue.submit(9), return_exceptions=True)
        assert isinstance(errors[0], RuntimeError)  # alone: the route's own 500 handler logs it

        fake = FakeDatabase()
        queue = batches(fake, budget=0.4)  # a consume needs 0.1 s left to be sent from the queue
        fake.gate.clear()
        waiting = [asyncio.ensure_future(queue.submit(i)) for i in range(3)]
        await asyncio.sleep(0.35)
        fake.gate.set()
        answers = await asyncio.gather(*waiting, return_exceptions=True)
        assert answers[0] == ("done", 0, 0)
        assert [a.status for a in answers[1:]] == [503, 503] and "nothing was charged" in answers[1].message
        assert fake.calls == [[0]]
    run(go())


def test_batches_send_a_busy_consume_again_alone_and_skip_one_nobody_waits_for():
    async def go():
        fake = FakeDatabase()
        fake.busy = {2}
        queue = batches(fake)
        fake.gate.clear()
        waiting = [asyncio.ensure_future(queue.submit(i)) for i in range(4)]
        await asyncio.sleep(0.01)
        waiting[3].cancel()
        fake.gate.set()
        answers = await asyncio.gather(*waiting[:3])
        assert [a[0] for a in answers] == ["done"] * 3
        assert fake.calls == [[0], [1, 2], [2]]
    run(go())
