"""The front door: a lean ASGI app, the proxy's whole public surface.

    GET  /health               liveness (FSD §9.1), no token
    GET  /ready                readiness (internal): 200 "ready"; 200 "degraded: stand-in" while billing
                               cannot write and the proxy stands in; 503 when it cannot serve paid calls
    GET  /serving              internal, the edge's health check: 503 while a deploy drains it (ADR 16)
    GET  /metrics              Prometheus (internal: the edge routes only /health and /v1/*)
    GET  /v1/models            the exposed models, the price and the caps
    POST /v1/chat/completions  the contract (contract.py), the credit gate (gate.py), the providers (upstream.py)

Everything else is 404. A chat request is checked in order — credential (401; auth.py), body size (413), contract
and caps (400), model (404), credit hold (402/503) — before anything is sent to a provider.

When is a request charged? Once a provider has taken on the work: a non-streamed answer that came
back, a stream the provider opened, or — should the client leave before either — a request whose
whole prompt was handed to a provider's connection (its prefill is paid for, whoever waits for the
answer); a stream that ends or breaks before any content was delivered to the client is released,
as is everything no provider accepted and a provider's failure. A client that leaves cancels the
upstream call at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import uuid

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ciris_proxy import metrics
from ciris_proxy.auth import Credentials, Tokens
from ciris_proxy.calls import CallLog
from ciris_proxy.contract import ChatRequest, ContractError, parse
from ciris_proxy.errors import ApiError
from ciris_proxy.gate import Authorisation, CreditGate
from ciris_proxy.journal import Journal
from ciris_proxy.settings import Settings
from ciris_proxy.upstream import Target, Upstreams, delivering

log = logging.getLogger("ciris_proxy")
JSON = (b"content-type", b"application/json")
SSE = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))
NOT_FOUND = ApiError(404, "no such route: the proxy serves GET /v1/models, POST /v1/chat/completions and GET /health",
                     code="not_found")


class ClientLeft(Exception):
    pass


async def send_json(send, status: int, body: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [JSON, (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive, headers: dict, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    length = headers.get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class App:
    def __init__(self, settings: Settings, journal: Journal, upstreams: Upstreams, calls: CallLog):
        self.settings, self.upstreams = settings, upstreams
        self.tokens = Tokens(settings.billing_keys)
        self.gate = CreditGate(settings, journal, calls)
        # Billing resolves ID tokens and API keys over the gate's session (it carries the service token).
        self.credentials = Credentials(self.tokens, lambda: self.gate.billing, settings.api_key_ttl_seconds)
        self.routes = {
            "/health": ("GET", self.health), "/ready": ("GET", self.ready),
            "/serving": ("GET", self.serving), "/metrics": ("GET", self.metrics),
            "/v1/models": ("GET", self.models), "/v1/chat/completions": ("POST", self.chat),
        }

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        method, handler = self.routes.get(scope["path"], (None, None))
        try:
            if handler is None:
                raise NOT_FOUND
            if scope["method"] != method and not (method == "GET" and scope["method"] == "HEAD"):
                raise ApiError(405, f"{scope['path']} takes {method} only", code="method_not_allowed")
            await handler(scope, receive, send)
        except ApiError as e:
            await send_json(send, e.status, json.dumps(e.body()).encode(), e.headers)
        except ClientLeft:
            pass
        except Exception as e:  # noqa: BLE001  (never uvicorn's traceback: an exception's text can quote a prompt)
            log.error("%s %s failed: %s", scope["method"], scope["path"], type(e).__name__)
            error = ApiError(500, "the proxy failed; nothing was charged", code="internal_error")
            try:
                await send_json(send, 500, json.dumps(error.body()).encode())
            except Exception:  # noqa: BLE001  (the response had started: the connection just ends)
                pass

    async def lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.gate.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gate.stop()
                return await send({"type": "lifespan.shutdown.complete"})

    # --- small routes ---

    async def health(self, scope, receive, send):
        await send_json(send, 200, b'{"status":"healthy"}')

    async def serving(self, scope, receive, send):
        """Internal (the edge's health check): does this container take new requests? (ADR 16)"""
        if os.path.exists(self.settings.drain_file):
            return await send_json(send, 503, b'{"status":"draining"}')
        await send_json(send, 200, b'{"status":"serving"}')

    async def ready(self, scope, receive, send):
        """Can a paid call be served? Stand-in still serves users billing recently vouched for."""
        if await self.gate.billing_ready():
            return await send_json(send, 200, b'{"status":"ready"}')
        if self.gate.stand_in_enabled:
            return await send_json(send, 200, b'{"status":"degraded: stand-in"}')
        await send_json(send, 503, b'{"status":"billing unreachable"}')

    async def metrics(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})
        await send({"type": "http.response.body", "body": generate_latest()})

    async def models(self, scope, receive, send):
        await self.credentials.user(dict(scope["headers"]))
        caps = dataclasses.asdict(self.settings.caps)
        vision = self.upstreams.vision

        def entry(name: str, t: Target) -> dict:
            return {"id": name, "object": "model", "created": 0, "owned_by": "ciris-bridge",
                    "providers": [p for _, p in t.groups], "price_cents": self.settings.price_per_interaction_cents,
                    "limits": {**caps, "max_output_tokens": self.output_cap(t)},
                    "vision": t.vision, **({"images_go_to": vision.name} if vision and not t.vision else {})}

        data = [entry(name, t) for name, t in self.upstreams.models.items()]
        data += [{**entry(alias, self.upstreams.models[model]), "alias_of": model}
                 for alias, model in self.upstreams.aliases.items()]
        data += [{"id": f"{p}/*", "object": "model", "created": 0, "owned_by": p, "providers": [p], "price_cents": 0,
                  "limits": caps, "requires": "X-Provider-Key"} for p in self.upstreams.byok_bases]
        await send_json(send, 200, json.dumps({"object": "list", "data": data}).encode())

    # --- chat completions ---

    async def chat(self, scope, receive, send):
        headers = dict(scope["headers"])
        user = await self.credentials.user(headers)
        body = await read_body(receive, headers, self.settings.caps.max_body_bytes)
        try:
            req = parse(body)
        except ContractError as e:
            raise ApiError(e.status, e.message, param=e.param, code=e.code) from None
        target = self.upstreams.target(req.model)
        if req.has_images() and not target.vision:
            target = self.vision_target(req.model)
        params = self.within_caps(req, target)
        key = headers.get(b"x-provider-key", b"").decode("latin-1").strip() or None
        auth = None
        if target.byok:
            if not key:
                raise ApiError(400, f"model {req.model!r} uses your own {target.byok} key: send it in X-Provider-Key",
                               param="model", code="provider_key_missing")
            metrics.REQUESTS.labels("byok").inc()
        else:
            if key:
                raise ApiError(400, "X-Provider-Key is only for openai/<model> and anthropic/<model>",
                               code="provider_key_not_allowed")
            interaction = req.metadata.interaction_id if req.metadata else None
            auth = await self.gate.authorise(user, str(uuid.uuid4()), interaction)
            metrics.REQUESTS.labels("paid").inc()
        serve = self.stream if req.stream else self.answer
        # Tokens a call used count toward its interaction window's budget: the provider's usage, or
        # (a stream without it, a client that left) ~4 bytes a token of the body and a token a chunk.
        used = Usage(auth, len(body) // 4)
        try:
            await self.until_client_leaves(serve(send, target, params, key, auth, used), receive)
        finally:
            used.count(self.gate)  # a call that failed or was left: counted as far as it got

    def vision_target(self, model: str) -> Target:
        """A text-only model was asked about images: the configured model that can see answers."""
        if self.upstreams.vision is None:
            raise ApiError(400, f"{model} takes text only and no model here takes images: send no image_url parts",
                           param="messages", code="images_not_supported")
        return self.upstreams.vision

    def output_cap(self, target: Target) -> int:
        return target.max_output_tokens or self.settings.caps.max_output_tokens

    def within_caps(self, req: ChatRequest, target: Target) -> dict:
        caps = self.settings.caps
        if len(req.messages) > caps.max_messages:
            raise ApiError(400, f"messages: at most {caps.max_messages} per request", param="messages",
                           code="too_many_messages")
        if req.n is not None and req.n > caps.max_n:
            raise ApiError(400, f"n: at most {caps.max_n}", param="n", code="above_limit")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "send max_tokens or max_completion_tokens, not both", param="max_completion_tokens",
                           code="invalid_value")
        params = req.upstream_params()
        # A flat price buys a bounded answer: more than the model's cap is lowered to it (an answer
        # that reaches it ends with finish_reason "length"), none asked means the cap (ADR 18).
        cap = self.output_cap(target)
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params[name] = min(params.get(name) or cap, cap)
        return params

    async def until_client_leaves(self, work, receive) -> None:
        """Run `work`; if the client hangs up first, cancel it (and with it the upstream call)."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(until_disconnect(receive))
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watch):
                if not t.done():
                    t.cancel()
        if not task.done() or task.cancelled():
            try:
                await task  # let it settle the hold
            except asyncio.CancelledError:
                pass
            return
        task.result()  # an ApiError raised before the response started becomes the error response

    def settle(self, auth: Authorisation | None, capture: bool) -> None:
        if auth is not None:
            self.gate.settle(auth, capture)

    async def call_upstream(self, target: Target, params: dict, stream: bool, key: str | None,
                            auth: Authorisation | None):
        """The provider's answer (or opened stream). Should the client leave first (this task is
        cancelled), the call is charged if a provider already had the whole prompt — its prefill is
        done, whoever waits for the answer — and released otherwise; a provider's failure is released."""
        delivery = delivering()
        try:
            return await self.upstreams.complete(target, params, stream=stream, key=key)
        except asyncio.CancelledError:
            self.settle(auth, capture=delivery.sent)
            raise
        except BaseException:  # no provider did the work
            self.settle(auth, capture=False)
            raise

    async def answer(self, send, target: Target, params: dict, key: str | None, auth: Authorisation | None, used: "Usage"):
        response = await self.call_upstream(target, params, False, key, auth)
        self.settle(auth, capture=True)  # the answer exists: the provider's work is done
        used.reported(response)
        used.count(self.gate)  # before the client has the answer (and can send its next call)
        response.model = target.name  # the exposed name, whichever provider answered
        await send_json(send, 200, response.model_dump_json().encode())

    async def stream(self, send, target: Target, params: dict, key: str | None, auth: Authorisation | None, used: "Usage"):
        chunks = await self.call_upstream(target, params, True, key, auth)
        delivered = False  # any content (text or a tool call) went out to the client: charged from then on
        try:
            await send({"type": "http.response.start", "status": 200, "headers": list(SSE)})
            async for chunk in chunks:
                chunk.model = target.name
                used.chunk(chunk)
                if not delivered and _has_content(chunk):
                    # Charged as the first content goes out, not at the end: a proxy that dies
                    # mid-stream has still answered (and a client that leaves now still pays).
                    delivered = True
                    self.settle(auth, capture=True)
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"})
        except asyncio.CancelledError:
            if not delivered:
                self.settle(auth, capture=True)  # the client left after the provider took the work on
            raise
        except Exception as e:  # noqa: BLE001  (the provider broke the stream: say so in the stream)
            log.warning("stream from %s broke: %s", target.name, type(e).__name__)
            if not delivered:
                self.settle(auth, capture=False)
            error = ApiError(502, "the provider's stream broke off" + ("" if delivered else "; nothing was charged"),
                             code="upstream_error")
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + json.dumps(error.body()).encode() + b"\n\n"})
        else:
            if not delivered:
                self.settle(auth, capture=False)  # the stream ended with nothing for the client
        finally:
            await _close(chunks)
        used.count(self.gate)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


class Usage:
    """The tokens one call used, for its interaction window's budget (gate.spent)."""

    def __init__(self, auth: Authorisation | None, estimate: int):
        self.auth, self.tokens, self.exact = auth, estimate, False

    def count(self, gate: CreditGate) -> None:
        """Once: the tokens go to the window's budget."""
        if self.auth is not None:
            gate.spent(self.auth, self.tokens)
            self.auth = None

    def reported(self, response) -> None:
        total = getattr(getattr(response, "usage", None), "total_tokens", None)
        if isinstance(total, int) and total >= 0:
            self.tokens, self.exact = total, True

    def chunk(self, chunk) -> None:
        self.reported(chunk)  # the last chunk carries usage when the client asked for it
        if not self.exact and _has_content(chunk):
            self.tokens += 1


def _has_content(chunk) -> bool:
    return any(c.delta is not None and (c.delta.content or c.delta.tool_calls) for c in chunk.choices or ())


async def _close(chunks) -> None:
    try:
        await chunks.aclose()
    except Exception:  # noqa: BLE001  (the connection is gone either way)
        pass
