"""The ledger's guarantees in the database itself: append-only for the app's role, a hash chain
that `python -m billing verify-ledger` checks, and the service's behaviour when the database goes."""

from __future__ import annotations

import shutil
import time
import uuid

import httpx
import psycopg
import pytest

from components import postgres_config as pgc
from tests.billing.conftest import ADMIN, SERVICE, Billing, database_url, new_user, service_env
from tests.postgres.conftest import PRIMARY_ADDR, free_port, init_primary, workspace


def test_verify_ledger_passes_then_names_an_altered_row(api, billing, cluster):
    user = new_user(api, 100)
    api.post("/v1/credits/consume", json={"user_id": user, "amount": 7, "idempotency_key": "k"}, headers=SERVICE)
    hold = api.post("/v1/credits/holds", json={"user_id": user, "amount": 20, "idempotency_key": "h"}, headers=SERVICE).json()["hold_id"]
    ok = billing.run("verify-ledger")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ledger ok: ") and "transactions checked" in ok.stdout
    with psycopg.connect(cluster.conninfo(dbname=pgc.DATABASE), autocommit=True) as conn:  # the superuser
        row = conn.execute("SELECT id, amount FROM transactions WHERE user_id = %s AND type = 'consume'", (user,)).fetchone()
        conn.execute("SET session_replication_role = replica")  # bypass the append-only trigger
        conn.execute("UPDATE transactions SET amount = -1 WHERE id = %s", (row[0],))
        try:
            bad = billing.run("verify-ledger")
            assert bad.returncode == 1
            assert f"transaction {row[0]} (user {user}, seq 3): hash mismatch" in bad.stderr
        finally:
            conn.execute("UPDATE transactions SET amount = %s WHERE id = %s", (row[1], row[0]))
        # A balance changed behind the ledger's back is caught too.
        conn.execute("UPDATE credit_balances SET balance = balance + 1000, settled = settled + 1000 WHERE user_id = %s", (user,))
        try:
            bad = billing.run("verify-ledger")
            assert bad.returncode == 1 and f"user {user}: balance" in bad.stderr
        finally:
            conn.execute("UPDATE credit_balances SET balance = balance - 1000, settled = settled - 1000 WHERE user_id = %s", (user,))
    api.post(f"/v1/credits/holds/{hold}/release", headers=SERVICE)
    assert billing.run("verify-ledger").returncode == 0


@pytest.mark.parametrize("statement", [
    "UPDATE transactions SET amount = amount * 2",
    "DELETE FROM transactions",
    "TRUNCATE transactions CASCADE",
])
def test_transactions_are_append_only_for_the_app_role(api, cluster, statement):
    new_user(api)
    with psycopg.connect(database_url(cluster), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement)


