"""Settling calls answered while billing could not write (issue #14): forced debits, a capture of an
expired hold, voiding a hold by its key, the available balance at read time, the lookup used to
reconcile a proxy's journal."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from components import postgres_config as pgc
from tests.billing.conftest import ADMIN, SERVICE, balance, bearer, database_url, new_user

from billing import ledger  # noqa: E402 (the payload's modules: conftest puts them on the path)


def force(api, user, amount, key, **extra):
    return api.post("/v1/credits/forced-debits", json={"user_id": user, "amount": amount, "idempotency_key": key, **extra},
                    headers=SERVICE)


def hold(api, user, amount, key=None, ttl=300):
    r = api.post("/v1/credits/holds", json={"user_id": user, "amount": amount, "idempotency_key": key or f"proxy:{uuid.uuid4()}",
                                            "ttl_seconds": ttl}, headers=SERVICE)
    assert r.status_code == 201, r.text
    return r.json()["hold_id"]


def expire(cluster, hold_id):
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        conn.execute("UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = %s", (hold_id,))


def shortfall_rows(cluster, user):
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        return conn.execute("SELECT amount, taken, shortfall FROM forced_debits WHERE user_id = %s ORDER BY created_at",
                            (user,)).fetchall()


def test_a_forced_debit_takes_down_to_zero_and_records_the_shortfall(api, billing, cluster):
    user = new_user(api, 12)
    r = force(api, user, 5, "standin:a")
    assert r.status_code == 200, r.text
    assert r.json() | {"transaction_id": None} == {"transaction_id": None, "balance": 7, "taken": 5, "shortfall": 0, "replayed": False}
    r = force(api, user, 10, "standin:b")
    assert (r.json()["taken"], r.json()["shortfall"], r.json()["balance"]) == (7, 3, 0)
    r = force(api, user, 5, "standin:c")  # nothing left: no transaction, the whole amount short
    assert (r.json()["transaction_id"], r.json()["taken"], r.json()["shortfall"]) == (None, 0, 5)
    again = force(api, user, 10, "standin:b").json()
    assert (again["replayed"], again["taken"], again["shortfall"]) == (True, 7, 3)
    assert force(api, user, 11, "standin:b").status_code == 409  # the key bound to another amount
    assert balance(api, user) == 0
    assert shortfall_rows(cluster, user) == [(5, 5, 0), (10, 7, 3), (5, 0, 5)]
    metrics = api.get("/metrics").text
    assert 'billing_forced_debits_total{kind="advice",outcome="short"}' in metrics
    assert billing.run("verify-ledger").returncode == 0


def test_forced_debits_are_for_the_service_only(api, billing):
    user = new_user(api, 12)
    r = api.post("/v1/credits/forced-debits", json={"user_id": user, "amount": 5, "idempotency_key": "k"},
                 headers=bearer("user", user))
    assert r.status_code == 403
    r = force(api, user, 5, "k", extra_field=1)
    assert r.status_code == 422 and "extra_field" in r.text


def test_concurrent_forced_debits_of_one_key_charge_once(api, billing, cluster):
    user = new_user(api, 100)

    async def burst():
        import httpx

        async with httpx.AsyncClient(base_url=billing.url, timeout=60) as c:
            body = {"user_id": user, "amount": 5, "idempotency_key": "standin:same"}
            return await asyncio.gather(*(c.post("/v1/credits/forced-debits", json=body, headers=SERVICE) for _ in range(40)))

    loop = asyncio.new_event_loop()
    try:
        responses = loop.run_until_complete(burst())
    finally:
        loop.close()
    assert [r.status_code for r in responses] == [200] * 40
    assert sum(not r.json()["replayed"] for r in responses) == 1
    assert balance(api, user) == 95


def test_a_capture_of_an_expired_hold_with_force_is_charged_once(api, billing, cluster):
    user = new_user(api, 20)
    h = hold(api, user, 5)
    expire(cluster, h)
    plain = api.post(f"/v1/credits/holds/{h}/capture", headers=SERVICE)
    assert plain.status_code == 409 and "expired" in plain.text  # as before, without force
    r = api.post(f"/v1/credits/holds/{h}/capture", json={"force": True}, headers=SERVICE)
    assert r.status_code == 200, r.text
    assert r.json()["balance"] == 15 and r.json()["replayed"] is False
    again = api.post(f"/v1/credits/holds/{h}/capture", json={"force": True}, headers=SERVICE)
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert balance(api, user) == 15
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        assert conn.execute("SELECT status, captured FROM holds WHERE id = %s", (h,)).fetchone() == ("captured", 5)
        assert conn.execute("SELECT type, amount, idempotency_key FROM transactions WHERE ref = %s", (h,)).fetchall() == [
            ("forced", -5, f"hold:{h}")]
    assert billing.run("verify-ledger").returncode == 0


def test_a_capture_that_committed_is_not_charged_again_by_force(api, billing):
    user = new_user(api, 20)
    h = hold(api, user, 5)
    assert api.post(f"/v1/credits/holds/{h}/capture", headers=SERVICE).status_code == 200
    r = api.post(f"/v1/credits/holds/{h}/capture", json={"force": True}, headers=SERVICE)
    assert r.status_code == 200 and r.json()["replayed"] is True
    assert balance(api, user) == 15


def test_a_void_before_the_hold_keeps_a_late_hold_from_locking_credit(api, billing, cluster):
    user = new_user(api, 20)
    key = f"proxy:{uuid.uuid4()}"
    r = api.post("/v1/credits/holds/void", json={"user_id": user, "idempotency_key": key, "amount": 5}, headers=SERVICE)
    assert r.status_code == 200 and r.json()["status"] == "void", r.text
    late = api.post("/v1/credits/holds", json={"user_id": user, "amount": 5, "idempotency_key": key}, headers=SERVICE)
    assert late.status_code == 409
    assert balance(api, user) == 20
    again = api.post("/v1/credits/holds/void", json={"user_id": user, "idempotency_key": key, "amount": 5}, headers=SERVICE)
    assert again.status_code == 200 and again.json()["status"] == "void"


def test_a_void_after_the_hold_releases_it_and_a_captured_one_is_kept(api, billing):
    user = new_user(api, 20)
    key = f"proxy:{uuid.uuid4()}"
    hold(api, user, 5, key)
    assert balance(api, user) == 15
    r = api.post("/v1/credits/holds/void", json={"user_id": user, "idempotency_key": key, "amount": 5}, headers=SERVICE)
    assert r.status_code == 200 and r.json()["status"] == "released" and r.json()["balance"] == 20
    key2 = f"proxy:{uuid.uuid4()}"
    h2 = hold(api, user, 5, key2)
    assert api.post(f"/v1/credits/holds/{h2}/capture", headers=SERVICE).status_code == 200
    r = api.post("/v1/credits/holds/void", json={"user_id": user, "idempotency_key": key2, "amount": 5}, headers=SERVICE)
    assert r.status_code == 409
    assert balance(api, user) == 15


def test_the_balance_read_excludes_an_expired_hold_before_the_sweeper_runs(api, cluster):
    user = new_user(api, 20)
    h = hold(api, user, 5)

    async def read_in_one_transaction():
        # The hold's row stays locked by this transaction, so the sweeper cannot have freed it.
        async with await psycopg.AsyncConnection.connect(database_url(cluster)) as conn, conn.transaction():
            await conn.execute("UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = %s", (h,))
            return await ledger.balance(conn, uuid.UUID(user)), await (await conn.execute(
                "SELECT balance FROM credit_balances WHERE user_id = %s", (user,))).fetchone()

    loop = asyncio.new_event_loop()
    try:
        read, stored = loop.run_until_complete(read_in_one_transaction())
    finally:
        loop.close()
    assert stored == (15,) and read["balance"] == 20


def test_a_consume_frees_expired_holds_before_refusing(api, cluster):
    user = new_user(api, 10)
    h = hold(api, user, 10)
    expire(cluster, h)
    r = api.post("/v1/credits/consume", json={"user_id": user, "amount": 5, "idempotency_key": "after-expiry"}, headers=SERVICE)
    assert r.status_code == 200 and r.json()["balance"] == 5, r.text


def test_lookup_names_what_the_ledger_holds_under_each_key(api):
    user = new_user(api, 20)
    h = hold(api, user, 5, "proxy:call-1")
    api.post(f"/v1/credits/holds/{h}/capture", headers=SERVICE)
    force(api, user, 5, "standin:call-2")
    r = api.post("/v1/credits/lookup", json={"keys": [
        {"user_id": user, "idempotency_key": "proxy:call-1"}, {"user_id": user, "idempotency_key": f"hold:{h}"},
        {"user_id": user, "idempotency_key": "standin:call-2"}, {"user_id": user, "idempotency_key": "nothing"}]}, headers=SERVICE)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert items[0]["hold"] == {"id": h, "status": "captured", "amount": 5, "captured": 5} and items[0]["transaction"] is None
    assert items[1]["transaction"]["type"] == "capture" and items[1]["transaction"]["amount"] == -5
    assert items[2]["forced"] == {"amount": 5, "taken": 5, "shortfall": 0} and items[2]["transaction"]["type"] == "forced"
    assert items[3] == {"user_id": user, "idempotency_key": "nothing", "hold": None, "transaction": None, "forced": None}
    assert api.post("/v1/credits/lookup", json={"keys": []}, headers=SERVICE).status_code == 422
    assert api.post("/v1/credits/lookup", json={"keys": [{"user_id": user, "idempotency_key": "x"}]},
                    headers=ADMIN).status_code == 200


@pytest.mark.parametrize("statement", ["UPDATE forced_debits SET taken = 0", "DELETE FROM forced_debits"])
def test_forced_debits_are_append_only(api, cluster, statement):
    user = new_user(api, 20)
    force(api, user, 5, "standin:x")
    with psycopg.connect(database_url(cluster)) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)


def test_verify_ledger_names_a_forced_debit_that_does_not_match_its_transaction(api, billing, cluster):
    user = new_user(api, 20)
    force(api, user, 5, "standin:checked")
    ok = billing.run("verify-ledger")
    assert ok.returncode == 0 and "forced debits" in ok.stdout, ok.stderr
    with psycopg.connect(cluster.conninfo(dbname=pgc.DATABASE), autocommit=True) as conn:  # the superuser
        conn.execute("SET session_replication_role = replica")  # bypass the append-only trigger
        conn.execute("UPDATE forced_debits SET taken = 4 WHERE user_id = %s", (user,))
        try:
            bad = billing.run("verify-ledger")
            assert bad.returncode == 1 and "forced debit 'standin:checked'" in bad.stderr, bad.stderr
        finally:
            conn.execute("UPDATE forced_debits SET taken = 5 WHERE user_id = %s", (user,))
    assert billing.run("verify-ledger").returncode == 0


def test_a_forced_capture_that_came_up_short_replays_on_retry(api, billing, cluster):
    user = new_user(api, 8)
    h = hold(api, user, 8)
    with cluster.connect(dbname=pgc.DATABASE) as conn:  # the user spent 5 elsewhere meanwhile: 3 left once the hold is gone
        conn.execute("UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = %s", (h,))
    assert force(api, user, 5, "elsewhere").json()["taken"] == 5
    first = api.post(f"/v1/credits/holds/{h}/capture", json={"amount": 6, "force": True}, headers=SERVICE)
    assert first.status_code == 200, first.text
    assert (first.json()["taken"], first.json()["shortfall"], first.json()["replayed"]) == (3, 3, False)
    again = api.post(f"/v1/credits/holds/{h}/capture", json={"amount": 6, "force": True}, headers=SERVICE)
    assert again.status_code == 200, again.text
    assert (again.json()["taken"], again.json()["shortfall"], again.json()["replayed"]) == (3, 3, True)
    assert api.post(f"/v1/credits/holds/{h}/capture", json={"amount": 7, "force": True}, headers=SERVICE).status_code == 409
    assert balance(api, user) == 0 and shortfall_rows(cluster, user)[-1] == (6, 3, 3)
    assert billing.run("verify-ledger").returncode == 0


@pytest.mark.parametrize("movement", ["signup", "consume"])
def test_a_forced_debit_under_a_key_another_movement_used_is_a_conflict(api, cluster, movement):
    user = new_user(api, 20)
    key = "signup"
    if movement == "consume":
        key = "consumed-once"
        r = api.post("/v1/credits/consume", json={"user_id": user, "amount": 1, "idempotency_key": key}, headers=SERVICE)
        assert r.status_code == 200, r.text
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        assert conn.execute("SELECT count(*) FROM transactions WHERE user_id = %s AND idempotency_key = %s",
                            (user, key)).fetchone() == (1,)
    before = balance(api, user)
    r = force(api, user, 5, key)
    assert r.status_code == 409, r.text  # never "replayed" with nothing charged
    assert balance(api, user) == before and shortfall_rows(cluster, user) == []


def test_a_forced_capture_of_a_void_tombstone_names_its_status(api, cluster):
    user = new_user(api, 20)
    key = f"proxy:{uuid.uuid4()}"
    assert api.post("/v1/credits/holds/void", json={"user_id": user, "idempotency_key": key, "amount": 5},
                    headers=SERVICE).status_code == 200
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        (tombstone,) = conn.execute("SELECT id FROM holds WHERE user_id = %s AND idempotency_key = %s", (user, key)).fetchone()
    r = api.post(f"/v1/credits/holds/{tombstone}/capture", json={"force": True}, headers=SERVICE)
    assert r.status_code == 409 and "void" in r.text, r.text
    assert balance(api, user) == 20


def test_a_released_hold_past_its_ttl_is_never_charged_by_force(api, cluster):
    user = new_user(api, 20)
    h = hold(api, user, 5)
    assert api.post(f"/v1/credits/holds/{h}/release", headers=SERVICE).status_code == 200
    expire(cluster, h)
    r = api.post(f"/v1/credits/holds/{h}/capture", json={"force": True}, headers=SERVICE)
    assert r.status_code == 409 and "released" in r.text, r.text
    assert balance(api, user) == 20 and shortfall_rows(cluster, user) == []
