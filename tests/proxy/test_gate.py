"""The credit gate end to end: billing's tokens, a hold around every paid call, provider fallbacks."""

from __future__ import annotations

import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.billing.conftest import PREVIOUS_KEY, kid
from tests.proxy.conftest import balance, chat, holds, new_user, token, total_requests, user_token

PRICE = 5


def test_health_needs_no_token(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "healthy"}


def test_serving_until_a_deploy_drains_it_while_paid_calls_still_answer(client, proxy, api):
    """The edge's health check (ADR 16): 503 while the drain file exists, nothing else changes."""
    drain = Path(proxy.env["DRAIN_FILE"])
    assert client.get("/serving").json() == {"status": "serving"}
    drain.touch()
    try:
        r = client.get("/serving")
        assert (r.status_code, r.json()) == (503, {"status": "draining"})
        assert chat(client, user_token(new_user(api))).status_code == 200
    finally:
        drain.unlink()
    assert client.get("/serving").status_code == 200


def test_models_lists_the_exposed_models(client, api):
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {user_token(new_user(api))}"})
    assert r.status_code == 200, r.text
    ids = {m["id"] for m in r.json()["data"]}
    assert {"llama-3.3-70b", "llama-3.1-8b"} <= ids


def test_paid_request_is_charged_once(client, api, cluster, upstreams):
    user = new_user(api, 15)
    r = chat(client, user_token(user))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello from together"
    assert holds(cluster, user) == [("captured", PRICE)]
    assert balance(api, user) == 15 - PRICE


@pytest.mark.parametrize("headers", [None, {}], ids=["its_kid", "before_kids"])
def test_a_token_of_billings_previous_key_still_pays(client, api, cluster, headers):
    """The proxy reads billing's published key set (ADR 21): a key that no longer signs still verifies."""
    user = new_user(api, 15)
    assert chat(client, token("user", user, key=PREVIOUS_KEY, headers=headers)).status_code == 200
    assert balance(api, user) == 15 - PRICE


def test_primary_down_falls_back_to_the_next_provider(client, api, cluster, upstreams):
    upstreams["together"].control(fail=True)
    user = new_user(api, 15)
    before = upstreams["together"].requests
    r = chat(client, user_token(user))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello from groq"
    assert r.json()["model"] == "llama-3.3-70b"  # the exposed name, not Groq's id
    assert upstreams["together"].requests > before  # tried first, in the FSD's order
    assert holds(cluster, user) == [("captured", PRICE)]
    assert balance(api, user) == 15 - PRICE


def test_metrics_count_calls_by_provider_and_settlements_by_outcome(client, api, upstreams):
    upstreams["together"].control(fail=True)
    assert chat(client, user_token(new_user(api, 15))).status_code == 200
    text = client.get("/metrics").text
    assert 'ciris_proxy_upstream_total{provider="together_ai",result="error"}' in text
    assert 'ciris_proxy_upstream_total{provider="groq",result="ok"}' in text
    assert 'ciris_proxy_settled_total{outcome="captured"}' in text and 'ciris_proxy_holds_total{outcome="placed"}' in text


def test_every_provider_down_releases_the_hold(client, api, cluster, upstreams):
    for name in ("together", "groq", "openrouter"):
        upstreams[name].control(fail=True)
    user = new_user(api, 15)
    r = chat(client, user_token(user))
    assert r.status_code >= 500, r.text
    assert holds(cluster, user) == [("released", PRICE)]
    assert balance(api, user) == 15


def test_insufficient_credits_is_402_before_any_upstream(client, api, cluster, upstreams):
    user = new_user(api, PRICE - 1)
    before = total_requests(upstreams)
    r = chat(client, user_token(user))
    assert r.status_code == 402, r.text
    assert "insufficient credits" in r.text and f"balance is {PRICE - 1} cents" in r.text
    assert total_requests(upstreams) == before
    assert holds(cluster, user) == [] and balance(api, user) == PRICE - 1


