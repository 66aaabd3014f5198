"""Sign-in with Google and Apple ID tokens (identity.py, ADR 17), against the real process and
database and a local HTTPS issuer with real RSA keys (tests/oidc_issuer.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.billing.conftest import SERVICE, Billing, balance, database_url, free_port, run
from tests.oidc_issuer import CLIENT_IDS, new_key


def sub() -> str:
    return f"sub-{uuid.uuid4().hex}"


def id_bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def sign_in(api, token: str) -> httpx.Response:
    return api.post("/v1/auth/token", json={"id_token": token})


def identity_rows(cluster, provider: str, subject: str) -> list[tuple]:
    with psycopg.connect(database_url(cluster)) as conn:
        return conn.execute("SELECT user_id FROM identities WHERE provider = %s AND subject = %s", (provider, subject)).fetchall()


def test_an_id_token_signs_in_once_and_keeps_its_user(api, oidc):
    subject = sub()
    first = sign_in(api, oidc.id_token("google", subject, email="me@example.org"))
    assert first.status_code == 200, first.text
    user = first.json()["user_id"]
    again = sign_in(api, oidc.id_token("google", subject))
    assert again.json()["user_id"] == user
    ours = {"Authorization": f"Bearer {first.json()['access_token']}"}
    assert api.get(f"/v1/credits/{user}", headers=ours).json()["balance"] == 15  # signup credits, once
    # The same subject at Apple is another person.
    assert sign_in(api, oidc.id_token("apple", subject)).json()["user_id"] != user


def test_an_id_token_is_accepted_directly_as_bearer(api, oidc):
    subject = sub()
    token = oidc.id_token("apple", subject)
    user = sign_in(api, token).json()["user_id"]
    assert api.get(f"/v1/credits/{user}", headers=id_bearer(token)).json()["balance"] == 15
    # First sight as a bearer creates the user too; and it acts only for itself.
    other = oidc.id_token("google", sub())
    r = api.get(f"/v1/credits/{user}", headers=id_bearer(other))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert api.get(f"/v1/usage/{user}", headers=id_bearer(token)).json()["items"][0]["type"] == "signup"


def test_the_admin_path_of_the_token_route_is_unchanged(api):
    from tests.billing.conftest import ADMIN, new_user

    user = new_user(api)
    assert api.post("/v1/auth/token", json={"user_id": user}, headers=ADMIN).json()["user_id"] == user
    assert api.post("/v1/auth/token", json={"user_id": user}).status_code == 401
    r = api.post("/v1/auth/token", json={"user_id": user, "id_token": "a.b.c"}, headers=ADMIN)
    assert r.status_code == 422 and "exactly one" in r.json()["error"]["message"]


def b64(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def hostile_tokens(oidc, subject: str) -> dict[str, tuple[str, str]]:
    """Each hostile token and the words its 401 must say."""
    claims = json.loads(base64.urlsafe_b64decode(oidc.id_token("google", subject).split(".")[1] + "=="))
    public_pem = oidc.keys["google"]["google-1"].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    hs = b64({"alg": "HS256", "typ": "JWT", "kid": "google-1"}) + "." + b64(claims)
    hs_sig = base64.urlsafe_b64encode(hmac.new(public_pem, hs.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    return {
        "forged": (oidc.id_token("google", subject, key=new_key(), kid="google-1"), "invalid"),
        "expired": (oidc.id_token("google", subject, ttl=-120), "expired"),  # past the 60 s leeway
        "wrong_audience": (oidc.id_token("google", subject, aud="someone-else.apps.googleusercontent.com"), "aud"),
        "other_providers_audience": (oidc.id_token("google", subject, aud=CLIENT_IDS["apple"]), "aud"),
        "wrong_issuer": (oidc.id_token("google", subject, iss="https://accounts.evil.example"), "iss"),
        "unknown_kid": (oidc.id_token("google", subject, kid="never-published"), "kid"),
        "alg_none": (b64({"alg": "none", "typ": "JWT", "kid": "google-1"}) + "." + b64(claims) + ".", "algorithm"),
        "hs256_with_public_key": (f"{hs}.{hs_sig}", "algorithm"),
        "empty_subject": (oidc.id_token("google", ""), "invalid"),
        "no_expiry": (oidc.id_token("google", subject, exp=None), "invalid"),
        "empty_claims": ("e30.e30.", "iss"),
    }


@pytest.mark.parametrize("kind", [
    "forged", "expired", "wrong_audience", "other_providers_audience", "wrong_issuer", "unknown_kid", "alg_none",
    "hs256_with_public_key", "empty_subject", "no_expiry", "empty_claims"])
def test_hostile_id_tokens_are_401_and_create_nothing(api, oidc, cluster, billing, kind):
    subject = sub()
    token, says = hostile_tokens(oidc, subject)[kind]
    for r in (sign_in(api, token), api.get(f"/v1/credits/{uuid.uuid4()}", headers=id_bearer(token))):
        assert r.status_code == 401, (kind, r.text)
        error = r.json()["error"]
        assert error["code"] == "unauthorized" and error["message"].startswith("id_token: ") and says in error["message"], error
    assert identity_rows(cluster, "google", subject) == []
    assert token not in billing.log.read_text() and subject not in billing.log.read_text()


def test_oversized_or_odd_id_tokens_are_422_naming_the_field(api):
    for odd in ("x" * 9000, "not a jwt at all", "a.b.c\x00", 12):
        r = api.post("/v1/auth/token", json={"id_token": odd})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("id_token"), r.text
    assert api.post("/v1/auth/token", json={"id_token": "a.b.c", "email": "x@y.z"}).status_code == 422


def test_two_regions_creating_one_new_user_at_once_make_one_user_with_one_signup(api, oidc, cluster, billing, tmp_path):
    """Both regions' billing write to the one primary: the identity's primary key decides."""
    other = Billing({**billing.env, "PORT": str(free_port())}, tmp_path / "billing2.log")
    other.start()
    try:
        for _ in range(3):
            subject = sub()
            token = oidc.id_token("google", subject)

            async def first_calls():
                async with httpx.AsyncClient(timeout=60) as client:
                    calls = [client.post(f"{url}/v1/auth/token", json={"id_token": token})
                             for url in (billing.url, other.url) for _ in range(4)]
                    return await asyncio.gather(*calls)

            answers = run(first_calls())
            assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
            users = {r.json()["user_id"] for r in answers}
            assert len(users) == 1 and identity_rows(cluster, "google", subject) == [(uuid.UUID(users.pop()),)]
            user = answers[0].json()["user_id"]
            with psycopg.connect(database_url(cluster)) as conn:
                signups = conn.execute("SELECT count(*) FROM transactions WHERE user_id = %s AND type = 'signup'", (user,)).fetchone()
            assert signups == (1,)
            assert balance(api, user) == 15
    finally:
        other.stop()


def test_jwks_is_refetched_for_a_new_kid_at_most_once_a_minute_and_kept_through_an_outage(oidc):
    """identity.Keys in this process against the local issuer: rotation, throttling, an outage."""
    import ssl

    from billing import identity

    async def scenario():
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=oidc.ca_file)) as client:
            keys = identity.Keys(oidc.jwks_url("apple"), client)
            fetches = lambda: oidc.jwks_requests["apple"]  # noqa: E731
            start = fetches()
            await keys.get("apple-1")
            assert fetches() == start + 1
            kid = oidc.rotate("apple")
            with pytest.raises(identity.IdentityError, match="unknown_key"):  # within the minute: no fetch
                await keys.get(kid)
            assert fetches() == start + 1
            keys.attempted -= identity.REFETCH_INTERVAL  # a minute later
            assert (await keys.get(kid)).key_id == kid and fetches() == start + 2
            for _ in range(20):  # a flood of unknown kids costs at most one fetch a minute
                with pytest.raises(identity.IdentityError):
                    await keys.get(f"forged-{uuid.uuid4().hex}")
            assert fetches() == start + 2
            oidc.down = True
            try:
                keys.attempted -= identity.REFETCH_INTERVAL
                keys.fetched -= identity.MAX_KEY_AGE + 1  # stale, and the issuer is down: keep what we had
                assert (await keys.get("apple-1")).key_id == "apple-1"
                assert (await keys.get(kid)).key_id == kid
            finally:
                oidc.down = False

    run(scenario())


def test_oidc_settings_are_checked():
    from billing.settings import SettingsError, _issuers

    assert _issuers({}) == ()
    google = _issuers({"OIDC_GOOGLE_CLIENT_IDS": "a, b"})[0]
    assert (google.client_ids, google.algorithm, google.issuers) == (("a", "b"), "RS256", ("https://accounts.google.com", "accounts.google.com"))
    with pytest.raises(SettingsError, match="OIDC_APPLE_JWKS_URL"):
        _issuers({"OIDC_APPLE_CLIENT_IDS": "x", "OIDC_APPLE_JWKS_URL": "http://appleid.apple.com/auth/keys"})
    for alg in ("none", "HS256"):
        with pytest.raises(SettingsError, match="OIDC_GOOGLE_ALGORITHM"):
            _issuers({"OIDC_GOOGLE_CLIENT_IDS": "x", "OIDC_GOOGLE_ALGORITHM": alg})


def test_google_play_settings_are_checked(tmp_path):
    from billing.settings import SettingsError, _play_account, _play_products

    assert _play_products({})["credits_100"] == 999
    assert _play_products({"GOOGLE_PLAY_PRODUCTS": "a:1, b.c:20"}) == {"a": 1, "b.c": 20}
    for bad in ("a", "a:0", "a:-1", ":5", "a:x"):
        with pytest.raises(SettingsError, match="GOOGLE_PLAY_PRODUCTS"):
            _play_products({"GOOGLE_PLAY_PRODUCTS": bad})
    assert _play_account({}) is None
    missing, junk = tmp_path / "missing.json", tmp_path / "junk.json"
    junk.write_text('{"client_email": 1}')
    for path in (missing, junk):
        with pytest.raises(SettingsError, match="GOOGLE_PLAY_SERVICE_ACCOUNT_FILE"):
            _play_account({"GOOGLE_PLAY_SERVICE_ACCOUNT_FILE": str(path)})
