"""The HTTP API (FastAPI). Contract: README "Billing API"; the OpenAPI document is /openapi.json.

Nothing a client sends is logged or echoed back: validation errors name the field, not its value.
"""


import asyncio
import contextlib
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated

import stripe
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from billing import agent_api, api_keys, auth, batches, db, google_play, hotpath, identity, jwks, ledger, ledger_check, metrics, payments
from billing.bodies import MAX_AMOUNT, Amount, Body, Description, Key, Ttl, storable
from billing.errors import Problem, invalid, not_found
from billing.settings import STATE_DIR_VAR, Settings

log = logging.getLogger("billing")

MAX_BODY_BYTES = 16 * 1024
class NewUser(Body):
    email: Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"), AfterValidator(storable)]


IdToken = Annotated[str, Field(min_length=1, max_length=identity.MAX_TOKEN_CHARS, pattern=r"^[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*$")]


class TokenRequest(Body):
    """Either an admin or service names a user, or anyone brings a Google or Apple ID token."""
    user_id: uuid.UUID | None = None
    id_token: IdToken | None = None
    ttl_seconds: Annotated[StrictInt, Field(ge=60, le=30 * 86_400)] = 3600


class Resolve(Body):
    """A credential a client sent the proxy, for billing to say whose it is: exactly one."""
    id_token: IdToken | None = None
    api_key: Annotated[str, Field(min_length=1, max_length=api_keys.MAX_KEY_CHARS)] | None = None


class Consume(Body):
    user_id: uuid.UUID
    amount: Amount | None = None  # default: the price of one interaction
    idempotency_key: Key
    description: Description | None = None


class HoldRequest(Body):
    user_id: uuid.UUID
    amount: Amount
    idempotency_key: Key
    ttl_seconds: Ttl = 300


class Capture(Body):
    amount: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)] | None = None
    # The call was answered: should the hold have expired meanwhile, charge it as a forced debit.
    force: bool = False


class Void(Body):
    user_id: uuid.UUID
    idempotency_key: Key  # the key the hold was (or would have been) placed under
    amount: Amount  # the amount that placement asked for (kept on the void's row)


class ForcedDebit(Body):
    user_id: uuid.UUID
    amount: Amount
    idempotency_key: Key
    description: Description | None = None


class KeyRef(Body):
    user_id: uuid.UUID
    idempotency_key: Key


class Lookup(Body):
    keys: Annotated[list[KeyRef], Field(min_length=1, max_length=500)]


class Grant(Body):
    user_id: uuid.UUID
    amount: Amount
    idempotency_key: Key
    reason: Annotated[str, Field(min_length=1, max_length=200), AfterValidator(storable)]


class Purchase(Body):
    credits: StrictInt


class NewApiKey(Body):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[\x20-\x7e]+$")]


