"""CIRISBilling's API as the released agent calls it (agent_api.py, ADR 17): credits/check,
charges, transactions; by API key (server agents) and by ID token (the mobile app). One ledger
with the FSD's routes."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.billing.conftest import ADMIN, SERVICE, bearer, run
from tests.billing.test_api_keys import mint

CHECK, CHARGES, TRANSACTIONS = "/v1/billing/credits/check", "/v1/billing/charges", "/v1/billing/transactions"


@pytest.fixture(scope="module")
def key(billing):
    with httpx.Client(base_url=billing.url, timeout=30) as api:
        return {"X-API-Key": mint(api, "test agent")["api_key"]}


def account(provider: str = "google") -> dict:
    return {"oauth_provider": f"oauth:{provider}", "external_id": f"ext-{uuid.uuid4().hex}"}


def charge(who: dict, amount: int = 1, key: str | None = None, **extra) -> dict:
    return {**who, "amount_minor": amount, "currency": "USD", "description": "Message interaction",
            "idempotency_key": key or uuid.uuid4().hex, **extra}


def remaining(api, key, who) -> int:
    r = api.post(CHECK, json=who, headers=key)
    return r.json()["credits_remaining"] if r.status_code == 200 else r.json()["error"]["credits_remaining"]


def test_check_creates_the_account_once_with_the_signup_credits(api, key):
    who = {**account(), "customer_email": "a@example.org", "agent_id": "scout", "context": {"channel_id": "c1"},
           "marketing_opt_in": False, "user_role": "observer", "wa_id": "wa", "tenant_id": "t"}
    first = api.post(CHECK, json=who, headers=key)
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["has_credit"], body["credits_remaining"], body["free_uses_remaining"], body["daily_free_uses_remaining"]) == (True, 15, 0, 0)
    assert api.post(CHECK, json=who, headers=key).json()["credits_remaining"] == 15


def test_charges_debit_once_per_idempotency_key_and_a_repeat_is_409_with_the_charge(api, key):
    who = account()
    r = api.post(CHARGES, json=charge(who, 4, "msg-1", metadata={"message_id": "m1", "channel_id": "c"}), headers=key)
    assert r.status_code == 201, r.text
    first = r.json()
    assert (first["amount_minor"], first["balance_after"], first["currency"]) == (4, 11, "USD")
    assert isinstance(first["charge_id"], str) and uuid.UUID(first["account_id"])
    again = api.post(CHARGES, json=charge(who, 4, "msg-1", metadata={"message_id": "m1", "channel_id": "c"}), headers=key)
    assert again.status_code == 409 and again.headers["X-Existing-Charge-ID"] == first["charge_id"]
    assert remaining(api, key, who) == 11


def test_concurrent_repeats_of_one_charge_debit_once(api, key, billing):
    who = account()
    body = charge(who, 3, "same")

    async def burst():
        async with httpx.AsyncClient(base_url=billing.url, timeout=60) as client:
            import asyncio
            return await asyncio.gather(*[client.post(CHARGES, json=body, headers=key) for _ in range(20)])

    codes = sorted(r.status_code for r in run(burst()))
    assert codes == [201] + [409] * 19, codes
    assert remaining(api, key, who) == 12


def test_nothing_left_is_402_and_never_negative(api, key):
    who = account("apple")
    assert api.post(CHARGES, json=charge(who, 15), headers=key).json()["balance_after"] == 0
    r = api.post(CHECK, json=who, headers=key)
    assert r.status_code == 402 and r.json()["error"]["has_credit"] is False and r.json()["error"]["purchase_required"] is True
    r = api.post(CHARGES, json=charge(who, 1), headers=key)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits"


def test_transactions_are_paged_newest_first(api, key):
    who = account()
    for i in range(5):
        assert api.post(CHARGES, json=charge(who, 1, f"k{i}"), headers=key).status_code == 201
    params = {**who, "limit": 4, "offset": 0}
    page = api.get(TRANSACTIONS, params=params, headers=key).json()
    assert (page["total_count"], page["has_more"], len(page["transactions"])) == (6, True, 4)
    newest = page["transactions"][0]
    assert (newest["type"], newest["amount_minor"], newest["balance_after"], newest["currency"]) == ("charge", -1, 10, "USD")
    last = api.get(TRANSACTIONS, params={**params, "offset": 4}, headers=key).json()
    assert (last["has_more"], [t["transaction_type"] for t in last["transactions"]]) == (False, [None, "grant"])
    assert last["transactions"][-1]["amount_minor"] == 15 and last["transactions"][-1]["type"] == "credit"
    past = api.get(TRANSACTIONS, params={**params, "offset": 100}, headers=key).json()
    assert (past["transactions"], past["total_count"], past["has_more"]) == ([], 6, False)


def test_the_mobile_app_acts_with_its_id_token_for_itself_only(api, oidc):
    subject = f"sub-{uuid.uuid4().hex}"
    me = {"Authorization": f"Bearer {oidc.id_token('google', subject)}"}
    mine = {"oauth_provider": "oauth:google", "external_id": subject}
    assert api.post(CHECK, json=mine, headers=me).json()["credits_remaining"] == 15
    assert api.post(CHARGES, json=charge(mine, 2), headers=me).json()["balance_after"] == 13
    assert api.get(TRANSACTIONS, params=mine, headers=me).json()["total_count"] == 2
    # The same person signed in at /v1/auth/token: the same account, seen from the FSD's routes.
    user = api.post("/v1/auth/token", json={"id_token": oidc.id_token("google", subject)}).json()["user_id"]
    assert api.get(f"/v1/credits/{user}", headers=ADMIN).json()["balance"] == 13
    # Another account, or the same subject at another provider: refused, nothing charged.
    for other in (account(), {"oauth_provider": "oauth:apple", "external_id": subject}):
        for r in (api.post(CHARGES, json=charge(other, 1), headers=me), api.post(CHECK, json=other, headers=me),
                  api.get(TRANSACTIONS, params=other, headers=me)):
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    # Our own user token acts for its identity too, and only for it.
    ours = bearer("user", user)
    assert api.post(CHECK, json=mine, headers=ours).json()["credits_remaining"] == 13
    assert api.post(CHECK, json=account(), headers=ours).status_code == 403
    assert api.get(f"/v1/credits/{user}", headers=ADMIN).json()["balance"] == 13


def test_a_service_token_acts_for_whom_it_names_and_no_credential_is_401(api):
    who = account()
    assert api.post(CHECK, json=who, headers=SERVICE).json()["credits_remaining"] == 15
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = api.post(CHARGES, json=charge(who), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("odd", [
    {"oauth_provider": "google"}, {"oauth_provider": "oauth:Google!"}, {"external_id": ""}, {"external_id": "x" * 256},
    {"amount_minor": 0}, {"amount_minor": -5}, {"amount_minor": 1.5}, {"amount_minor": "1"}, {"amount_minor": 10**12},
    {"currency": "EUR"}, {"description": "x" * 201}, {"description": "a\u0000b"}, {"idempotency_key": "k" * 249},
    {"metadata": {"evil": "x"}}, {"admin": True}, {"marketing_opt_in": "yes"},
])
def test_odd_charges_are_422_naming_the_field_and_charge_nothing(api, key, odd):
    who = account()
    r = api.post(CHARGES, json={**charge(who, 1), **odd}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    field = next(iter(odd))
    assert r.json()["error"]["message"].startswith(field if field != "admin" else "admin"), r.json()
    if "oauth_provider" not in odd and "external_id" not in odd:
        assert remaining(api, key, who) == 15


def test_a_purchase_is_a_payment_intent_whose_credits_come_once(api, key, stripe_api):
    from tests.billing.test_stripe import deliver

    who = account()
    r = api.post("/v1/billing/purchases", json={**who, "customer_email": "buyer@example.org", "return_url": "https://x.test/r",
                                                "wa_id": "google:1", "tenant_id": None, "marketing_opt_in": False,
                                                "user_role": "observer"}, headers=key)
    assert r.status_code == 201, r.text
    bought = r.json()
    assert (bought["amount_minor"], bought["uses_purchased"], bought["currency"], bought["publishable_key"]) == (500, 500, "USD", "pk_test_ciris")
    assert bought["client_secret"].startswith(bought["payment_id"]) and bought["status"] == "requires_payment_method"
    sent = stripe_api.requests[-1]["params"]
    assert sent["metadata[flow]"] == "in_app" and sent["receipt_email"] == "buyer@example.org"
    status = f"/v1/billing/purchases/{bought['payment_id']}/status"
    r = api.get(status, params={**who, "wa_id": "google:1", "user_role": "observer"}, headers=key)
    assert (r.status_code, r.json()["status"], r.json()["credits_added"]) == (200, "requires_payment_method", 0)
    assert "client_secret" not in r.json()
    pi = stripe_api.pay(bought["payment_id"])
    # The status route and the webhook both grant it; once between them, whichever is first.
    assert api.get(status, params=who, headers=key).json()["credits_added"] == 500
    event = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "payment_intent.succeeded", "data": {"object": pi}}
    assert deliver(api, event).json()["outcome"] == "already_credited"
    assert api.get(status, params=who, headers=key).json()["credits_added"] == 500
    assert remaining(api, key, who) == 515
    # Someone else cannot look at it, nor at a payment that does not exist.
    assert api.get(status, params=account(), headers=key).status_code == 404
    assert api.get("/v1/billing/purchases/pi_nope/status", params=who, headers=key).status_code == 404
    assert api.get("/v1/billing/purchases/..%2Fx/status", params=who, headers=key).status_code in (404, 422)


def test_a_succeeded_payment_intent_webhook_grants_once_and_checkout_intents_are_left_to_their_session(api, key, stripe_api):
    from tests.billing.test_stripe import deliver

    who = account()
    bought = api.post("/v1/billing/purchases", json={**who, "customer_email": "b@example.org"}, headers=key).json()
    pi = stripe_api.pay(bought["payment_id"])
    event = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "payment_intent.succeeded", "data": {"object": pi}}
    assert deliver(api, event).json()["outcome"] == "credited"
    assert deliver(api, {**event, "id": f"evt_{uuid.uuid4().hex}"}).json()["outcome"] == "already_credited"
    assert remaining(api, key, who) == 515
    checkout_pi = {**pi, "id": f"pi_{uuid.uuid4().hex}", "metadata": {"user_id": pi["metadata"]["user_id"], "credits": "500"}}
    event = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "payment_intent.succeeded", "data": {"object": checkout_pi}}
    assert deliver(api, event).json()["outcome"] == "ignored"
    assert remaining(api, key, who) == 515


def test_a_purchase_when_stripe_fails_is_502_and_says_nothing_secret(api, key, stripe_api):
    stripe_api.fail = True
    try:
        r = api.post("/v1/billing/purchases", json={**account(), "customer_email": "c@example.org"}, headers=key)
        assert r.status_code == 502 and "sk_test" not in r.text
    finally:
        stripe_api.fail = False


PLAY = "/v1/billing/google-play/verify"


def play_body(who: dict, token: str, product: str = "credits_100", package: str = "ai.ciris.mobile") -> dict:
    return {**who, "email": None, "display_name": None, "purchase_token": token, "product_id": product, "package_name": package}


def test_a_play_purchase_grants_its_credits_once_ever_and_is_consumed(api, key, play_api, billing):
    who = account()
    token = play_api.sell("credits_100")
    r = api.post(PLAY, json=play_body(who, token), headers=key)
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("success", "credits_added", "new_balance", "already_processed")} == \
        {"success": True, "credits_added": 999, "new_balance": 1014, "already_processed": False}
    assert play_api.purchases[("ai.ciris.mobile", "credits_100", token)]["consumptionState"] == 1  # so acknowledged
    assert token not in billing.log.read_text()
    again = api.post(PLAY, json=play_body(who, token), headers=key).json()
    assert (again["already_processed"], again["credits_added"], again["new_balance"]) == (True, 999, 1014)
    # The same token from another account: refused, nothing granted.
    other = account()
    r = api.post(PLAY, json=play_body(other, token), headers=key)
    assert r.status_code == 409 and r.json()["error"]["message"].startswith("purchase_token"), r.text
    assert remaining(api, key, other) == 15 and remaining(api, key, who) == 1014


def test_concurrent_verifies_of_one_play_token_grant_once(api, key, play_api, billing):
    import asyncio

    who = account()
    token = play_api.sell("credits_250")

    async def burst():
        async with httpx.AsyncClient(base_url=billing.url, timeout=60) as client:
            return await asyncio.gather(*[client.post(PLAY, json=play_body(who, token, "credits_250"), headers=key) for _ in range(8)])

    answers = run(burst())
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert sorted(r.json()["already_processed"] for r in answers) == [False] + [True] * 7
    assert remaining(api, key, who) == 15 + 2499


@pytest.mark.parametrize("case", ["other_package", "other_product", "unknown_product", "unknown_token", "pending", "cancelled",
                                  "consumed_elsewhere", "odd_token"])
def test_hostile_play_tokens_grant_nothing(api, key, play_api, case):
    who = account()
    if case == "other_package":  # a real purchase, but of another app
        body = play_body(who, play_api.sell("credits_100", package="com.evil.app"), package="com.evil.app")
    elif case == "other_product":  # bought credits_100, claimed as credits_600
        body = play_body(who, play_api.sell("credits_100"), product="credits_600")
    elif case == "unknown_product":
        body = play_body(who, play_api.sell("credits_9999"), product="credits_9999")
    elif case == "unknown_token":
        body = play_body(who, f"forged-{uuid.uuid4().hex}")
    elif case in ("pending", "cancelled"):
        body = play_body(who, play_api.sell("credits_100", state=2 if case == "pending" else 1))
    elif case == "consumed_elsewhere":
        token = play_api.sell("credits_100")
        next(p for k, p in play_api.purchases.items() if k[2] == token)["consumptionState"] = 1
        body = play_body(who, token)
    else:
        body = play_body(who, "short")
    r = api.post(PLAY, json=body, headers=key)
    assert r.status_code in (409, 422) and r.json()["error"]["code"] in ("invalid_request", "invalid_purchase", "conflict"), r.text
    field = r.json()["error"]["message"].split(":")[0]
    assert field in ("package_name", "product_id", "purchase_token"), r.text
    assert remaining(api, key, who) == 15
