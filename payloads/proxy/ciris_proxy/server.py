"""The front door: a plain ASGI layer in front of LiteLLM's proxy app.

It answers GET /health (FSD §9.1) and /metrics itself, removes the caller's X-Provider-Key header
(kept only in a context variable for the credit gate, so LiteLLM never logs or stores it) and every
x-litellm-* control header (the call id must be ours: it is the capture's idempotency key), and
starts and stops the credit gate with the server.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ciris_proxy.gate import BYOK_HEADER, byok_key, credit_gate

HEALTH = b'{"status":"healthy"}'
_BYOK = BYOK_HEADER.encode()


class Front:
    def __init__(self, app, gate=credit_gate, settings=None, journal=None):
        self.app, self.gate, self.settings, self.journal = app, gate, settings, journal

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, self._lifespan(receive), send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in ("/health", "/metrics") and scope["method"] in ("GET", "HEAD"):
            body, ctype = (HEALTH, b"application/json") if path == "/health" else (generate_latest(), CONTENT_TYPE_LATEST.encode())
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]})
            return await send({"type": "http.response.body", "body": body})
        headers, key = [], None
        for name, value in scope["headers"]:
            if name == _BYOK:
                key = value.decode("latin-1").strip()
            elif not name.startswith(b"x-litellm-"):
                headers.append((name, value))
        token = byok_key.set(key or None)
        try:
            await self.app({**scope, "headers": headers}, receive, send)
        finally:
            byok_key.reset(token)

    def _lifespan(self, receive):
        async def wrapped():
            message = await receive()
            if message["type"] == "lifespan.startup" and self.gate is not None:
                self.gate.start(self.settings, self.journal)
            elif message["type"] == "lifespan.shutdown" and self.gate is not None:
                await self.gate.stop()
            return message
        return wrapped
