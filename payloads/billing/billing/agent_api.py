"""CIRISBilling's API, as the released CIRIS agent calls it (ADR 17), on the same ledger as the
FSD's /v1/credits routes: a charge is a consume (ledger.consume_many, through the same batches),
so the hash chain, exactly-once and the non-negative balance hold here exactly as there.

Accounts are named by (oauth_provider, external_id), e.g. ("oauth:google", <Google subject>): the
same identity as a sign-in with that provider's ID token. Every amount is integer US cents.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Annotated, Awaitable, Callable

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, Field, StrictBool, StrictInt

import stripe

from billing import batches, db, google_play, ledger, metrics, payments
from billing.bodies import MAX_AMOUNT, Body, Description, Key, storable
from billing.errors import Problem
from billing.settings import Settings

# The agent names users without a sign-in "oauth:api:internal".
Provider = Annotated[str, Field(max_length=38, pattern=r"^oauth:[a-z][a-z0-9_:.-]{0,31}$")]
ExternalId = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[\x20-\x7e]+$")]
Text = Annotated[str, Field(max_length=255), AfterValidator(storable)]
# A charge's key is kept under "charge:" (apart from the proxy's consume keys), within 255 characters.
ChargeKey = Annotated[Key, Field(max_length=248)]
Currency = Annotated[str, Field(pattern=r"^(USD|usd)$")]  # the ledger is in US cents only
Account = Callable[[Request, str, str], Awaitable[uuid.UUID]]


class Named(Body):
    """Who a request is for, and what the agent sends along about them (accepted, not stored)."""
    oauth_provider: Provider
    external_id: ExternalId
    wa_id: Text | None = None
    tenant_id: Text | None = None
    customer_email: Text | None = None
    display_name: Text | None = None
    user_role: Annotated[str, Field(max_length=50), AfterValidator(storable)] | None = None
    agent_id: Text | None = None
    marketing_opt_in: StrictBool = False
    marketing_opt_in_source: Annotated[str, Field(max_length=50), AfterValidator(storable)] | None = None

    @property
    def provider(self) -> str:
        return self.oauth_provider.removeprefix("oauth:")


class CheckContext(Body):
    source: Text | None = None  # "purchase_status_check", from the agent's purchase status route
    agent_id: Text | None = None
    channel_id: Text | None = None
    request_id: Text | None = None


class CreditCheck(Named):
    context: CheckContext | None = None


class ChargeMetadata(Body):
    message_id: Text | None = None
    agent_id: Text | None = None
    channel_id: Text | None = None
    request_id: Text | None = None


class Charge(Named):
    amount_minor: Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT)]
    currency: Currency
    description: Description | None = None
    idempotency_key: ChargeKey | None = None
    metadata: ChargeMetadata | None = None


class PurchaseRequest(Named):
    return_url: Annotated[str, Field(max_length=2048), AfterValidator(storable)] | None = None


class PlayVerify(Named):
    purchase_token: Annotated[str, Field(min_length=10, max_length=4096, pattern=r"^[\x21-\x7e]+$")]
    product_id: Annotated[str, Field(min_length=1, max_length=150, pattern=r"^[a-z0-9][a-z0-9_.]*$")]
    package_name: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.]+$")]
    email: Text | None = None


# Our ledger's transaction types as CIRISBilling names credits (signup credits are a grant).
CREDIT_TYPES = {"signup": "grant", "grant": "grant", "purchase": "purchase", "refund": "refund"}


def add_routes(app: FastAPI, settings: Settings, database: db.Database, consumes: batches.Batches, account: Account,
               stripe_client: stripe.StripeClient | None, play: google_play.PlayApi | None) -> None:
    # CIRISBilling sells one product; here it is the smallest of the credit packs (ADR 17).
    smallest_pack = min(settings.credit_packs.items(), default=(0, 0))

    def purchase(pi, credits_added: int | None = None) -> dict:
        credits = int((pi.get("metadata") or {}).get("credits") or 0)
        answer = {"payment_id": pi["id"], "amount_minor": pi["amount"], "currency": "USD", "uses_purchased": credits,
                  "status": pi["status"], "publishable_key": settings.stripe_publishable_key}
        if credits_added is None:  # a new payment: the app needs its client secret
            return {**answer, "client_secret": pi["client_secret"]}
        return {**answer, "credits_added": credits_added}

    @app.post("/v1/billing/credits/check")
    async def check(body: CreditCheck, request: Request):
        """Whether the account can pay for a call: 200 while it has a balance, 402 once it has none.
        The signup credits stand in for CIRISBilling's free uses (ADR 17)."""
        user_id = await account(request, body.provider, body.external_id)
        balance = (await database.read(ledger.balance, user_id))["balance"]
        answer = {"has_credit": balance > 0, "credits_remaining": balance, "plan_name": None,
                  "reason": None if balance > 0 else "no credits left", "free_uses_remaining": 0, "total_uses": 0,
                  "purchase_required": balance <= 0, "purchase_price_minor": smallest_pack[1],
                  "purchase_uses": smallest_pack[0], "daily_free_uses_remaining": 0, "daily_free_uses_limit": 0}
        if balance <= 0:
            raise Problem(402, "insufficient_credits", "no credits left", **{k: v for k, v in answer.items() if k != "reason"})
        return answer

    @app.post("/v1/billing/charges", status_code=201)
    async def charge(body: Charge, request: Request):
        """A charge under its idempotency key (one is made when the agent sends none). Repeated, it
        is answered 409 with X-Existing-Charge-ID, which the agent takes as already charged."""
        user_id = await account(request, body.provider, body.external_id)
        key = f"charge:{body.idempotency_key or uuid.uuid4()}"
        description = body.description or "charge"
        try:
            outcome, tx, balance = await consumes.submit((user_id, body.amount_minor, key, description))
            result = ledger.consumed(outcome, tx, balance, body.amount_minor)
        except Problem as e:
            metrics.consumed(e.code)
            raise
        metrics.consumed("replayed" if result["replayed"] else "debited")
        if result["replayed"]:
            return JSONResponse(Problem(409, "already_charged", "a charge under this idempotency_key was already made",
                                        charge_id=str(tx), balance_after=balance).body(),
                                status_code=409, headers={"X-Existing-Charge-ID": str(tx)})
        return {"charge_id": str(tx), "account_id": str(user_id), "amount_minor": body.amount_minor, "currency": "USD",
                "balance_after": balance, "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "description": description, "metadata": (body.metadata or ChargeMetadata()).model_dump()}

    @app.get("/v1/billing/transactions")
    async def transactions(request: Request, oauth_provider: Annotated[Provider, Query()],
                           external_id: Annotated[ExternalId, Query()], wa_id: Annotated[Text | None, Query()] = None,
                           tenant_id: Annotated[Text | None, Query()] = None,
                           limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0):
        """The account's movements, newest first, by offset (CIRISBilling's paging)."""
        user_id = await account(request, oauth_provider.removeprefix("oauth:"), external_id)
        rows, total = await database.read(ledger.transactions_page, user_id, limit, offset)
        items = [{"transaction_id": str(r["id"]), "type": "charge" if r["amount"] < 0 else "credit",
                  "amount_minor": r["amount"], "currency": "USD", "description": r["description"] or r["type"],
                  "created_at": r["created_at"], "balance_after": r["balance_after"],
                  "transaction_type": CREDIT_TYPES.get(r["type"]), "external_transaction_id": r["ref"]} for r in rows]
        return {"transactions": items, "total_count": total, "has_more": offset + len(items) < total}

    @app.post("/v1/billing/purchases", status_code=201)
    async def create_purchase(body: PurchaseRequest, request: Request):
        """A Stripe PaymentIntent for the app's payment sheet; its credits come when it succeeds
        (the payment_intent.succeeded webhook, or the status route, whichever is first)."""
        if stripe_client is None:
            raise payments.unavailable("STRIPE_SECRET_KEY")
        user_id = await account(request, body.provider, body.external_id)
        credits, price = smallest_pack
        pi = await payments.create_intent(stripe_client, str(user_id), credits, price, body.customer_email)
        return purchase(pi)

    @app.get("/v1/billing/purchases/{payment_id}/status")
    async def purchase_status(request: Request, payment_id: Annotated[str, Path(max_length=255, pattern=r"^pi_[A-Za-z0-9_]+$")],
                              oauth_provider: Annotated[Provider, Query()], external_id: Annotated[ExternalId, Query()]):
        """The payment's status; a succeeded one's credits are granted here if the webhook has not
        yet (once: both go through ledger.credit_purchase under the PaymentIntent's id)."""
        if stripe_client is None:
            raise payments.unavailable("STRIPE_SECRET_KEY")
        user_id = await account(request, oauth_provider.removeprefix("oauth:"), external_id)
        pi = await payments.intent(stripe_client, payment_id)
        found = payments.intent_credits(pi) if pi is not None else None
        if found is None or found[0] != user_id:  # someone else's payment is as unknown as none
            raise Problem(404, "not_found", "payment not found")
        credited = pi["status"] == "succeeded" and await database.write(payments.credit_intent, pi, transaction=True) != "not_paid"
        return purchase(pi, found[1] if credited else 0)

    @app.post("/v1/billing/google-play/verify")
    async def verify_play_purchase(body: PlayVerify, request: Request):
        """Grant a Google Play purchase's credits: once ever per purchase token. The same account
        sending the token again is answered already_processed; another account, 409."""
        if play is None:
            raise google_play.unavailable()
        if body.package_name != settings.google_play_package:
            raise Problem(422, "invalid_request", "package_name: not this app's package")
        credits = settings.google_play_products.get(body.product_id)
        if credits is None:
            raise Problem(422, "invalid_request", "product_id: not a product of this app")
        user_id = await account(request, body.provider, body.external_id)
        purchase_id = google_play.token_id(body.purchase_token)
        earlier = await database.read(ledger.purchase_owner, purchase_id) or await redeem(body, user_id, purchase_id, credits)
        if earlier is not None and earlier[0] != user_id:
            raise Problem(409, "conflict", "purchase_token: already redeemed by another account")
        balance = (await database.read(ledger.balance, user_id))["balance"]
        return {"success": True, "credits_added": earlier[1] if earlier else credits, "new_balance": balance,
                "already_processed": earlier is not None}

    async def redeem(body: PlayVerify, user_id: uuid.UUID, purchase_id: str, credits: int) -> tuple[uuid.UUID, int] | None:
        """Verify with Google, grant, consume: None when this request granted it; else who was
        granted it by a concurrent twin of this request, and how much."""
        try:
            await play.verify(body.package_name, body.product_id, body.purchase_token)
        except Problem as e:  # consumed: by a concurrent twin that granted it meanwhile, or never here
            earlier = e.status == 409 and await database.read(ledger.purchase_owner, purchase_id)
            if earlier:
                return earlier
            raise
        if not await database.write(ledger.credit_purchase, user_id, purchase_id, credits, 0, None, "play", transaction=True):
            return await database.read(ledger.purchase_owner, purchase_id)
        await play.consume(body.package_name, body.product_id, body.purchase_token)
        return None
