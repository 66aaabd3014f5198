"""`make local`'s stand-in for the LLM providers: a small OpenAI-compatible server (standard
library only). POST /v1/chat/completions answers, streamed or not, with a fixed reply that counts
the messages it was given (never echoing them); GET /v1/models lists what it serves; GET /health.
Real provider keys given to `make local` replace it (components/local.py).

It answers in the shape asked for, as a model would, so structured clients (the `openai` SDK with
`instructor`) work against it: a forced `tool_choice` gets a call of that tool, `response_format`
`json_schema` an instance of the schema, `json_object` an instance of the JSON schema the prompt
carries (instructor's JSON mode puts it there) or `{}`, and a prompt carrying a JSON schema alone
(MD_JSON mode) that instance in a ```json block. Instances are the smallest that validate.

A prompt carrying `[fake-llm:reask:<tag>]` is answered once with an empty object instead (for the
first request carrying that tag), so a structured client's own retry runs (instructor's reask), as
it does when a real model answers outside the schema."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = "Hello from the local fake upstream."
SCHEMA_DEPTH = 32  # a recursive schema gets no deeper than this
REASK = re.compile(r"\[fake-llm:reask:([A-Za-z0-9._-]{1,64})\]")
_answered_wrong: set[str] = set()  # reask tags already answered with an empty object
_lock = threading.Lock()


def instance(schema: dict, defs: dict | None = None, depth: int = 0) -> object:
    """The smallest value that validates against a JSON schema (the subset pydantic emits)."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if depth > SCHEMA_DEPTH or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        return instance(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance(schema[key][0], defs, depth + 1)
    kind = schema.get("type", "object")
    kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
    if kind == "object":
        props = schema.get("properties", {})
        return {k: instance(props[k], defs, depth + 1) for k in schema.get("required", []) if k in props}
    if kind == "array":
        return [instance(schema.get("items", {}), defs, depth + 1) for _ in range(schema.get("minItems", 0))]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        return max(0, low + (1 if "exclusiveMinimum" in schema else 0))
    return {"boolean": False, "null": None}.get(kind, "x" * schema.get("minLength", 1))


def texts(messages: list) -> list[str]:
    """Each message's text (a list of content parts joined)."""
    out = []
    for message in messages or []:
        text = message.get("content") if isinstance(message, dict) else None
        out.append(" ".join(p.get("text", "") for p in text if isinstance(p, dict)) if isinstance(text, list) else text or "")
    return out


def answer_wrong_once(messages: list) -> bool:
    """True for the first request whose prompt carries a reask tag not seen before."""
    tags = {m.group(1) for text in texts(messages) for m in REASK.finditer(text)}
    with _lock:
        new = tags - _answered_wrong
        if len(_answered_wrong) > 10_000:  # a long-lived stand-in forgets rather than grows
            _answered_wrong.clear()
        _answered_wrong.update(tags)
    return bool(new)


def schema_in(messages: list) -> dict:
    """The first JSON schema (an object with `properties`) written into the messages, or none."""
    decoder = json.JSONDecoder()
    for text in texts(messages):
        for start in (i for i, c in enumerate(text) if c == "{"):
            try:
                doc, _ = decoder.raw_decode(text, start)
            except ValueError:
                continue
            if isinstance(doc, dict) and "properties" in doc:
                return doc
    return {}


def structured(request: dict) -> dict | None:
    """The assistant message a model would give for a forced tool or a JSON response format (None:
    plain text will do)."""
    wrong = answer_wrong_once(request.get("messages"))

    def instance_of(schema: dict) -> object:  # a reask tag's first answer leaves the schema out
        return {} if wrong else instance(schema)
    tools = [t.get("function", {}) for t in request.get("tools") or []]
    choice = request.get("tool_choice")
    forced = choice.get("function", {}).get("name") if isinstance(choice, dict) else (choice == "required" and tools and tools[0].get("name"))
    if forced:
        tool = next((t for t in tools if t.get("name") == forced), {})
        call = {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                "function": {"name": forced, "arguments": json.dumps(instance_of(tool.get("parameters") or {}))}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    fmt = request.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return {"role": "assistant", "content": json.dumps(instance_of((fmt.get("json_schema") or {}).get("schema") or {}))}
    schema = schema_in(request.get("messages"))
    if fmt.get("type") == "json_object":
        return {"role": "assistant", "content": json.dumps(instance_of(schema))}
    if schema:  # asked in the prompt alone (instructor's MD_JSON mode): a fenced block, as models answer
        return {"role": "assistant", "content": f"```json\n{json.dumps(instance_of(schema))}\n```"}
    return None


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
        message = structured(request) or {"role": "assistant", "content": text}
        if not request.get("stream"):
            return self._json(200, {"id": cid, "object": "chat.completion", "created": now, "model": model, "usage": usage,
                                    "choices": [{"index": 0, "message": message,
                                                 "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}]})
        text = message.get("content") or text  # a stream carries the JSON as text (a tool call streams as plain text)
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