def test_balance_cannot_go_negative_even_in_sql(api, cluster):
    user = new_user(api)
    with psycopg.connect(database_url(cluster), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE credit_balances SET balance = -1 WHERE user_id = %s", (user,))


def test_no_request_values_in_the_log(api, billing):
    user = new_user(api)
    canary = "CANARY-prompt-text-4b1d"
    api.post("/v1/credits/consume", json={"user_id": user, "idempotency_key": canary, "description": canary}, headers=SERVICE)
    api.post("/v1/credits/consume", json={"user_id": user, "idempotency_key": canary, "amount": -1, "description": canary}, headers=SERVICE)
    api.post("/v1/users", json={"email": f"{canary}@example.org"}, headers=ADMIN)
    time.sleep(0.3)
    log = billing.log.read_text()
    assert canary not in log and "sk_test_CANARY" not in log and "app-pass-CANARY" not in log


@pytest.mark.parametrize("env, message", [
    ({"DATABASE_URL": ""}, "billing: DATABASE_URL is not set"),
    ({"DATABASE_URL": "mysql://x"}, "billing: DATABASE_URL must be a postgresql:// URL"),
    ({"BILLING_JWT_PRIVATE_KEY": "not a key"}, "billing: BILLING_JWT_PRIVATE_KEY is not a PEM private key"),
    ({"BILLING_JWT_PRIVATE_KEY": "", "BILLING_JWT_PRIVATE_KEY_FILE": "/nonexistent"}, "billing: BILLING_JWT_PRIVATE_KEY_FILE cannot be read"),
    ({"BILLING_JWKS_FILE": "/nonexistent"}, "billing: BILLING_JWKS_FILE cannot be read"),
    ({"BILLING_JWKS": '{"keys": []}'}, "billing: BILLING_JWKS holds no keys"),
    ({"PORT": "eighty"}, "billing: PORT must be an integer, got 'eighty'"),
    ({"PRICE_PER_INTERACTION_CENTS": "0"}, "billing: PRICE_PER_INTERACTION_CENTS must be between 1 and 1000000, got 0"),
    ({"CREDIT_PACKS": "500"}, "billing: CREDIT_PACKS must be credits:price_cents pairs"),
    ({"DB_WRITE_TIMEOUT_SECONDS": "soon"}, "billing: DB_WRITE_TIMEOUT_SECONDS must be a number of seconds, got 'soon'"),
    ({"DB_WRITE_TIMEOUT_SECONDS": "0.1"}, "billing: DB_WRITE_TIMEOUT_SECONDS must be between 0.5 and 60 seconds, got 0.1"),
    ({"DB_WRITE_TIMEOUT_SECONDS": "nan"}, "billing: DB_WRITE_TIMEOUT_SECONDS must be between 0.5 and 60 seconds, got nan"),
    ({"LEDGER_VERIFY_INTERVAL_SECONDS": "0"}, "billing: LEDGER_VERIFY_INTERVAL_SECONDS must be between 1 and 86400 seconds, got 0"),
    ({"DATABASE_URL": "postgresql://billing:pw-CANARY@127.0.0.1:1/cirisbilling"}, "billing: cannot reach the database at DATABASE_URL"),
])
def test_bad_settings_exit_with_one_line_naming_the_variable(billing, env, message):
    r = billing.run(env={**billing.env, **env}, timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert "CANARY" not in r.stderr


def test_health_is_503_while_the_database_is_down_and_recovers(tmp_path):
    root, tls = workspace()
    db = init_primary(root, tls[PRIMARY_ADDR], replicas=())
    service = Billing({**service_env(db), "PORT": str(free_port())}, tmp_path / "billing.log")
    try:
        service.start()
        db.stop("immediate")
        time.sleep(1.1)  # /health answers from a probe at most a second old
        r = httpx.get(f"{service.url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"
        db.start()
        deadline = time.time() + 20
        while httpx.get(f"{service.url}/health", timeout=10).status_code != 200:
            assert time.time() < deadline
            time.sleep(0.3)
    finally:
        service.stop()
        db.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)




def test_the_database_hashes_rows_as_verify_ledger_does(api, billing, cluster):
    """Movements hash their rows in SQL (migration 0002); verify-ledger recomputes them in Python
    (chain.canonical). Descriptions that JSON escapes differently (non-ASCII, astral, DEL, controls,
    quotes) must hash the same on both sides."""
    from billing import chain

    user = new_user(api, 1000)
    for i, text in enumerate(["caf\u00e9", "\U0001f600 emoji", "del\x7f", "tab\tnew\nline\x01", 'say "hi" \\ bye', "\u0663\u4e2d\u0436", "", "plain"]):
        r = api.post("/v1/credits/consume", json={"user_id": user, "amount": 1, "idempotency_key": f"d{i}", "description": text}, headers=SERVICE)
        assert r.status_code == 200, r.text
    hold = api.post("/v1/credits/holds", json={"user_id": user, "amount": 30, "idempotency_key": "h"}, headers=SERVICE).json()["hold_id"]
    assert api.post(f"/v1/credits/holds/{hold}/capture", json={"amount": 12}, headers=SERVICE).status_code == 200
    r = billing.run("verify-ledger")
    assert r.returncode == 0, r.stderr
    with psycopg.connect(database_url(cluster), autocommit=True) as conn:
        key, req = conn.execute("SELECT idempotency_key, request_hash FROM transactions WHERE ref = %s", (hold,)).fetchone()
    assert key == f"hold:{hold}" and req == chain.request_hash("capture", hold=hold, amount=12)


def test_a_users_hold_expiry_has_its_own_index(cluster):
    """Placing a hold expires that user's overdue holds: the per-user partial index serves it,
    not the global expiry index the sweeper uses."""
    with psycopg.connect(database_url(cluster), autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute(
            "EXPLAIN UPDATE holds SET status = 'expired' WHERE user_id = %s AND status = 'active' AND expires_at <= now()",
            (str(uuid.uuid4()),)).fetchall()
    assert "holds_user_active_expiry" in "\n".join(row[0] for row in plan)
