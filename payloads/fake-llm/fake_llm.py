"""`make local`'s stand-in for the LLM providers: a small OpenAI-compatible server (standard
library only). POST /v1/chat/completions answers, streamed or not, with a fixed reply that counts
the messages it was given (never echoing them); GET /v1/models lists what it serves; GET /health.
Real provider keys given to `make local` replace it (components/local.py)."""

from __future__ import annotations

import json
import os
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = "Hello from the local fake upstream."


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # no request lines: a request's path is all it would show
        pass

    def _json(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "healthy"})
        elif self.path.endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "local"}]})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
        if not self.path.endswith("/chat/completions"):
            return self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        cid, model, now = f"chatcmpl-{uuid.uuid4().hex}", request.get("model", "fake"), int(time.time())
        text = f"{REPLY} ({len(request.get('messages') or [])} messages)"
        usage = {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}
        if not request.get("stream"):
            return self._json(200, {"id": cid, "object": "chat.completion", "created": now, "model": model, "usage": usage,
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": text}}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i, delta in enumerate([{"role": "assistant", "content": ""}, *({"content": w + " "} for w in text.split())]):
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        last = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model, "usage": usage,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        self.close_connection = True


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
