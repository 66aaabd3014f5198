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
HANDLED = (*PAID, "charge.refunded")


def client(settings: Settings) -> stripe.StripeClient | None:
    """Stripe's client, or None without STRIPE_SECRET_KEY (billing runs; purchases answer 503)."""
    if not settings.stripe_secret_key:
        return None
    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(settings.stripe_secret_key, base_addresses=base, http_client=stripe.HTTPXClient(), max_network_retries=2)


def unavailable(var: str) -> Problem:
    return Problem(503, "payments_unavailable", f"payments are not configured on this server ({var} is not set)")


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
