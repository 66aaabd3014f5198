"""Purchases through Stripe Checkout (Stripe's API faked at STRIPE_API_BASE) and webhooks signed
with the real Stripe signature scheme."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import stripe

from tests.billing.conftest import OTHER_REGION_WEBHOOK_SECRET, WEBHOOK_SECRET, Billing, balance, bearer, new_user
from tests.postgres.conftest import free_port


def signed(event: dict, secret: str = WEBHOOK_SECRET, at: int | None = None) -> tuple[bytes, dict]:
    payload = json.dumps(event).encode()
    t = at if at is not None else int(time.time())
    sig = stripe.WebhookSignature._compute_signature(f"{t}.{payload.decode()}", secret)
    return payload, {"stripe-signature": f"t={t},v1={sig}", "content-type": "application/json"}


def completed(user: str, credits: int, session: str | None = None, paid: bool = True, kind: str = "checkout.session.completed") -> dict:
    session = session or f"cs_test_{uuid.uuid4().hex}"
    return {
        "id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind,
        "data": {"object": {
            "id": session, "object": "checkout.session", "client_reference_id": user,
            "metadata": {"user_id": user, "credits": str(credits)}, "payment_status": "paid" if paid else "unpaid",
            "amount_total": credits, "payment_intent": f"pi_{session}",
        }},
    }


def refunded(session: str, refunded_cents: int, total: int) -> dict:
    return {
        "id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "charge.refunded",
        "data": {"object": {"id": f"ch_{session}", "object": "charge", "payment_intent": f"pi_{session}",
                            "amount": total, "amount_refunded": refunded_cents}},
    }


def deliver(api, event, **kw):
    payload, headers = signed(event, **kw)
    return api.post("/v1/webhooks/stripe", content=payload, headers=headers)


def test_purchase_creates_a_checkout_session(api, stripe_api):
    user = new_user(api)
    r = api.post("/v1/credits/purchase", json={"credits": 2000}, headers=bearer("user", user))
    assert r.status_code == 200, r.text
    assert r.json()["checkout_url"].endswith(r.json()["session_id"])
    sent = stripe_api.requests[-1]
    assert sent["path"] == "/v1/checkout/sessions" and sent["auth"] == "Bearer sk_test_CANARY_stripe_key"
    p = sent["params"]
    assert p["mode"] == "payment" and p["client_reference_id"] == user
    assert p["metadata[user_id]"] == user and p["metadata[credits]"] == "2000"
    assert p["line_items[0][price_data][unit_amount]"] == "2000" and p["line_items[0][price_data][currency]"] == "usd"


def test_purchase_errors(api, stripe_api):
    user = new_user(api)
    assert api.post("/v1/credits/purchase", json={"credits": 7}, headers=bearer("user", user)).status_code == 422
    assert api.post("/v1/credits/purchase", json={"credits": 500}, headers=bearer("service", "proxy")).status_code == 403
    assert api.post("/v1/credits/purchase", json={"credits": 500}, headers=bearer("user", "not-a-uuid")).status_code == 404
    stripe_api.fail = True
    try:
        r = api.post("/v1/credits/purchase", json={"credits": 500}, headers=bearer("user", user))
        assert r.status_code == 502 and "sk_test" not in r.text
    finally:
        stripe_api.fail = False


def test_paid_checkout_grants_once_per_session(api):
    user = new_user(api)
    event = completed(user, 500)
    r = deliver(api, event)
    assert r.status_code == 200 and r.json()["outcome"] == "credited"
    assert balance(api, user) == 515
    assert deliver(api, event).json()["outcome"] == "duplicate"  # the same event again
    # async_payment_succeeded for the same session (another event id) does not grant twice.
    session = event["data"]["object"]["id"]
    again = completed(user, 500, session=session, kind="checkout.session.async_payment_succeeded")
    assert deliver(api, again).json()["outcome"] == "already_credited"
    assert balance(api, user) == 515


def test_unpaid_then_async_success(api):
    user = new_user(api)
    first = completed(user, 500, paid=False)
    assert deliver(api, first).json()["outcome"] == "not_paid"
    assert balance(api, user) == 15
    later = completed(user, 500, session=first["data"]["object"]["id"], kind="checkout.session.async_payment_succeeded")
    assert deliver(api, later).json()["outcome"] == "credited"
    assert balance(api, user) == 515


def test_concurrent_redeliveries_credit_once(billing):
    with httpx.Client(base_url=billing.url, timeout=30) as api:
        user = new_user(api)
        payload, headers = signed(completed(user, 2000))
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: httpx.post(f"{billing.url}/v1/webhooks/stripe", content=payload, headers=headers, timeout=30), range(10)))
        assert all(r.status_code == 200 for r in results)
        assert sorted(r.json()["outcome"] for r in results) == ["credited"] + ["duplicate"] * 9
        assert balance(api, user) == 2015


def test_bad_or_stale_signature_is_400_and_stores_nothing(api):
    user = new_user(api)
    event = completed(user, 500)
    assert deliver(api, event, secret="whsec_wrong").status_code == 400
    assert deliver(api, event, at=int(time.time()) - 3600).status_code == 400
    payload, headers = signed(event)
    tampered = payload.replace(b'"500"', b'"10000"')
    assert api.post("/v1/webhooks/stripe", content=tampered, headers=headers).status_code == 400
    assert api.post("/v1/webhooks/stripe", content=payload).status_code == 400  # no signature header
    assert balance(api, user) == 15
    # Nothing was recorded: the genuine delivery still credits.
    assert deliver(api, event).json()["outcome"] == "credited"


def test_every_regions_endpoint_secret_verifies_and_the_event_counts_once(api):
    """Stripe sends each event to every registered endpoint (one per region), each signed with that
    endpoint's secret: billing knows them all, so whichever region is up takes it, and a second
    delivery of the same event (the other region's) changes nothing."""
    user = new_user(api)
    event = completed(user, 500)
    r = deliver(api, event, secret=OTHER_REGION_WEBHOOK_SECRET)
    assert r.status_code == 200 and r.json()["outcome"] == "credited"
    assert deliver(api, event).json()["outcome"] == "duplicate"
    assert balance(api, user) == 515


def test_a_webhook_secret_that_is_not_one_is_refused_at_start_without_its_value():
    from billing.settings import SettingsError, _webhook_secrets

    assert _webhook_secrets({"STRIPE_WEBHOOK_SECRET": " whsec_a ,whsec_b"}) == ("whsec_a", "whsec_b")
    with pytest.raises(SettingsError, match="item 2 is not a Stripe endpoint secret") as e:
        _webhook_secrets({"STRIPE_WEBHOOK_SECRET": "whsec_a,sk_live_CANARY"})
    assert "CANARY" not in str(e.value)


def test_refund_takes_credits_back_down_to_zero_and_counts_the_shortfall(api):
    user = new_user(api)
    event = completed(user, 1000)
    deliver(api, event)
    session = event["data"]["object"]["id"]
    assert balance(api, user) == 1015
    # Half refunded: 500 credits back.
    assert deliver(api, refunded(session, 500, 1000)).json()["outcome"] == "refunded"
    assert balance(api, user) == 515
    # The user spends most of the rest, then the remainder is refunded: only what is left is taken.
    api.post("/v1/credits/consume", json={"user_id": user, "amount": 415, "idempotency_key": "spend"}, headers=bearer("service", "proxy"))
    before = _shortfall_metric(api)
    r = deliver(api, refunded(session, 1000, 1000))
    assert r.json()["outcome"] == "refunded_with_shortfall"
    assert balance(api, user) == 0
    assert _shortfall_metric(api) - before == 400
    items = api.get(f"/v1/usage/{user}", headers=bearer("service", "proxy")).json()["items"]
    assert [i["amount"] for i in items if i["type"] == "refund"] == [-100, -500]


def _shortfall_metric(api) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith("billing_refund_shortfall_cents_total "):
            return float(line.split()[1])
    return 0.0


def test_billing_starts_without_stripe_keys_and_only_payments_answer_503(billing, tmp_path):
    """STRIPE_SECRET_KEY unset and STRIPE_WEBHOOK_SECRET empty: billing serves everything else;
    purchases and webhooks answer 503 payments_unavailable naming the missing variable."""
    env = {k: v for k, v in billing.env.items() if k != "STRIPE_SECRET_KEY"}
    env.update(STRIPE_WEBHOOK_SECRET="", PORT=str(free_port()))
    keyless = Billing(env, tmp_path / "billing.log")
    keyless.start()
    try:
        with httpx.Client(base_url=keyless.url, timeout=30) as api:
            user = new_user(api)
            r = api.post("/v1/credits/consume", json={"user_id": user, "idempotency_key": "k"}, headers=bearer("service", "proxy"))
            assert r.status_code == 200 and r.json()["balance"] == 10
            r = api.post("/v1/credits/purchase", json={"credits": 500}, headers=bearer("user", user))
            assert r.status_code == 503 and r.json()["error"]["code"] == "payments_unavailable"
            assert "STRIPE_SECRET_KEY is not set" in r.json()["error"]["message"]
            r = deliver(api, completed(user, 500))
            assert r.status_code == 503 and r.json()["error"]["code"] == "payments_unavailable"
            assert "STRIPE_WEBHOOK_SECRET is not set" in r.json()["error"]["message"]
            assert balance(api, user) == 10
    finally:
        keyless.stop()
