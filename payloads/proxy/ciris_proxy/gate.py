"""The credit gate, as LiteLLM hooks: billing's tokens in (custom auth), a billing hold before every
paid upstream call, its capture after a response and its release on failure.

Money stays safe off the critical path: the hold is placed before the upstream call (fail closed:
no hold, no call); the capture runs after the response is sent, but is first written to a local
journal and retried until billing answers, so a crash or a billing outage delays it, never loses it.
A lost release only means the hold expires at its TTL and the user's credit comes back by itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import time
import uuid

import httpx
import jwt
from fastapi import Request
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth

from ciris_proxy import metrics
from ciris_proxy.journal import Journal
from ciris_proxy.litellm_config import BYOK_PROVIDERS
from ciris_proxy.settings import Settings

log = logging.getLogger("ciris_proxy")

ISSUER, AUDIENCE, LEEWAY_SECONDS = "ciris-billing", "ciris-bridge", 60  # billing's token contract
BYOK_HEADER = "x-provider-key"
# Set by the front door (server.py) from the request's X-Provider-Key header, which it removes
# before LiteLLM sees the request: the caller's key lives only in this context, never in a log.
byok_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("byok_key", default=None)
# What a user token may call; everything else (LiteLLM's admin API) needs the master key.
USER_ROUTES = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/models", "/models"})


class CreditGate(CustomLogger):
    def __init__(self) -> None:
        super().__init__()
        self.settings: Settings | None = None
        self.holds: dict[str, str] = {}  # LiteLLM call id -> billing hold id, until settled
        self.tasks: set[asyncio.Task] = set()
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (user id, exp)

    # --- lifecycle (server.py calls start() at startup, stop() at shutdown) ---

    def start(self, settings: Settings, journal: Journal) -> None:
        self.settings, self.journal = settings, journal
        self.billing = httpx.AsyncClient(
            base_url=self.settings.billing_url,
            headers={"Authorization": f"Bearer {self.settings.billing_service_token}"},
            timeout=httpx.Timeout(5.0),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=50),
        )
        for hold_id in list(self.journal.pending):  # owed from before a restart
            self._spawn(self._capture(hold_id))
        if self.journal.pending:
            log.info("replaying %d captures owed from the journal", len(self.journal.pending))

    async def stop(self, grace_seconds: float = 10.0) -> None:
        if self.tasks:  # whatever does not finish stays in the journal for the next start
            await asyncio.wait(self.tasks, timeout=grace_seconds)
        await self.billing.aclose()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- auth ---

    def verify_user(self, token: str) -> str:
        hit = self._verified.get(token)
        if hit and time.time() < hit[1] + LEEWAY_SECONDS:
            return hit[0]
        try:
            claims = jwt.decode(token, self.settings.billing_public_key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER,
                                leeway=LEEWAY_SECONDS, options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise _problem(401, "token expired: ask billing for a new one (POST /v1/auth/token)") from None
        except jwt.PyJWTError:
            raise _problem(401, "invalid token: send Authorization: Bearer <token issued by billing>") from None
        if claims.get("role") != "user":
            raise _problem(401, "only user tokens may call the proxy")
        try:
            user_id = str(uuid.UUID(str(claims.get("sub"))))
        except ValueError:
            raise _problem(401, "token subject is not a user id") from None
        if len(self._verified) >= 4096:
            self._verified.clear()
        self._verified[token] = (user_id, float(claims["exp"]))
        return user_id

    async def authenticate(self, request: Request, api_key: str) -> UserAPIKeyAuth:
        if api_key and hmac.compare_digest(api_key.encode(), self.settings.master_key.encode()):
            return UserAPIKeyAuth(api_key=api_key, user_id="operator", user_role=LitellmUserRoles.PROXY_ADMIN)
        if request.url.path not in USER_ROUTES:
            raise _problem(403, f"{request.url.path} is for operators only")
        if not api_key:
            raise _problem(401, "missing token: send Authorization: Bearer <token issued by billing>")
        user_id = self.verify_user(api_key)
        return UserAPIKeyAuth(api_key=f"user:{user_id}", user_id=user_id, user_role=LitellmUserRoles.INTERNAL_USER)

    # --- the credit gate ---

    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        provider = str(data.get("model", "")).split("/", 1)[0]
        key = byok_key.get()
        if provider in BYOK_PROVIDERS:
            if not key:
                raise _problem(400, f"model {data.get('model')!r} uses your own {provider} key: send it in X-Provider-Key")
            data["api_key"] = key  # straight to the provider, no credits
            metrics.REQUESTS.labels("byok").inc()
            return data
        if key:
            raise _problem(400, "X-Provider-Key is only for openai/<model> and anthropic/<model>")
        if user_api_key_dict.user_role == LitellmUserRoles.PROXY_ADMIN:
            return data  # operators' own checks cost nothing
        data.pop("api_key", None)  # never a caller's key on a paid path (LiteLLM would honour it)
        call_id = data["litellm_call_id"]
        self.holds[call_id] = await self.place_hold(user_api_key_dict.user_id, call_id)
        metrics.REQUESTS.labels("paid").inc()
        return data

    async def place_hold(self, user_id: str, call_id: str) -> str:
        s = self.settings
        try:
            r = await self.billing.post("/v1/credits/holds", json={
                "user_id": user_id, "amount": s.price_per_interaction_cents,
                "idempotency_key": f"proxy:{call_id}", "ttl_seconds": s.hold_ttl_seconds,
            })
        except httpx.HTTPError as e:
            metrics.HOLDS.labels("billing_unreachable").inc()
            log.error("billing unreachable placing a hold: %s", type(e).__name__)
            raise _problem(503, "billing is unreachable, so nothing was sent upstream and nothing charged; "
                                "retry shortly or use the other region") from None
        if r.status_code == 201:
            metrics.HOLDS.labels("placed").inc()
            return r.json()["hold_id"]
        if r.status_code == 402:
            metrics.HOLDS.labels("insufficient").inc()
            raise _problem(402, f"insufficient credits: a request costs {s.price_per_interaction_cents} cents "
                                f"and your balance is {_balance(r)} cents; buy credits at billing "
                                f"(POST /v1/credits/purchase)")
        if r.status_code == 404:
            metrics.HOLDS.labels("unknown_user").inc()
            raise _problem(401, "token names no billing user")
        metrics.HOLDS.labels("billing_error").inc()
        log.error("billing refused a hold: HTTP %d", r.status_code)
        raise _problem(503, f"billing refused the credit check (HTTP {r.status_code}); nothing was sent upstream")

    async def async_post_call_success_hook(self, data, user_api_key_dict, response):
        self.settle(data.get("litellm_call_id"), capture=True)
        return response

    async def async_post_call_failure_hook(self, request_data, original_exception, user_api_key_dict, traceback_str=None):
        self.settle(request_data.get("litellm_call_id"), capture=False)
        return None

    async def async_post_call_streaming_iterator_hook(self, user_api_key_dict, response, request_data):
        call_id, delivered = request_data.get("litellm_call_id"), False
        try:
            async for chunk in response:
                yield chunk
                delivered = True  # the consumer came back for more: this chunk went out
        except (GeneratorExit, asyncio.CancelledError):
            # The client left: charged if it had received part of the answer, not before the first token.
            self.settle(call_id, capture=delivered)
            raise
        except BaseException:
            self.settle(call_id, capture=False)
            raise
        self.settle(call_id, capture=True)

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self._upstream(kwargs, "ok", start_time, end_time)

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._upstream(kwargs, "error", start_time, end_time)

    @staticmethod
    def _upstream(kwargs, result: str, start_time, end_time) -> None:
        provider = str(kwargs.get("custom_llm_provider") or "unknown")
        metrics.UPSTREAM.labels(provider, result).inc()
        metrics.UPSTREAM_SECONDS.labels(provider).observe(max((end_time - start_time).total_seconds(), 0.0))

    def settle(self, call_id: str | None, capture: bool) -> None:
        """Exactly one outcome per hold: whichever hook comes first pops it."""
        hold_id = self.holds.pop(call_id, None) if call_id else None
        if hold_id is None:
            return
        if capture:
            self.journal.owe(hold_id)
            self._spawn(self._capture(hold_id))
        else:
            self._spawn(self._release(hold_id))

    async def _capture(self, hold_id: str) -> None:
        delay = 0.2
        while True:
            try:
                r = await self.billing.post(f"/v1/credits/holds/{hold_id}/capture")
                if r.status_code == 200:
                    metrics.SETTLED.labels("captured").inc()
                    break
                if r.status_code in (404, 409):  # expired before billing came back, or unknown: nothing to retry
                    metrics.SETTLED.labels("capture_refused").inc()
                    log.error("billing refused capture of hold %s: HTTP %d", hold_id, r.status_code)
                    break
                log.warning("capture of hold %s: HTTP %d, retrying", hold_id, r.status_code)
            except httpx.HTTPError as e:
                log.warning("capture of hold %s: billing unreachable (%s), retrying", hold_id, type(e).__name__)
            metrics.CAPTURE_RETRIES.inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        self.journal.settled(hold_id)

    async def _release(self, hold_id: str) -> None:
        try:
            r = await self.billing.post(f"/v1/credits/holds/{hold_id}/release")
            metrics.SETTLED.labels("released" if r.status_code == 200 else "release_refused").inc()
        except httpx.HTTPError:
            metrics.SETTLED.labels("release_failed").inc()  # the hold expires at its TTL instead
            log.warning("release of hold %s failed; it expires at its TTL", hold_id)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_credits",
               403: "permission_denied", 503: "billing_unavailable"}


def _problem(status: int, message: str) -> ProxyException:
    """OpenAI's error shape, as LiteLLM sends it: {"error": {"message", "type", "param", "code"}}."""
    return ProxyException(message=message, type=ERROR_TYPES[status], param=None, code=status)


def _balance(r: httpx.Response):
    try:
        return r.json()["error"]["balance"]
    except (ValueError, KeyError, TypeError):
        return "?"


credit_gate = CreditGate()


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """LiteLLM's custom_auth hook (general_settings.custom_auth)."""
    return await credit_gate.authenticate(request, api_key)
