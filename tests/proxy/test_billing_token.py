"""The proxy's own billing token (ADR 25): a proxy of either generation billing accepts serves paid
calls (a rotation's middle step); one of a revoked generation charges nothing, reaches no upstream,
and says in its log that its own token is the problem."""

from __future__ import annotations

import httpx

from tests.billing.conftest import PROXY_GENERATIONS
from tests.proxy.conftest import chat, new_user, settled, total_requests, user_token

PRICE = 5


def test_during_a_rotation_a_proxy_of_either_generation_serves_and_charges(second_proxy, billing, api):
    for generation in PROXY_GENERATIONS:
        p = second_proxy(billing.url, generation=generation)
        user = new_user(api, 15)
        with httpx.Client(base_url=p.url, timeout=60) as client:
            r = chat(client, user_token(user))
        assert r.status_code == 200, (generation, r.text)
        assert settled(api, user, 15 - PRICE) == 15 - PRICE
        p.stop()


def test_a_revoked_generation_answers_503_charges_nothing_and_names_the_proxys_token(second_proxy, billing, api, upstreams):
    p = second_proxy(billing.url, generation="0")  # billing accepts only PROXY_GENERATIONS
    user = new_user(api, 15)
    before = total_requests(upstreams)
    with httpx.Client(base_url=p.url, timeout=60) as client:
        r = chat(client, user_token(user))
    assert r.status_code == 503 and r.json()["error"]["code"] == "billing_unavailable", r.text
    assert total_requests(upstreams) == before and settled(api, user, 15) == 15
    log = p.log.read_text()
    assert "billing refused a hold: HTTP 401; check the proxy's billing token" in log
    assert "Bearer" not in log and "eyJ" not in log  # never the token itself
