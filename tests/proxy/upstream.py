"""A small OpenAI-compatible upstream standing in for Together, Groq or OpenRouter (and OpenAI for
bring-your-own-key): POST .../chat/completions, streamed or not; POST .../v1/messages answers as
Anthropic's API does (not streamed), for bring-your-own-key Anthropic calls. A forced tool or a JSON
response format is answered as `make local`'s fake upstream answers it (payloads/fake-llm).

    python -m tests.proxy.upstream --name together --port 9001

Control (the tests', not the proxy's): POST /_control with any of
  fail: true                 answer HTTP `fail_status` (500) with `fail_message`, quoting the prompt back
                             (as some providers' 400s do), and a Retry-After header when `retry_after` is set;
  fail_when: "MARK"          fail only requests whose prompt contains MARK (a client's bad request);
  accept_delay: 2.0          wait before answering at all (before the response headers);
  first_token_delay: 2.0     open a stream at once but wait before its first token;
  chunk_delay: 2.0           wait that long after each streamed content chunk but the last;
  die_after: 1               drop the connection after that many streamed content chunks.
GET /_stats reports how many completion requests it saw, how many the caller abandoned before the
answer (`cancelled`), the last request's body and its Authorization (or Anthropic's x-api-key) header.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "payloads" / "fake-llm"))
from fake_llm import structured  # noqa: E402  (`make local`'s fake answers forced tools and JSON the same way)


class Upstream:
    def __init__(self, name: str):
        self.name = name
        self.requests = self.cancelled = 0
        self.reset()
        self.last_body: dict | None = None
        self.last_auth: str | None = None

    def reset(self) -> None:
        self.fail, self.fail_status, self.fail_message, self.fail_when = False, 500, "is down", None
        self.retry_after = None
        self.accept_delay = self.first_token_delay = self.chunk_delay = 0.0
        self.die_after = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if path == "/_control" and method == "POST":
            settings = json.loads(body or b"{}")
            if settings.pop("reset", False):
                self.reset()
            for k, v in settings.items():
                setattr(self, k, v)
            return await self._json(send, 200, {"ok": True})
        if path == "/_stats":
            return await self._json(send, 200, {"requests": self.requests, "cancelled": self.cancelled, "last_body": self.last_body, "last_auth": self.last_auth})
        if path.endswith("/chat/completions") and method == "POST":
            self.requests += 1
            request = json.loads(body)
            self.last_body = request
            self.last_auth = dict(scope["headers"]).get(b"authorization", b"").decode()
            prompt = json.dumps(request.get("messages"))
            if self.fail and (self.fail_when is None or self.fail_when in prompt):
                headers = [(b"retry-after", str(self.retry_after).encode())] if self.retry_after is not None else []
                return await self._json(send, self.fail_status, {"error": {
                    "message": f"{self.name} {self.fail_message}: {prompt}", "type": "invalid_request_error"}}, headers)
            if self.accept_delay and not await self._wait(receive, self.accept_delay):
                return
            if request.get("stream"):
                return await self._stream(send, receive, request)
            return await self._json(send, 200, self._completion(request))
        if path.endswith("/v1/messages") and method == "POST":  # Anthropic's API, for bring-your-own-key
            self.requests += 1
            request = json.loads(body)
            self.last_body, self.last_auth = request, dict(scope["headers"]).get(b"x-api-key", b"").decode()
            return await self._json(send, 200, {
                "id": f"msg_{self.requests}", "type": "message", "role": "assistant", "model": request.get("model"),
                "content": [{"type": "text", "text": f"hello from {self.name}"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 3}})
        return await self._json(send, 404, {"error": {"message": "not found"}})

    def _completion(self, request: dict) -> dict:
        message = structured(request) or {"role": "assistant", "content": f"hello from {self.name}"}
        return {
            "id": f"chatcmpl-{self.name}-{self.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model"), "service_tier": "on_demand",  # as real providers send (LiteLLM's Groq path needs it)
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if "tool_calls" in message else "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }

    async def _wait(self, receive, seconds: float) -> bool:
        """Sleep, unless the caller hangs up first (then count it and say so)."""
        try:
            message = await asyncio.wait_for(receive(), seconds)
        except asyncio.TimeoutError:
            return True
        if message["type"] == "http.disconnect":
            self.cancelled += 1
            return False
        return True

    async def _stream(self, send, receive, request: dict):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        if self.first_token_delay and not await self._wait(receive, self.first_token_delay):
            return
        base = {"id": f"chatcmpl-{self.name}-{self.requests}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": request.get("model")}
        for i, word in enumerate(["hello ", "from ", self.name]):
            if self.die_after is not None and i >= self.die_after:
                raise ConnectionAbortedError("the provider died mid-stream")  # uvicorn drops the connection
            if i and self.chunk_delay and not await self._wait(receive, self.chunk_delay):
                return
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True})
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()})

    @staticmethod
    async def _json(send, status: int, doc: dict, headers: list | None = None):
        data = json.dumps(doc).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *(headers or [])]})
        await send({"type": "http.response.body", "body": data})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(Upstream(args.name), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
