"""Exactly-once under concurrency, against the real process and database."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import psycopg

from tests.billing.conftest import SERVICE, balance, database_url, new_user


def burst(url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def go():
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post(path, json=body, headers=SERVICE) for path, body in requests))

    loop = asyncio.new_event_loop()  # not asyncio.run(): that leaves the thread without a loop
    try:
        return loop.run_until_complete(go())
    finally:
        loop.close()


def test_100_identical_consumes_debit_once(api, billing):
    user = new_user(api, 100)
    body = {"user_id": user, "amount": 5, "idempotency_key": "same-call"}
    results = burst(billing.url, [("/v1/credits/consume", body)] * 100)
    assert {r.status_code for r in results} == {200}
    assert len({r.json()["transaction_id"] for r in results}) == 1
    assert sum(not r.json()["replayed"] for r in results) == 1
    assert balance(api, user) == 95


def test_100_different_consumes_over_300_cents_exactly_60_succeed(api, billing):
    user = new_user(api, 300)
    results = burst(billing.url, [("/v1/credits/consume", {"user_id": user, "amount": 5, "idempotency_key": f"c{i}"}) for i in range(100)])
    codes = [r.status_code for r in results]
    assert codes.count(200) == 60 and codes.count(402) == 40
    assert balance(api, user) == 0
    assert len([i for i in _all_usage(api, user) if i["type"] == "consume"]) == 60


def test_holds_racing_captures_releases_and_expiry(api, billing):
    user = new_user(api, 1000)
    holds = burst(billing.url, [("/v1/credits/holds", {"user_id": user, "amount": 10, "idempotency_key": f"h{i}", "ttl_seconds": 2 if i % 4 == 3 else 60})
                                for i in range(40)])
    assert all(r.status_code == 201 for r in holds)
    ids = [r.json()["hold_id"] for r in holds]
    assert balance(api, user) == 600
    # For each hold: capture and release race each other (twice over); the last quarter also races expiry.
    time.sleep(2.1)
    actions = [(f"/v1/credits/holds/{h}/{verb}", {}) for h in ids for verb in ("capture", "release", "capture", "release")]
    results = burst(billing.url, actions)
    assert all(r.status_code in (200, 409) for r in results), [r.text for r in results if r.status_code not in (200, 409)]
    captured = set()
    for i, h in enumerate(ids):
        outcome = [r for r in results[4 * i: 4 * i + 4] if r.status_code == 200]
        kinds = {"capture" if "transaction_id" in r.json() else r.json()["status"] for r in outcome}
        assert len(kinds) == 1, kinds  # a hold ends exactly one way
        if kinds == {"capture"}:
            captured.add(h)
            assert i % 4 != 3, "an expired hold was captured"
    deadline = time.time() + 10
    while balance(api, user) != 1000 - 10 * len(captured):
        assert time.time() < deadline, (balance(api, user), len(captured))
        time.sleep(0.2)
    assert len([i for i in _all_usage(api, user) if i["type"] == "capture"]) == len(captured)


def _all_usage(api, user):
    items, cursor = [], None
    while True:
        page = api.get(f"/v1/usage/{user}", params={"limit": 100, **({"cursor": cursor} if cursor else {})}, headers=SERVICE).json()
        items += page["items"]
        if not (cursor := page["next_cursor"]):
            return items


def test_480_concurrent_same_key_consumes_each_debit_once(api, billing):
    """Many identical requests racing per key (the race that merging lock and key lookup into one
    statement lost as 500s): every answer is 200, one debit per key, the chains still verify."""
    users = [new_user(api, 1000) for _ in range(4)]
    bodies = [{"user_id": u, "amount": 7, "idempotency_key": f"race-{k}"} for u in users for k in range(2)]
    requests = [("/v1/credits/consume", body) for body in bodies for _ in range(60)]
    random.Random(15).shuffle(requests)
    results = burst(billing.url, requests)
    assert {r.status_code for r in results} == {200}, [r.text for r in results if r.status_code != 200][:3]
    by_key = {}
    for (_, body), r in zip(requests, results):
        by_key.setdefault((body["user_id"], body["idempotency_key"]), set()).add(r.json()["transaction_id"])
    assert all(len(ids) == 1 for ids in by_key.values())
    assert sum(not r.json()["replayed"] for r in results) == len(bodies)
    assert [balance(api, u) for u in users] == [1000 - 14] * 4
    assert billing.run("verify-ledger").returncode == 0


def test_30_concurrent_same_key_holds_place_one(api, billing):
    user = new_user(api, 100)
    results = burst(billing.url, [("/v1/credits/holds", {"user_id": user, "amount": 40, "idempotency_key": "h"})] * 30)
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["hold_id"] for r in results}) == 1 and sum(not r.json()["replayed"] for r in results) == 1
    assert balance(api, user) == 60


def test_a_unique_violation_race_is_retried_with_a_fresh_snapshot(cluster):
    """ledger.call repeats a statement that lost a unique-key race: the retry's snapshot sees the
    winner's committed row. Without the retry this is a 500 (UniqueViolation)."""
    from billing import ledger

    dsn = database_url(cluster)
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS race_probe (k text PRIMARY KEY)")
        setup.execute("TRUNCATE race_probe")
    insert_if_absent = "INSERT INTO race_probe SELECT %s WHERE NOT EXISTS (SELECT 1 FROM race_probe WHERE k = %s) RETURNING k"

    async def race():
        async with await ledger.Connection.connect(dsn, autocommit=True) as winner, \
                   await ledger.Connection.connect(dsn, autocommit=True) as loser:
            async with winner.transaction():
                await winner.execute("INSERT INTO race_probe VALUES ('x')")
                pending = asyncio.ensure_future(ledger.call(loser, insert_if_absent, ("x", "x")))
                while not await _waits_on_a_lock(winner, loser.info.backend_pid):
                    await asyncio.sleep(0.02)
            return await asyncio.wait_for(pending, 10)

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(race()) is None  # the winner's row is there: nothing inserted, no error
    finally:
        loop.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE race_probe")


async def _waits_on_a_lock(conn, pid: int) -> bool:
    cur = await conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,))
    row = await cur.fetchone()
    return bool(row and row[0])