def create_app(settings: Settings) -> FastAPI:
    database = db.Database(settings.database_url, settings.db_pool_size, settings.db_write_timeout)
    stripe_client = payments.client(settings)
    play = (google_play.PlayApi(settings.google_play_service_account_file, settings.google_play_api_base)
            if settings.google_play_service_account_file else None)
    # python -m billing makes this directory fresh for each start, shared by its workers.
    state_dir = Path(os.environ.get(STATE_DIR_VAR) or tempfile.mkdtemp(prefix="ciris-billing-"))
    consumes = batches.Batches(lambda items, seconds: database.write(ledger.consume_many, items, within=seconds),
                               settings.db_write_timeout, settings.consume_batches)
    checker = ledger_check.Checker(state_dir, settings.ledger_verify_interval)
    metrics.LEDGER.state_dir = state_dir

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await database.open()
        background = [asyncio.create_task(sweep_holds()), asyncio.create_task(checker.loop())]
        yield
        for task in background:
            task.cancel()
        await identities.close()
        if play:
            await play.close()
        await database.close()

    async def sweep_holds():
        while True:
            await asyncio.sleep(2)
            try:
                await database.write(ledger.expire_holds)
            except Exception as e:  # the database may be away; the next round retries
                log.warning("hold sweeper: %s", getattr(e, "code", type(e).__name__))

    app = FastAPI(title="CIRIS billing", version="1.0", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def in_tx(fn, *args):
        return await database.write(fn, *args, transaction=True)

    async def once(fn, *args):  # a one-call movement (ledger.call): no transaction block around it
        return await database.write(fn, *args)

    bearer = HTTPBearer(auto_error=False)
    verified = auth.TokenCache(settings.jwt_keys, proxy_generations=settings.proxy_token_generations)
    published = jwks.render(settings.jwt_keys.values())
    identities = identity.Verifier(settings.oidc_issuers, settings.oidc_ca_file)

    async def verify_id_token(id_token: str) -> identity.Identity:
        try:
            return await identities.verify(id_token)
        except identity.IdentityError as e:
            log.info("ID token refused: %s", e.reason)
            raise Problem(401, "unauthorized", f"id_token: {ID_TOKEN_REFUSED.get(e.reason, 'invalid')}") from None

    users_of: dict[tuple[str, str], uuid.UUID] = {}  # an identity's user never changes: no lookup per call

    async def user_of(provider: str, subject: str) -> uuid.UUID:
        """The identity's user, made with the signup credits on first sight."""
        user_id = users_of.get((provider, subject))
        if user_id is None:
            user_id = (await database.read(ledger.identity_user, provider, subject)
                       or await in_tx(ledger.user_for_identity, provider, subject, settings.signup_credits))
            if len(users_of) >= 10_000:
                users_of.clear()
            users_of[(provider, subject)] = user_id
        return user_id

    async def sign_in(id_token: str) -> tuple[uuid.UUID, int]:
        """The user of a verified ID token and the token's expiry."""
        who = await verify_id_token(id_token)
        return await user_of(who.provider, who.subject), who.exp

    def check_token(token: str | None, route: tuple[str, str]) -> auth.Principal:
        """The token's principal on `route` (method, route template): the proxy's role only on its own."""
        if not token:
            raise Problem(401, "unauthorized", "missing bearer token")
        try:
            p = verified.verify(token)
        except auth.AuthError:
            raise Problem(401, "unauthorized", "invalid or expired token") from None
        if p.role == "proxy" and route not in auth.PROXY_ROUTES:
            raise Problem(403, "forbidden", f"role proxy may not call {route[0]} {route[1]}: only the proxy's routes ({PROXY_ROUTE_LIST})")
        return p

    def route_of(request: Request) -> tuple[str, str]:
        return request.method, request.scope["route"].path  # the template: /v1/credits/holds/{hold_id}/capture

    async def principal(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> auth.Principal:
        if creds and identity.is_id_token(creds.credentials):  # a Google or Apple ID token, sent as it is
            user_id, exp = await sign_in(creds.credentials)
            return auth.Principal(sub=str(user_id), role="user", exp=exp)
        return check_token(creds.credentials if creds else None, route_of(request))

    def authenticate(header: str | None, route: tuple[str, str]) -> auth.Principal:  # HTTPBearer's parsing, for the lean path
        scheme, credentials = get_authorization_scheme_param(header)
        return check_token(credentials if scheme.lower() == "bearer" else None, route)

    Caller = Annotated[auth.Principal, Depends(principal)]

    async def account(request: Request, provider: str, external_id: str) -> uuid.UUID:
        """The user a CIRISBilling-shaped request acts for (agent_api.py), named by (provider,
        external id): an API key or a service acts for whom it names (made on first sight, with
        the signup credits); a user, by ID token or our token, only for themself."""
        key = request.headers.get("x-api-key")
        if key is not None:
            if len(key) > api_keys.MAX_KEY_CHARS or await database.write(api_keys.check, key) is None:
                raise Problem(401, "unauthorized", "X-API-Key: unknown or revoked key")
        else:
            scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
            token = credentials if scheme.lower() == "bearer" else None
            if token and identity.is_id_token(token):
                who = await verify_id_token(token)
                if (who.provider, who.subject) != (provider, external_id):
                    raise Problem(403, "forbidden", "a user may act only on their own account")
            elif (p := check_token(token, route_of(request))).role == "user":
                user_id = users_of.get((provider, external_id)) or await database.read(ledger.identity_user, provider, external_id)
                if user_id is None or str(user_id) != p.sub:
                    raise Problem(403, "forbidden", "a user may act only on their own account")
                return user_id
        return await user_of(provider, external_id)

    def require(p: auth.Principal, *roles: str) -> None:
        if p.role not in roles:
            raise Problem(403, "forbidden", f"requires role {' or '.join(roles)}")

    def require_self(p: auth.Principal, user_id: str) -> uuid.UUID:
        if not p.may_act_for(user_id):
            raise Problem(403, "forbidden", "a user may act only on their own account")
        try:
            return uuid.UUID(user_id)
        except ValueError:
            raise not_found("user") from None

    # --- errors: one shape, no echo of input ---------------------------------------------------

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(invalid(exc.errors()).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return JSONResponse(Problem(exc.status_code, code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
        return JSONResponse(Problem(500, "internal", "internal error").body(), status_code=500)

    # --- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health():  # healthy only while a write commits: reads alone would serve stale balances
        problem = await database.writable()
        if problem:
            return JSONResponse({"status": "unhealthy", "database": problem}, status_code=503)
        return {"status": "healthy"}

    @app.get("/serving", include_in_schema=False)
    async def serving():  # internal (the edge's health check): does this container take new requests?
        if os.path.exists(settings.drain_file):
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "serving"}

    @app.get("/.well-known/jwks.json")
    async def keys():  # public: whoever verifies billing's tokens (each names its key: kid)
        return PlainTextResponse(published, media_type="application/json", headers={"Cache-Control": "public, max-age=300"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/users", status_code=201)
    async def create_user(body: NewUser, p: Caller):
        require(p, "admin")
        return await in_tx(ledger.create_user, body.email, settings.signup_credits)

    @app.post("/v1/auth/token")
    async def token(request: Request, body: TokenRequest, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]):
        """Our user token for a user an admin or service names, or for a verified ID token (sign-in)."""
        if (body.user_id is None) == (body.id_token is None):
            raise Problem(422, "invalid_request", "body: give exactly one of user_id and id_token")
        if body.id_token is not None:
            user_id, _ = await sign_in(body.id_token)
        else:
            require(await principal(request, creds), "admin", "service")
            user_id = body.user_id
            if not await database.read(ledger.user_exists, user_id):
                raise not_found("user")
        access, exp = auth.mint(settings.jwt_private_key, str(user_id), "user", body.ttl_seconds)
        return {"access_token": access, "token_type": "bearer", "expires_at": exp, "user_id": str(user_id)}

    @app.post("/v1/auth/resolve")
    async def resolve(body: Resolve, p: Caller):
        """Whose credential the proxy was sent (the proxy or a service, ADR 8): an ID token's user (made
        on first sight) until the token's expiry, or an API key's own account. A refused credential
        is a 401 `credential_refused`, apart from the 401 a bad service token gets."""
        require(p, "proxy", "service")
        if (body.id_token is None) == (body.api_key is None):
            raise Problem(422, "invalid_request", "body: give exactly one of id_token and api_key")
        try:
            if body.id_token is not None:
                user_id, exp = await sign_in(body.id_token)
            elif (key_id := await database.write(api_keys.check, body.api_key)) is not None:
                user_id, exp = await user_of(api_keys.ACCOUNT_PROVIDER, str(key_id)), None
            else:
                raise Problem(401, "unauthorized", "api_key: unknown or revoked key")
        except Problem as e:
            if e.status != 401:
                raise
            raise Problem(401, "credential_refused", e.message) from None
        return {"user_id": str(user_id), "expires_at": exp}

    @app.get("/v1/credits/{user_id}")
    async def credits(user_id: str, p: Caller):
        uid = require_self(p, user_id)
        return await database.read(ledger.balance, uid)

    @app.post("/v1/credits/consume")
    async def consume(body: Consume, p: Caller):
        require_self(p, str(body.user_id))
        amount = body.amount or settings.price_per_interaction_cents
        try:
            outcome, tx, balance = await consumes.submit((body.user_id, amount, body.idempotency_key, body.description))
            result = ledger.consumed(outcome, tx, balance, amount)
        except Problem as e:
            metrics.consumed(e.code)
            raise
        metrics.consumed("replayed" if result["replayed"] else "debited")
        return result

    @app.post("/v1/credits/holds", status_code=201)
    async def hold(body: HoldRequest, p: Caller):
        require(p, "proxy", "service", "admin")
        return await once(ledger.place_hold, body.user_id, body.amount, body.idempotency_key, body.ttl_seconds)

    @app.post("/v1/credits/holds/{hold_id}/capture")
    async def capture(hold_id: uuid.UUID, p: Caller, body: Capture | None = None):
        require(p, "proxy", "service", "admin")
        result = await once(ledger.capture, hold_id, body.amount if body else None, bool(body and body.force))
        if result.pop("forced", False):  # the answer says what was taken and what was short
            metrics.forced("expired_hold", result["shortfall"], result["replayed"])
        return result

    @app.post("/v1/credits/holds/{hold_id}/release")
    async def release(hold_id: uuid.UUID, p: Caller):
        require(p, "proxy", "service", "admin")
        return await once(ledger.release, hold_id)

    @app.post("/v1/credits/holds/void")
    async def void(body: Void, p: Caller):
        require(p, "proxy", "service", "admin")
        return await once(ledger.void, body.user_id, body.idempotency_key, body.amount)

    @app.post("/v1/credits/forced-debits")
    async def forced_debit(body: ForcedDebit, p: Caller):
        """Charge a call that was already answered (the proxy's stand-in advices): down to a zero
        balance at most; the rest is the shortfall, recorded and counted, never dropped."""
        require(p, "proxy", "service", "admin")
        result = await once(ledger.forced_debit, body.user_id, body.amount, body.idempotency_key, body.description)
        metrics.forced("advice", result["shortfall"], result["replayed"])
        return result

    @app.post("/v1/credits/lookup")
    async def lookup(body: Lookup, p: Caller):
        """What the ledger holds under each (user, idempotency key): the hold, the transaction, the
        forced debit. For reconciliation (python -m ciris_proxy reconcile)."""
        require(p, "proxy", "service", "admin")
        return {"items": await database.read(ledger.lookup, [(k.user_id, k.idempotency_key) for k in body.keys])}

    @app.post("/v1/credits/grant")
    async def grant(body: Grant, p: Caller):
        require(p, "admin")
        return await once(ledger.grant, body.user_id, body.amount, body.idempotency_key, body.reason)

    @app.post("/v1/credits/purchase")
    async def purchase(body: Purchase, p: Caller):
        require(p, "user")
        if stripe_client is None:
            raise payments.unavailable("STRIPE_SECRET_KEY")
        if body.credits not in settings.credit_packs:
            packs = ", ".join(str(c) for c in sorted(settings.credit_packs))
            raise Problem(422, "invalid_request", f"credits must be one of the packs: {packs}")
        uid = require_self(p, p.sub)
        if not await database.read(ledger.user_exists, uid):
            raise not_found("user")
        return await payments.checkout(stripe_client, settings, p.sub, body.credits)

    @app.post("/v1/webhooks/stripe")
    async def stripe_webhook(request: Request):
        if not settings.stripe_webhook_secrets:
            raise payments.unavailable("STRIPE_WEBHOOK_SECRET")
        payload = await request.body()
        event = payments.verified_event(payload, request.headers.get("stripe-signature"), settings.stripe_webhook_secrets)
        if event is None:
            metrics.WEBHOOKS.labels("unknown", "bad_signature").inc()
            raise Problem(400, "bad_signature", "webhook signature missing, invalid or stale") from None
        outcome = await in_tx(payments.handle_event, payload)
        metrics.WEBHOOKS.labels(event["type"] if event["type"] in payments.HANDLED else "other", outcome).inc()
        return {"received": True, "outcome": outcome}

    @app.get("/v1/usage/{user_id}")
    async def usage(user_id: str, p: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 50, cursor: str | None = None):
        uid = require_self(p, user_id)
        before = None
        if cursor is not None:
            if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:  # not '٣' or '²'
                raise Problem(422, "invalid_request", "cursor: not a cursor from this API")
            before = int(cursor)
        return await database.read(ledger.usage, uid, limit, before)

    @app.post("/v1/admin/api-keys", status_code=201)
    async def mint_api_key(body: NewApiKey, p: Caller):
        """A new key for a server agent: the answer is the only time the key is shown."""
        require(p, "admin")
        return await in_tx(api_keys.mint, body.name)

    @app.get("/v1/admin/api-keys")
    async def list_api_keys(p: Caller):
        require(p, "admin")
        return await database.read(api_keys.listing)

    @app.delete("/v1/admin/api-keys/{key_id}")
    async def revoke_api_key(key_id: uuid.UUID, p: Caller):
        require(p, "admin")
        revoked = await once(api_keys.revoke, key_id)
        if revoked is None:
            raise not_found("api key")
        return revoked

    agent_api.add_routes(app, settings, database, consumes, account, stripe_client, play)

    lean = hotpath.LeanRoutes(app, LEAN_PATHS, principal, authenticate, MAX_BODY_BYTES)
    return LimitsAndMetrics(app, lean)


# Why an ID token was refused, as the 401 says it (identity.IdentityError reasons).
ID_TOKEN_REFUSED = {"expired": "expired", "audience": "not issued for this app (aud)", "issuer": "unknown issuer (iss)",
                    "algorithm": "algorithm not accepted", "unknown_key": "signed with an unknown key (kid)",
                    "too_long": "too long", "malformed": "not a JWT"}

PROXY_ROUTE_LIST = ", ".join(f"{m} {path}" for m, path in sorted(auth.PROXY_ROUTES, key=lambda r: r[1]))

# The routes the proxy calls around every paid request: served without FastAPI's per-request work.
LEAN_PATHS = ("/v1/credits/consume", "/v1/credits/holds", "/v1/credits/holds/{hold_id}/capture",
              "/v1/credits/holds/{hold_id}/release")


class LimitsAndMetrics:
    """Refuses bodies over MAX_BODY_BYTES (413) and records each request's route template, status
    and latency; hands the money routes to the lean path, the rest to FastAPI. Plain ASGI:
    Starlette's BaseHTTPMiddleware costs a task per request."""

    def __init__(self, app: FastAPI, lean: hotpath.LeanRoutes):
        self.app, self.lean = app, lean

    def __getattr__(self, name):  # app.openapi(), app.state ... for callers and tests
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return await JSONResponse(Problem(413, "payload_too_large", f"body over {MAX_BODY_BYTES} bytes").body(), status_code=413)(scope, receive, send)
        started = time.perf_counter()
        found = self.lean.match(scope)
        if found is not None:  # no wrappers: the lean path limits its body and knows its status
            status = await self.lean.serve(found, scope, receive, send)
            metrics.observe(scope["route"].path, scope["method"], status, time.perf_counter() - started)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:  # chunked bodies carry no content-length
                raise Problem(413, "payload_too_large", f"body over {MAX_BODY_BYTES} bytes")
            return message

        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, recording_send)
        finally:
            route = scope.get("route")
            metrics.observe(getattr(route, "path", "unmatched"), scope["method"], status, time.perf_counter() - started)


def from_environment():
    """The uvicorn factory for worker processes (`WORKERS` > 1): settings from the environment."""
    from billing.settings import from_env

    return create_app(from_env())
