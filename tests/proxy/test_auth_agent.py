"""The credentials the released CIRIS agent sends the proxy (auth.py, ADR 8 "Auth"): a Google or
Apple ID token as the bearer (mobile), a server API key as the bearer or X-API-Key (server), and
billing's own tokens — each resolved to the user billing knows, and each hostile one refused with
nothing sent upstream and nothing charged. Real proxy, real billing and PostgreSQL, the local OIDC
issuer with real keys (tests/oidc_issuer.py)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import httpx
import pytest

from tests.billing.conftest import ADMIN, SERVICE, bearer, oidc  # noqa: F401  (oidc: fixture)
from tests.billing.test_api_keys import mint
from tests.billing.test_identity import hostile_tokens
from tests.proxy.conftest import Proxy, balance, chat, new_user, proxy_env, settled, total_requests, user_token
from tests.proxy.test_standin import own_billing  # noqa: F401  (fixture: a billing the test may stop)

PRICE, SIGNUP = 5, 15


def sub() -> str:
    return f"sub-{uuid.uuid4().hex}"


def resolve(api, **credential) -> httpx.Response:
    return api.post("/v1/auth/resolve", json=credential, headers=SERVICE)


def user_of(api, **credential) -> str:
    r = resolve(api, **credential)
    assert r.status_code == 200, r.text
    return r.json()["user_id"]


def key_header(key: str) -> dict:
    return {"X-API-Key": key}


@pytest.mark.parametrize("provider", ["google", "apple"])
def test_an_id_token_as_the_bearer_is_its_users_call(client, api, oidc, provider):
    token = oidc.id_token(provider, sub())
    r = chat(client, token)
    assert r.status_code == 200, r.text
    user = user_of(api, id_token=token)  # the one user, made on first sight with the signup credits
    assert settled(api, user, SIGNUP - PRICE) == SIGNUP - PRICE
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert chat(client, token).status_code == 200  # remembered: the same user again
    assert settled(api, user, SIGNUP - 2 * PRICE) == SIGNUP - 2 * PRICE


@pytest.mark.parametrize("how", ["bearer", "x-api-key"])
def test_a_server_key_pays_from_its_own_account(client, api, how):
    minted = mint(api, "server agent")
    key = minted["api_key"]
    r = chat(client, key) if how == "bearer" else chat(client, None, headers=key_header(key))
    assert r.status_code == 200, r.text
    account = user_of(api, api_key=key)
    assert settled(api, account, SIGNUP - PRICE) == SIGNUP - PRICE
    # The same account billing's /v1/billing routes reach for that key (ADR 17's identity).
    check = api.post("/v1/billing/credits/check", headers=key_header(key),
                     json={"oauth_provider": "oauth:api_key", "external_id": minted["id"]})
    assert check.json()["credits_remaining"] == SIGNUP - PRICE, check.text


def resolutions(billing) -> float:
    """How many credentials billing has resolved (its request metric, all workers)."""
    text = httpx.get(f"{billing.url}/metrics", timeout=10).text
    m = re.search(r'^billing_request_seconds_count\{method="POST",route="/v1/auth/resolve",status="200"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_concurrent_first_calls_with_one_credential_ask_billing_once(proxy, billing, api, oidc):
    token, key = oidc.id_token("google", sub()), mint(api)["api_key"]
    before = resolutions(billing)

    async def burst():
        async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as c:
            body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
            calls = [c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {credential}"})
                     for credential in (token, key) for _ in range(8)]
            return await asyncio.gather(*calls)

    # Every call got past auth: each account's signup credits pay for 3, the rest are 402.
    assert sorted(r.status_code for r in asyncio.run(burst())) == [200] * 6 + [402] * 10
    assert resolutions(billing) - before == 2


@pytest.mark.parametrize("case", [
    "forged", "expired", "wrong_audience", "other_providers_audience", "wrong_issuer", "unknown_kid", "alg_none",
    "hs256_with_public_key", "empty_subject", "no_expiry"])
def test_hostile_id_tokens_are_401_reach_no_upstream_and_charge_nothing(client, api, oidc, proxy, upstreams, case):
    subject = sub()
    victim = user_of(api, id_token=oidc.id_token("google", subject))  # the subject's real account exists
    token, says = hostile_tokens(oidc, subject)[case]
    before = total_requests(upstreams)
    r = chat(client, token)
    assert r.status_code == 401, (case, r.text)
    error = r.json()["error"]
    assert error["type"] == "authentication_error" and "ID token refused" in error["message"] and says in error["message"]
    assert "Bearer" in error["message"] and token not in r.text
    assert total_requests(upstreams) == before and balance(api, victim) == SIGNUP
    assert token not in proxy.log.read_text()


def test_revoked_unknown_and_odd_keys_are_401_and_charge_nothing(client, api, proxy, upstreams):
    key = mint(api)
    revoked = api.delete(f"/v1/admin/api-keys/{key['id']}", headers=ADMIN)
    assert revoked.status_code == 200
    before = total_requests(upstreams)
    for bad in (key["api_key"], "cbk_live_" + "A" * 43, "cbk_live_" + "A" * 200, "cbk_live_" + "x" * 9000):
        for r in (chat(client, bad), chat(client, None, headers=key_header(bad))):
            assert r.status_code == 401, r.text
            assert "API key refused" in r.json()["error"]["message"] and bad not in r.text
    assert total_requests(upstreams) == before
    assert key["api_key"] not in proxy.log.read_text()


def test_a_bearer_not_in_any_credential_form_is_401_without_asking_billing(client, api, upstreams):
    before = total_requests(upstreams)
    for odd in ("eyJhbGciOiJSUzI1NiJ9.e30!.x", "a.b", "cbk-live-x", "eyJhbGciOiJSUzI1NiJ9" * 3):
        r = chat(client, odd)
        assert r.status_code == 401 and "invalid token" in r.json()["error"]["message"], (odd, r.text)
    assert total_requests(upstreams) == before


def test_a_key_cannot_pay_for_or_charge_a_user_it_does_not_name(client, api, upstreams):
    """A key acts for its own account only: beside another user's token it is refused, and the
    OpenAI `user` field names no one to charge."""
    key = mint(api)["api_key"]
    victim = new_user(api, SIGNUP)
    before = total_requests(upstreams)
    r = chat(client, user_token(victim), headers=key_header(key))
    assert r.status_code == 401 and "not both" in r.json()["error"]["message"], r.text
    assert total_requests(upstreams) == before
    r = chat(client, None, headers=key_header(key), user=victim)
    assert r.status_code == 200, r.text
    account = user_of(api, api_key=key)
    assert settled(api, account, SIGNUP - PRICE) == SIGNUP - PRICE
    assert balance(api, victim) == SIGNUP


def test_resolving_a_credential_is_for_the_proxys_service_token_only(api, oidc):
    key, token = mint(api)["api_key"], oidc.id_token("google", sub())
    for who, status in ((ADMIN, 403), (bearer("user", str(uuid.uuid4())), 403),
                        ({"Authorization": f"Bearer {token}"}, 403), (key_header(key), 401), ({}, 401)):
        r = api.post("/v1/auth/resolve", json={"api_key": key}, headers=who)
        assert r.status_code == status, (who, r.text)
    for odd in ({}, {"api_key": key, "id_token": token}, {"api_key": ""}, {"id_token": "not a jwt"}, {"user_id": "x"}):
        assert resolve(api, **odd).status_code == 422, odd
    refused = resolve(api, api_key="cbk_live_unknown")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "credential_refused"


def test_a_revoked_key_stops_within_its_ttl(api, billing, upstreams, tmp_path):
    env = {**proxy_env(billing.url, upstreams, tmp_path / "captures.jsonl"), "API_KEY_TTL_SECONDS": "1"}
    p = Proxy(env, tmp_path / "proxy.log")
    p.start()
    try:
        key = mint(api)
        with httpx.Client(base_url=p.url, timeout=60) as c:
            assert chat(c, key["api_key"]).status_code == 200
            assert api.delete(f"/v1/admin/api-keys/{key['id']}", headers=ADMIN).status_code == 200
            time.sleep(1.2)
            r = chat(c, key["api_key"])
        assert r.status_code == 401 and "API key refused" in r.text, r.text
    finally:
        p.stop()


def test_while_billing_is_away_known_credentials_work_and_new_ones_are_503(own_billing, api, oidc, upstreams, tmp_path):  # noqa: F811
    env = {**proxy_env(own_billing.url, upstreams, tmp_path / "captures.jsonl"), "API_KEY_TTL_SECONDS": "1",
           "HOLD_PLACEMENT_TIMEOUT_MS": "1000"}
    p = Proxy(env, tmp_path / "proxy.log")
    p.start()
    try:
        known_token, key = oidc.id_token("google", sub()), mint(api)["api_key"]
        with httpx.Client(base_url=p.url, timeout=60) as c:
            assert chat(c, known_token).status_code == 200 and chat(c, key).status_code == 200
            own_billing.stop()
            # Billing cannot place a hold either: the stand-in (on by default) serves users it
            # vouched for recently, so the calls are answered and settled when it is back.
            for credential in (known_token, key):  # the key's TTL (1 s) has passed: its last answer stands
                time.sleep(0.6)
                r = chat(c, credential)
                assert r.status_code == 200, r.text
            for never_seen in (oidc.id_token("google", sub()), mint_unchecked()):
                r = chat(c, never_seen)
                assert r.status_code == 503 and "nothing charged" in r.text, r.text
    finally:
        p.stop()


def mint_unchecked() -> str:
    """A key billing never answered for (it is away): the proxy cannot tell it from a real one."""
    return "cbk_live_" + uuid.uuid4().hex
