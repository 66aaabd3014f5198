"""Every endpoint's happy path and each documented error, against the real process and database."""

from __future__ import annotations

import uuid
from pathlib import Path

import jwt
import pytest

from tests.billing.conftest import ADMIN, KEY, PREVIOUS_KEY, SERVICE, balance, bearer, jwks_file, kid, new_user


def test_health_and_openapi(api):
    assert api.get("/health").json() == {"status": "healthy"}
    doc = api.get("/openapi.json").json()
    assert {"/v1/credits/consume", "/v1/credits/holds", "/v1/webhooks/stripe", "/v1/usage/{user_id}"} <= set(doc["paths"])


def test_the_published_key_set_is_public_and_verifies_billings_tokens(api):
    """GET /.well-known/jwks.json (ADR 21): every key billing's tokens verify with, as the program
    ships it, by kid; public keys only; no credential needed; cacheable."""
    r = api.get("/.well-known/jwks.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "public, max-age=300"
    assert r.text == jwks_file().read_text()
    entries = r.json()["keys"]
    assert [e["kid"] for e in entries] == [kid(PREVIOUS_KEY), kid(KEY)]
    assert all(set(e) == {"kty", "crv", "x", "kid", "alg", "use"} and (e["kty"], e["crv"], e["alg"], e["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
               for e in entries)
    user = new_user(api)
    access = api.post("/v1/auth/token", json={"user_id": user}, headers=ADMIN).json()["access_token"]
    key = jwt.PyJWKSet.from_dict(r.json())[jwt.get_unverified_header(access)["kid"]]
    assert jwt.decode(access, key, algorithms=["EdDSA"], audience="ciris-bridge")["sub"] == user


def test_serving_until_a_deploy_drains_it_while_every_route_still_answers(api, billing):
    """The edge's health check (ADR 16): 503 while the drain file exists, nothing else changes."""
    drain = Path(billing.env["DRAIN_FILE"])
    assert (api.get("/serving").status_code, api.get("/serving").json()) == (200, {"status": "serving"})
    drain.touch()
    try:
        r = api.get("/serving")
        assert (r.status_code, r.json()) == (503, {"status": "draining"})
        assert api.get("/health").json() == {"status": "healthy"}
        assert api.post("/v1/users", json={"email": f"{uuid.uuid4().hex[:8]}@example.org"}, headers=ADMIN).status_code == 201
    finally:
        drain.unlink()
    assert api.get("/serving").status_code == 200
    assert "/serving" not in api.get("/openapi.json").json()["paths"]


def test_create_user_grants_signup_credits_as_a_ledger_entry(api):
    r = api.post("/v1/users", json={"email": f"{uuid.uuid4().hex[:8]}@Example.org"}, headers=ADMIN)
    assert r.status_code == 201
    user = r.json()
    assert user["balance"] == 15 and uuid.UUID(user["id"])
    items = api.get(f"/v1/usage/{user['id']}", headers=SERVICE).json()["items"]
    assert [(i["type"], i["amount"], i["balance_after"]) for i in items] == [("signup", 15, 15)]
    dup = api.post("/v1/users", json={"email": user["email"].upper()}, headers=ADMIN)
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "conflict"


def test_token_minting_for_a_user(api):
    user = new_user(api)
    r = api.post("/v1/auth/token", json={"user_id": user, "ttl_seconds": 120}, headers=SERVICE)
    assert r.status_code == 200 and r.json()["token_type"] == "bearer"
    claims = jwt.decode(r.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == user and claims["role"] == "user" and claims["exp"] == r.json()["expires_at"]
    # The minted token works for the user's own account.
    own = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert api.get(f"/v1/credits/{user}", headers=own).json()["balance"] == 15
    assert api.post("/v1/auth/token", json={"user_id": str(uuid.uuid4())}, headers=ADMIN).status_code == 404
    assert api.post("/v1/auth/token", json={"user_id": user}, headers=own).status_code == 403


def test_credits_unknown_user_is_404(api):
    r = api.get(f"/v1/credits/{uuid.uuid4()}", headers=SERVICE)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert api.get("/v1/credits/not-a-uuid", headers=SERVICE).status_code == 404


def test_consume_debits_once_and_replays(api):
    user = new_user(api, 100)
    body = {"user_id": user, "idempotency_key": "call-1", "description": "chat"}
    first = api.post("/v1/credits/consume", json=body, headers=SERVICE)
    assert first.status_code == 200
    assert first.json()["balance"] == 95 and first.json()["replayed"] is False  # the default price, 5
    again = api.post("/v1/credits/consume", json=body, headers=SERVICE)
    assert again.json() == {**first.json(), "replayed": True}
    assert balance(api, user) == 95
    other = api.post("/v1/credits/consume", json={**body, "amount": 7}, headers=SERVICE)
    assert other.status_code == 409
    assert balance(api, user) == 95


def test_consume_over_balance_is_402_with_the_balance(api):
    user = new_user(api, 10)
    r = api.post("/v1/credits/consume", json={"user_id": user, "amount": 11, "idempotency_key": "k"}, headers=SERVICE)
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "insufficient_credits" and r.json()["error"]["balance"] == 10
    assert balance(api, user) == 10
    # The refused key was not consumed: it can be used once the user can pay.
    r = api.post("/v1/credits/consume", json={"user_id": user, "amount": 10, "idempotency_key": "k2"}, headers=SERVICE)
    assert r.status_code == 200 and r.json()["balance"] == 0


def test_user_consumes_for_self_only(api):
    user, other = new_user(api), new_user(api)
    mine = bearer("user", user)
    assert api.post("/v1/credits/consume", json={"user_id": user, "idempotency_key": "a"}, headers=mine).status_code == 200
    r = api.post("/v1/credits/consume", json={"user_id": other, "idempotency_key": "a"}, headers=mine)
    assert r.status_code == 403 and balance(api, other) == 15


def test_grant_is_admin_only_and_idempotent(api):
    user = new_user(api)
    body = {"user_id": user, "amount": 250, "idempotency_key": "goodwill-1", "reason": "outage credit"}
    r = api.post("/v1/credits/grant", json=body, headers=ADMIN)
    assert r.status_code == 200 and r.json()["balance"] == 265
    assert api.post("/v1/credits/grant", json=body, headers=ADMIN).json()["transaction_id"] == r.json()["transaction_id"]
    assert api.post("/v1/credits/grant", json={**body, "amount": 1}, headers=ADMIN).status_code == 409
    assert api.post("/v1/credits/grant", json=body, headers=SERVICE).status_code == 403
    assert balance(api, user) == 265


def test_hold_capture_partial_returns_the_rest(api):
    user = new_user(api, 100)
    r = api.post("/v1/credits/holds", json={"user_id": user, "amount": 30, "idempotency_key": "h1"}, headers=SERVICE)
    assert r.status_code == 201 and r.json()["balance"] == 70
    hold = r.json()["hold_id"]
    c = api.post(f"/v1/credits/holds/{hold}/capture", json={"amount": 12}, headers=SERVICE)
    assert c.status_code == 200 and c.json()["balance"] == 88
    again = api.post(f"/v1/credits/holds/{hold}/capture", json={"amount": 12}, headers=SERVICE)
    assert again.status_code == 200 and again.json()["transaction_id"] == c.json()["transaction_id"]
    assert api.post(f"/v1/credits/holds/{hold}/release", headers=SERVICE).status_code == 409
    assert balance(api, user) == 88
    items = api.get(f"/v1/usage/{user}", headers=SERVICE).json()["items"]
    assert items[0]["type"] == "capture" and items[0]["amount"] == -12


def test_a_replayed_hold_says_what_became_of_it_and_how_old_it_is(api):
    """Two proxies placing one interaction window's hold under one key (ADR 8) learn from the
    replay whether it is still active, captured or released, and its age by billing's clock."""
    import time

    user = new_user(api, 100)
    body = {"user_id": user, "amount": 5, "idempotency_key": "ix:w:0", "ttl_seconds": 600}
    first = api.post("/v1/credits/holds", json=body, headers=SERVICE).json()
    assert (first["status"], first["age_seconds"], first["replayed"]) == ("active", 0.0, False)
    time.sleep(0.3)
    again = api.post("/v1/credits/holds", json=body, headers=SERVICE)
    assert again.status_code == 201
    doc = again.json()
    assert (doc["hold_id"], doc["status"], doc["replayed"]) == (first["hold_id"], "active", True)
    assert 0.25 <= doc["age_seconds"] < 10
    assert api.post(f"/v1/credits/holds/{first['hold_id']}/capture", headers=SERVICE).status_code == 200
    assert api.post("/v1/credits/holds", json=body, headers=SERVICE).json()["status"] == "captured"
    other = api.post("/v1/credits/holds", json={**body, "idempotency_key": "ix:w:1"}, headers=SERVICE).json()
    api.post(f"/v1/credits/holds/{other['hold_id']}/release", headers=SERVICE)
    assert api.post("/v1/credits/holds", json={**body, "idempotency_key": "ix:w:1"}, headers=SERVICE).json()["status"] == "released"
    assert balance(api, user) == 95


def test_hold_release_is_idempotent_and_not_capturable_after(api):
    user = new_user(api, 50)
    hold = api.post("/v1/credits/holds", json={"user_id": user, "amount": 50, "idempotency_key": "h"}, headers=SERVICE).json()["hold_id"]
    assert balance(api, user) == 0
    for _ in range(2):
        r = api.post(f"/v1/credits/holds/{hold}/release", headers=SERVICE)
        assert r.status_code == 200 and r.json()["balance"] == 50 and r.json()["status"] == "released"
    assert api.post(f"/v1/credits/holds/{hold}/capture", headers=SERVICE).status_code == 409
    assert balance(api, user) == 50


def test_hold_without_funds_is_402_and_capture_over_hold_is_422(api):
    user = new_user(api, 20)
    r = api.post("/v1/credits/holds", json={"user_id": user, "amount": 21, "idempotency_key": "h"}, headers=SERVICE)
    assert r.status_code == 402 and balance(api, user) == 20
    hold = api.post("/v1/credits/holds", json={"user_id": user, "amount": 20, "idempotency_key": "h2"}, headers=SERVICE).json()["hold_id"]
    assert api.post(f"/v1/credits/holds/{hold}/capture", json={"amount": 21}, headers=SERVICE).status_code == 422
    assert api.post(f"/v1/credits/holds/{uuid.uuid4()}/capture", headers=SERVICE).status_code == 404
    assert api.post("/v1/credits/holds", json={"user_id": user, "amount": 5, "idempotency_key": "x"}, headers=bearer("user", user)).status_code == 403


def test_expired_hold_is_released_and_cannot_be_captured(api):
    import time

    user = new_user(api, 40)
    hold = api.post("/v1/credits/holds", json={"user_id": user, "amount": 40, "idempotency_key": "h", "ttl_seconds": 1},
                    headers=SERVICE).json()["hold_id"]
    assert balance(api, user) == 0
    time.sleep(1.2)
    r = api.post(f"/v1/credits/holds/{hold}/capture", headers=SERVICE)
    assert r.status_code == 409 and "expired" in r.json()["error"]["message"]
    deadline = time.time() + 10
    while balance(api, user) != 40:  # the sweeper releases it
        assert time.time() < deadline
        time.sleep(0.2)


def test_usage_is_newest_first_with_a_cursor(api):
    user = new_user(api, 100)
    for i in range(5):
        api.post("/v1/credits/consume", json={"user_id": user, "amount": i + 1, "idempotency_key": f"u{i}"}, headers=SERVICE)
    page = api.get(f"/v1/usage/{user}", params={"limit": 3}, headers=SERVICE).json()
    assert [i["amount"] for i in page["items"]] == [-5, -4, -3]
    rest = api.get(f"/v1/usage/{user}", params={"limit": 3, "cursor": page["next_cursor"]}, headers=SERVICE).json()
    assert [i["amount"] for i in rest["items"]] == [-2, -1, 100 - 15]
    last = api.get(f"/v1/usage/{user}", params={"limit": 3, "cursor": rest["next_cursor"]}, headers=SERVICE).json()
    assert [(i["type"], i["amount"], i["balance_after"]) for i in last["items"]] == [("signup", 15, 15)]
    assert last["next_cursor"] is None
    assert api.get(f"/v1/usage/{user}", params={"cursor": "'; DROP TABLE users; --"}, headers=SERVICE).status_code == 422
    assert api.get(f"/v1/usage/{uuid.uuid4()}", headers=SERVICE).status_code == 404


def test_metrics_are_prometheus_text_without_user_ids(api):
    user = new_user(api)
    api.get(f"/v1/credits/{user}", headers=SERVICE)
    text = api.get("/metrics").text
    assert "billing_request_seconds_bucket" in text and 'route="/v1/credits/{user_id}"' in text
    assert user not in text


@pytest.mark.parametrize("path", ["/v1/credits/consume", "/v1/credits/grant", "/v1/users"])
def test_routes_need_a_token(api, path):
    r = api.post(path, json={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
