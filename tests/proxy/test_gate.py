"""The credit gate end to end: billing's tokens, a hold around every paid call, provider fallbacks."""

from __future__ import annotations

from tests.proxy.conftest import MODEL, chat, new_user, settled, total_requests, user_token

PRICE = 5


def test_health_needs_no_token(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "healthy"}


def test_paid_request_is_charged_once(client, api, upstreams):
    user = new_user(api, 15)
    r = chat(client, user_token(user))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello from together"
    assert settled(api, user, 15 - PRICE) == 15 - PRICE
