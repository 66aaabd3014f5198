"""The money routes (consume, holds, capture, release) served as plain ASGI.

The proxy calls them around every paid request, and FastAPI's per-request machinery (a Request
object, dependency solving, exit stacks, response encoding) cost about as much Python as the
database call itself. Here a request is: read the body, decode it as FastAPI does, check the bearer
token, validate with FastAPI's own functions over the same route definitions, call the route's own
endpoint function, write the JSON. So the errors, the answers and /openapi.json stay exactly those of
the FastAPI routes; every other request falls through to FastAPI.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from fastapi import FastAPI
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.routing import APIRoute
from pydantic_core import PydanticUndefined

from billing.errors import Problem, invalid

log = logging.getLogger("billing")


class LeanRoutes:
    """`paths`: POST routes of `app` whose only dependency is `principal` (the bearer check);
    `authenticate(authorization header, (method, route template))` is the same check for this path."""

    def __init__(self, app: FastAPI, paths: tuple[str, ...], principal: Callable, authenticate: Callable, max_body: int):
        self.authenticate, self.max_body = authenticate, max_body
        self.exact: dict[str, tuple[APIRoute, str]] = {}
        self.patterns: list[tuple[object, tuple[APIRoute, str]]] = []
        for route in app.routes:
            if not (isinstance(route, APIRoute) and route.path in paths and route.methods == {"POST"}):
                continue
            deps = route.dependant.dependencies
            if len(deps) != 1 or deps[0].call is not principal:  # anything more would be silently skipped
                raise ValueError(f"{route.path}: the lean path runs only the bearer check")
            entry = (route, deps[0].name)
            if route.param_convertors:
                self.patterns.append((route.path_regex, entry))
            else:
                self.exact[route.path] = entry
        if len(self.exact) + len(self.patterns) != len(paths):
            raise ValueError(f"lean routes not found among the app's POST routes: {paths}")

    def match(self, scope) -> tuple[tuple[APIRoute, str], dict] | None:
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        if path in self.exact:
            return self.exact[path], {}
        for regex, entry in self.patterns:
            if m := regex.match(path):
                return entry, m.groupdict()
        return None

    async def serve(self, found, scope, receive, send) -> int:
        """Answer a request `match` found; returns the status sent."""
        (route, principal_name), path_params = found
        scope["route"] = route  # the route template, as Starlette sets it
        headers = None
        try:
            content = await self._run(scope, receive, route, principal_name, path_params)
            status = route.status_code or 200
        except Problem as e:
            status, content, headers = e.status, e.body(), e.headers
        except Exception as e:  # as the app's catch-all handler: one line, no values
            log.error("unhandled %s on %s", type(e).__name__, scope["path"])
            status, content = 500, Problem(500, "internal", "internal error").body()
        await respond(send, status, content, headers)
        return status

    async def _run(self, scope, receive, route: APIRoute, principal_name: str, path_params: dict):
        body = await read_body(receive, self.max_body)
        received = PydanticUndefined  # FastAPI's "no body"
        if route.body_field is not None and body:
            if is_json(header(scope, b"content-type")):
                try:
                    received = json.loads(body)
                except json.JSONDecodeError:
                    raise invalid([{"type": "json_invalid"}]) from None
                except Exception:
                    raise Problem(400, "error", "There was an error parsing the body") from None
            else:
                received = body  # refused by validation, as FastAPI does
        caller = self.authenticate(header(scope, b"authorization"), ("POST", route.path))
        values, errors = request_params_to_args(route.dependant.path_params, path_params)
        if route.dependant.body_params:
            body_values, body_errors = await request_body_to_args(route.dependant.body_params, received, route._embed_body_fields)
            values.update(body_values)
            errors += body_errors
        if errors:
            raise invalid(errors)
        return await route.endpoint(**values, **{principal_name: caller})


async def read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:  # chunked bodies carry no content-length
            raise Problem(413, "payload_too_large", f"body over {limit} bytes")
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def is_json(content_type: str | None) -> bool:
    """application/json or application/*+json, as FastAPI decides whether to parse a body."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def respond(send, status: int, content, headers: dict[str, str] | None = None) -> None:
    """Starlette's JSONResponse, byte for byte."""
    data = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [*raw, (b"content-length", str(len(data)).encode()), (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})
