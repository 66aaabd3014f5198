"""Token attacks, malformed input (nothing changed, never a 5xx), and fuzzing of the OpenAPI schema."""

from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.billing.conftest import ADMIN, KEY, PREVIOUS_KEY, SERVICE, balance, bearer, kid, new_user, token


def b64(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def signed(header: dict, claims: dict, key=KEY) -> str:
    """Any header, signed by `key` as EdDSA (PyJWT refuses to make some of them)."""
    signing_input = b64(header) + "." + b64(claims)
    return signing_input + "." + base64.urlsafe_b64encode(key.sign(signing_input.encode())).rstrip(b"=").decode()


def forged_tokens(user: str) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": user, "role": "admin", "iss": "ciris-billing", "aud": "ciris-bridge", "iat": now, "exp": now + 600}
    public_pem = KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    import hashlib
    import hmac

    def hs256(header: dict) -> str:  # signed with the public key as an HMAC secret
        signed = b64({"alg": "HS256", "typ": "JWT", **header}) + "." + b64(claims)
        return f"{signed}." + base64.urlsafe_b64encode(hmac.new(public_pem, signed.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()

    other = Ed25519PrivateKey.generate()
    return {
        "alg_none": b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims) + ".",
        "alg_none_naming_our_key": b64({"alg": "none", "typ": "JWT", "kid": kid()}) + "." + b64(claims) + ".",
        "hs256_with_public_key": hs256({}),
        "hs256_naming_our_key": hs256({"kid": kid()}),
        "other_key": token("admin", user, key=other),  # its own kid: not in the set
        "other_key_naming_our_key": token("admin", user, key=other, headers={"kid": kid()}),
        "other_key_without_kid": token("admin", user, key=other, headers={}),  # tried with each key, none fits
        "our_key_unknown_kid": token("admin", user, headers={"kid": "retired"}),  # the kid decides, not a search
        "our_key_odd_kid": signed({"alg": "EdDSA", "typ": "JWT", "kid": [kid()]}, claims),
        "wrong_audience": token("admin", user, aud="someone-else"),
        "wrong_issuer": token("admin", user, iss="evil"),
        "expired": token("admin", user, exp=now - 120),  # past the 60 s leeway
        "no_exp": token("admin", user, exp=None),
        "bad_role": token("root", user),
        "garbage": "not.a.jwt",
    }


@pytest.mark.parametrize("kind", list(forged_tokens("x")))
def test_forged_tokens_are_401(api, kind):
    user = new_user(api)
    forged = forged_tokens(user)[kind]
    headers = {"Authorization": f"Bearer {forged}"}
    assert api.get(f"/v1/credits/{user}", headers=headers).status_code == 401
    r = api.post("/v1/credits/grant", json={"user_id": user, "amount": 1000, "idempotency_key": "x", "reason": "free"}, headers=headers)
    assert r.status_code == 401
    assert balance(api, user) == 15


def test_a_published_key_that_no_longer_signs_still_verifies(api):
    """After the signer changed (ADR 21): the previous key's tokens, with their kid or from before
    kids, work until they expire; billing's new tokens name the signing key."""
    user = new_user(api)
    for headers in (None, {}):
        old = token("user", user, key=PREVIOUS_KEY, headers=headers)
        assert api.get(f"/v1/credits/{user}", headers={"Authorization": f"Bearer {old}"}).status_code == 200
    r = api.post("/v1/auth/token", json={"user_id": user}, headers=ADMIN)
    fresh = r.json()["access_token"]
    assert jwt.get_unverified_header(fresh) == {"alg": "EdDSA", "typ": "JWT", "kid": kid(KEY)}
    assert api.get(f"/v1/credits/{user}", headers={"Authorization": f"Bearer {fresh}"}).status_code == 200


def test_expiry_leeway_is_60_seconds(api):
    user = new_user(api)
    assert api.get(f"/v1/credits/{user}", headers=bearer("user", user, exp=int(time.time()) - 30)).status_code == 200


def test_user_cannot_reach_another_user_or_admin_routes(api):
    user, other = new_user(api), new_user(api)
    mine = bearer("user", user)
    assert api.get(f"/v1/credits/{other}", headers=mine).status_code == 403
    assert api.get(f"/v1/usage/{other}", headers=mine).status_code == 403
    assert api.post("/v1/users", json={"email": "x@example.org"}, headers=mine).status_code == 403
    assert api.post("/v1/credits/grant", json={"user_id": user, "amount": 5, "idempotency_key": "g", "reason": "r"}, headers=mine).status_code == 403
    assert api.post("/v1/auth/token", json={"user_id": other}, headers=mine).status_code == 403
    assert api.post("/v1/credits/holds", json={"user_id": user, "amount": 5, "idempotency_key": "h"}, headers=mine).status_code == 403
    assert balance(api, user) == 15 and balance(api, other) == 15


BAD_CONSUMES = {
    "huge": {"amount": 10**30},
    "over_limit": {"amount": 1_000_001},
    "negative": {"amount": -5},
    "zero": {"amount": 0},
    "float": {"amount": 5.5},
    "whole_float": {"amount": 5.0},
    "string": {"amount": "5"},
    "bool": {"amount": True},
    "long_key": {"idempotency_key": "k" * 10_000},
    "empty_key": {"idempotency_key": ""},
    "control_key": {"idempotency_key": "a\nb"},
    "sql_key": {"idempotency_key": "x'); DELETE FROM transactions; --", "amount": 10**9},
    "bad_user": {"user_id": "'; DROP TABLE users; --"},
    "long_description": {"description": "d" * 201},
    "extra_field": {"admin": True},
}


@pytest.mark.parametrize("case", list(BAD_CONSUMES))
def test_malformed_consume_is_4xx_and_changes_nothing(api, case):
    user = new_user(api)
    body = {"user_id": user, "idempotency_key": "k", **BAD_CONSUMES[case]}
    r = api.post("/v1/credits/consume", json=body, headers=SERVICE)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"]["code"] in ("invalid_request", "payload_too_large", "insufficient_credits")
    assert balance(api, user) == 15


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'{"user_id": ', "{\"amount\": \"\u0000\"}".encode(), b"\xff\xfe", b"x" * 20_000])
def test_bad_json_is_4xx(api, raw):
    r = api.post("/v1/credits/consume", content=raw, headers={**SERVICE, "content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)


def test_validation_errors_do_not_echo_input(api):
    r = api.post("/v1/credits/consume", json={"user_id": "CANARY-user-value", "idempotency_key": "k"}, headers=SERVICE)
    assert r.status_code == 422 and "CANARY" not in r.text


# --- property-based fuzzing of every operation in the OpenAPI document: zero 5xx ----------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=10,
)
FIELDS = st.sampled_from(["user_id", "amount", "idempotency_key", "description", "ttl_seconds", "reason", "email", "credits"])


@pytest.fixture(scope="module")
def operations(billing):
    import httpx

    doc = httpx.get(f"{billing.url}/openapi.json").json()
    return [(path, method) for path, ops in doc["paths"].items() for method in ops]


def test_fuzzed_requests_never_5xx(api, billing, operations):
    victim = new_user(api)
    path_values = st.sampled_from([victim, str(uuid.uuid4()), "x", "%00", "0" * 300, "'; --"])

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(op=st.sampled_from(operations), fill=path_values,
           body=st.one_of(JSON, st.dictionaries(FIELDS, JSON | path_values, max_size=6)),
           auth=st.sampled_from([ADMIN, SERVICE, bearer("user", victim), bearer("user", "not-a-uuid"), {}]))
    def check(op, fill, body, auth):
        path, method = op
        url = path.replace("{user_id}", fill).replace("{hold_id}", fill)
        if method == "get":
            r = api.get(url, params=body if isinstance(body, dict) else None, headers=auth)
        elif path == "/v1/webhooks/stripe":
            r = api.post(url, json=body, headers={"stripe-signature": "t=1,v1=00"})
        else:
            r = api.post(url, json=body, headers=auth)
        assert r.status_code < 500, (method, url, body, r.status_code, r.text)

    check()
    # Whatever the fuzzing moved went through valid, authorised requests: every chain still verifies.
    r = billing.run("verify-ledger")
    assert r.returncode == 0, r.stderr


# --- text PostgreSQL cannot store, digits that are not ASCII: 422 naming the field, never a 500 ----

STORABLE = {
    "consume_description_nul": ("/v1/credits/consume", lambda u: {"user_id": u, "idempotency_key": "k", "description": "a\u0000b"}, "description"),
    "grant_reason_nul": ("/v1/credits/grant", lambda u: {"user_id": u, "amount": 5, "idempotency_key": "g", "reason": "\u0000"}, "reason"),
    "user_email_nul": ("/v1/users", lambda u: {"email": "a\u0000b@example.org"}, "email"),
    "description_lone_surrogate": ("/v1/credits/consume", lambda u: {"user_id": u, "idempotency_key": "k", "description": "\ud800"}, "description"),
}


@pytest.mark.parametrize("case", list(STORABLE))
def test_unstorable_text_is_422_naming_the_field(api, case):
    path, body, field = STORABLE[case]
    user = new_user(api)
    raw = json.dumps(body(user)).encode()  # \u0000 and \ud800 escaped, as a client would send them
    r = api.post(path, content=raw, headers={**ADMIN, "content-type": "application/json"} if path != "/v1/credits/consume"
                 else {**SERVICE, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request" and r.json()["error"]["message"].startswith(f"{field}: ")
    assert balance(api, user) == 15


@pytest.mark.parametrize("cursor", ["\u0663", "\u00b2", "\uff11", "1\u0663"])
def test_non_ascii_digits_in_the_usage_cursor_are_422(api, cursor):
    user = new_user(api)
    r = api.get(f"/v1/usage/{user}", params={"cursor": cursor}, headers=SERVICE)
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("cursor: "), r.text
