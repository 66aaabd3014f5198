"""Stripe: Checkout Sessions for credit packs, and the webhook events that move credits.

Only the official `stripe` library talks to Stripe; STRIPE_API_BASE points it elsewhere in tests.
Webhook signatures are verified by the caller (stripe.Webhook.construct_event) before this runs.
"""

from __future__ import annotations

import json
import logging
import uuid

import stripe

from billing import ledger, metrics
from billing.errors import Problem
from billing.settings import Settings

log = logging.getLogger("billing.payments")
PAID = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
INTENT_PAID = "payment_intent.succeeded"
HANDLED = (*PAID, INTENT_PAID, "charge.refunded")
# Marks the PaymentIntents made for CIRISBilling's purchases (agent_api.py): a Checkout Session's
# own PaymentIntent also succeeds, and its credits come with the session's event, not its intent's.
INTENT_FLOW = "in_app"


def client(settings: Settings) -> stripe.StripeClient | None:
    """Stripe's client, or None without STRIPE_SECRET_KEY (billing runs; purchases answer 503)."""
    if not settings.stripe_secret_key:
        return None
    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(settings.stripe_secret_key, base_addresses=base, http_client=stripe.HTTPXClient(), max_network_retries=2)


def unavailable(var: str) -> Problem:
    return Problem(503, "payments_unavailable", f"payments are not configured on this server ({var} is not set)")


def verified_event(payload: bytes, signature: str | None, secrets: tuple[str, ...]):
    """The event when one of the endpoint secrets verifies its signature (Stripe signs each endpoint
    with its own: every region's is in the list), else None."""
    for secret in secrets:
        try:
            return stripe.Webhook.construct_event(payload, signature, secret)
        except (stripe.SignatureVerificationError, ValueError):
            continue
    return None


async def checkout(sc: stripe.StripeClient, settings: Settings, user_id: str, credits: int) -> dict:
    metadata = {"user_id": user_id, "credits": str(credits)}
    try:
        session = await sc.v1.checkout.sessions.create_async(
            params={
                "mode": "payment",
                "client_reference_id": user_id,
                "metadata": metadata,
                "payment_intent_data": {"metadata": metadata},
                "line_items": [{
                    "quantity": 1,
                    "price_data": {"currency": "usd", "unit_amount": settings.credit_packs[credits],
                                   "product_data": {"name": f"{credits} CIRIS credits"}},
                }],
                "success_url": settings.checkout_success_url,
                "cancel_url": settings.checkout_cancel_url,
            }
        )
    except stripe.StripeError as e:
        log.warning("stripe checkout failed: %s", type(e).__name__)
        raise Problem(502, "payment_provider_error", "could not create a checkout session; try again") from None
    return {"checkout_url": session.url, "session_id": session.id}


async def create_intent(sc: stripe.StripeClient, user_id: str, credits: int, price: int, email: str | None) -> dict:
    """A PaymentIntent for `credits` at `price` cents, paid in the app (Stripe's payment sheet)."""
    params = {"amount": price, "currency": "usd", "automatic_payment_methods": {"enabled": True},
              "description": f"{credits} CIRIS credits",
              "metadata": {"user_id": user_id, "credits": str(credits), "flow": INTENT_FLOW}}
    if email:
        params["receipt_email"] = email
    try:
        return (await sc.v1.payment_intents.create_async(params=params)).to_dict()
    except stripe.StripeError as e:
        log.warning("stripe payment intent failed: %s", type(e).__name__)
        raise Problem(502, "payment_provider_error", "could not create a payment; try again") from None


async def intent(sc: stripe.StripeClient, payment_id: str) -> dict | None:
    """The PaymentIntent, or None when Stripe does not know it."""
    try:
        return (await sc.v1.payment_intents.retrieve_async(payment_id)).to_dict()
    except stripe.InvalidRequestError:
        return None
    except stripe.StripeError as e:
        log.warning("stripe payment intent lookup failed: %s", type(e).__name__)
        raise Problem(502, "payment_provider_error", "could not look the payment up; try again") from None


def intent_credits(pi: dict) -> tuple[uuid.UUID, int] | None:
    """The user and credits of one of our in-app PaymentIntents; None for any other."""
    metadata = pi.get("metadata") or {}
    if metadata.get("flow") != INTENT_FLOW:
        return None
    try:
        return uuid.UUID(metadata["user_id"]), int(metadata["credits"])
    except (KeyError, TypeError, ValueError):
        raise Problem(400, "bad_event", "payment intent without user or credits metadata") from None


async def credit_intent(conn, pi: dict) -> str:
    """Grant a succeeded in-app PaymentIntent's credits, once (by its id, as a purchase)."""
    found = intent_credits(pi)
    if found is None:
        return "ignored"
    if pi.get("status") != "succeeded":
        return "not_paid"
    user_id, credits = found
    granted = await ledger.credit_purchase(conn, user_id, pi["id"], credits, int(pi.get("amount_received") or 0), pi["id"])
    return "credited" if granted else "already_credited"


async def handle_event(conn, payload: bytes) -> str:
    """Apply one verified event inside the caller's transaction; each event id only once."""
    event = json.loads(payload)
    if not await ledger.record_event(conn, event["id"], event["type"]):
        return "duplicate"
    obj = event["data"]["object"]
    if event["type"] in PAID:
        if obj.get("payment_status") != "paid":
            return "not_paid"
        try:
            user_id = uuid.UUID(obj.get("client_reference_id") or obj["metadata"]["user_id"])
            credits = int(obj["metadata"]["credits"])
        except (KeyError, TypeError, ValueError):
            raise Problem(400, "bad_event", "checkout session without user or credits metadata") from None
        granted = await ledger.credit_purchase(conn, user_id, obj["id"], credits, int(obj.get("amount_total") or 0), obj.get("payment_intent"))
        return "credited" if granted else "already_credited"
    if event["type"] == INTENT_PAID:
        return await credit_intent(conn, obj)
    if event["type"] == "charge.refunded":
        result = await ledger.refund_purchase(conn, obj.get("payment_intent") or "", int(obj["amount_refunded"]), int(obj["amount"]), obj["id"])
        if result is None:
            log.warning("refund for an unknown purchase (event %s)", event["id"])
            return "unknown_purchase"
        taken, shortfall = result
        if shortfall:
            metrics.REFUND_SHORTFALL.inc(shortfall)
            log.warning("refund shortfall of %d credits (event %s): already spent", shortfall, event["id"])
        return "refunded" if not shortfall else "refunded_with_shortfall"
    return "ignored"
