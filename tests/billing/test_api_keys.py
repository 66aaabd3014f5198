"""API keys for server agents (api_keys.py, ADR 17): minted by an admin, shown once, stored
hashed, revocable, last use recorded; a key acts for the accounts it names, never as an admin."""

from __future__ import annotations

import hashlib
import uuid

import psycopg

from tests.billing.conftest import ADMIN, SERVICE, bearer, database_url

CHECK = "/v1/billing/credits/check"


def mint(api, name: str = "agent") -> dict:
    r = api.post("/v1/admin/api-keys", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def named(external_id: str | None = None) -> dict:
    return {"oauth_provider": "oauth:google", "external_id": external_id or f"g-{uuid.uuid4().hex}"}


def test_a_key_is_shown_once_stored_hashed_and_listed_without_it(api, cluster):
    key = mint(api, "scout server")
    assert key["api_key"].startswith("cbk_live_") and len(key["api_key"]) > 40 and key["api_key"].startswith(key["prefix"])
    listed = [k for k in api.get("/v1/admin/api-keys", headers=ADMIN).json()["items"] if k["id"] == key["id"]]
    assert listed == [{"id": key["id"], "name": "scout server", "prefix": key["prefix"], "created_at": key["created_at"],
                       "revoked_at": None, "last_used_at": None}]
    assert key["api_key"] not in api.get("/v1/admin/api-keys", headers=ADMIN).text
    with psycopg.connect(database_url(cluster)) as conn:
        stored = conn.execute("SELECT key_hash FROM api_keys WHERE id = %s", (key["id"],)).fetchone()[0]
    assert bytes(stored) == hashlib.sha256(key["api_key"].encode()).digest()


def test_a_key_acts_for_the_account_it_names_and_records_its_use(api):
    key = mint(api)
    r = api.post(CHECK, json=named(), headers={"X-API-Key": key["api_key"]})
    assert r.status_code == 200 and r.json()["credits_remaining"] == 15, r.text
    listed = {k["id"]: k for k in api.get("/v1/admin/api-keys", headers=ADMIN).json()["items"]}
    assert listed[key["id"]]["last_used_at"] is not None


def test_a_key_is_never_an_admin(api):
    key = {"X-API-Key": mint(api)["api_key"]}
    assert api.post("/v1/admin/api-keys", json={"name": "mine"}, headers=key).status_code == 401
    assert api.get("/v1/admin/api-keys", headers=key).status_code == 401
    r = api.post("/v1/users", json={"email": f"{uuid.uuid4().hex[:8]}@example.org"}, headers=key)
    assert r.status_code == 401


def test_only_an_admin_mints_lists_and_revokes(api):
    for who in (SERVICE, bearer("user", str(uuid.uuid4()))):
        assert api.post("/v1/admin/api-keys", json={"name": "x"}, headers=who).status_code == 403
        assert api.get("/v1/admin/api-keys", headers=who).status_code == 403
        assert api.delete(f"/v1/admin/api-keys/{uuid.uuid4()}", headers=who).status_code == 403
    assert api.delete(f"/v1/admin/api-keys/{uuid.uuid4()}", headers=ADMIN).status_code == 404
    for odd in ({"name": ""}, {"name": "x" * 101}, {"name": "a\nb"}, {"name": "ok", "admin": True}):
        r = api.post("/v1/admin/api-keys", json=odd, headers=ADMIN)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", odd


def test_revoked_unknown_and_odd_keys_are_401_and_change_nothing(api, billing):
    key = mint(api)
    account = named()
    assert api.post(CHECK, json=account, headers={"X-API-Key": key["api_key"]}).status_code == 200
    r = api.delete(f"/v1/admin/api-keys/{key['id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    charge = {**account, "amount_minor": 1, "currency": "USD", "idempotency_key": "k1"}
    for bad in (key["api_key"], key["api_key"][:-1] + "x", "cbk_live_" + "A" * 43, "x" * 5000, ""):
        r = api.post("/v1/billing/charges", json=charge, headers={"X-API-Key": bad})
        assert r.status_code == 401 and r.json()["error"]["message"] == "X-API-Key: unknown or revoked key", r.text
    assert key["api_key"] not in billing.log.read_text()
    fresh = mint(api)
    r = api.post(CHECK, json=account, headers={"X-API-Key": fresh["api_key"]})
    assert r.json()["credits_remaining"] == 15  # nothing was charged