def _tokens(user: str) -> dict[str, str | None]:
    now = int(time.time())
    forger = Ed25519PrivateKey.generate()
    return {
        "missing": None,
        "garbage": "not-a-jwt",
        "forged": token("user", user, key=forger),
        "forged naming our key": token("user", user, key=forger, headers={"kid": kid()}),
        "forged without kid": token("user", user, key=forger, headers={}),
        "kid not published": token("user", user, headers={"kid": "retired"}),
        "expired": token("user", user, iat=now - 7200, exp=now - 3600),
        "wrong audience": token("user", user, aud="someone-else"),
        "wrong issuer": token("user", user, iss="someone-else"),
        "service role": token("service", user),
        "the proxy's own role": token("proxy", user, gen="2"),
        "not a user id": token("user", "ops"),
        "unknown user": token("user", "00000000-0000-4000-8000-000000000000"),
        "no expiry": token("user", user, exp=None),
    }


@pytest.mark.parametrize("case", list(_tokens("x")))
def test_bad_tokens_are_401_and_reach_no_upstream(client, api, upstreams, case):
    user = new_user(api, 15)
    before = total_requests(upstreams)
    r = chat(client, _tokens(user)[case])
    assert r.status_code == 401, (case, r.status_code, r.text)
    assert total_requests(upstreams) == before
    assert balance(api, user) == 15


def test_expired_token_says_so(client, api):
    now = int(time.time())
    r = chat(client, token("user", new_user(api), iat=now - 7200, exp=now - 3600))
    assert r.status_code == 401 and "token expired" in r.text


@pytest.mark.parametrize("method, path", [
    ("GET", "/model/info"), ("POST", "/key/generate"), ("GET", "/ui"), ("GET", "/docs"), ("GET", "/openapi.json"),
    ("POST", "/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("GET", "/spend/logs"),
    ("POST", "/v1/responses"), ("GET", "/health/liveliness"), ("POST", "/v1/chat/completions/x"),
])
def test_only_the_public_surface_exists(client, api, upstreams, method, path):
    """/v1/models, /v1/chat/completions, /health (and internal /ready, /metrics): everything else is 404."""
    before = total_requests(upstreams)
    r = client.request(method, path, headers={"Authorization": f"Bearer {user_token(new_user(api))}"}, json={"model": "x"})
    assert r.status_code == 404, (path, r.status_code, r.text)
    assert r.json()["error"]["code"] == "not_found"
    assert total_requests(upstreams) == before


def test_the_wrong_method_is_405(client):
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_readiness_says_whether_billing_answers(client):
    r = client.get("/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def billing_health_asked(api) -> float:
    text = api.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("billing_request_seconds_count{") and 'route="/health"' in line)


def test_a_flood_of_readiness_probes_is_not_a_flood_on_billing(proxy, api):
    """/ready is public through the edge: 200 concurrent probes share billing's answer (at most one
    request a second), so nobody can load billing's write probe through it."""
    time.sleep(1.5)  # past any answer an earlier test's /ready left
    before, started = billing_health_asked(api), time.monotonic()
    with httpx.Client(base_url=proxy.url, timeout=60, limits=httpx.Limits(max_connections=50)) as c, \
            ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda _: c.get("/ready"), range(200)))
    took = time.monotonic() - started
    assert [r.status_code for r in answers] == [200] * 200
    asked = billing_health_asked(api) - before
    assert 1 <= asked <= took + 2, (asked, took)  # one proxy process (its journal's lock)


def test_a_client_cannot_choose_the_call_id(client, api, cluster):
    """The call id is the hold's idempotency key: a replayed one must not buy a second answer."""
    user = new_user(api, 15)
    fixed = {"x-litellm-call-id": "00000000-0000-4000-8000-00000000c0de"}
    for _ in range(2):
        assert chat(client, user_token(user), headers=fixed).status_code == 200
    assert holds(cluster, user) == [("captured", PRICE), ("captured", PRICE)]
    assert balance(api, user) == 15 - 2 * PRICE
