"""The lean path for the money routes answers exactly as the FastAPI routes it stands in for: the
same app is asked twice, in process, through the lean path and straight through FastAPI. Only
requests refused before any database work are compared (no database here)."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import httpx
import pytest

from tests.billing.conftest import KEY, token

ROUTES = ["/v1/credits/consume", "/v1/credits/holds", f"/v1/credits/holds/{uuid.uuid4()}/capture",
          f"/v1/credits/holds/{uuid.uuid4()}/release", "/v1/credits/holds/not-a-uuid/capture"]
SOMEONE, OTHER = str(uuid.uuid4()), str(uuid.uuid4())
AUTH = {"none": {}, "garbage": {"Authorization": "Bearer not.a.jwt"}, "basic": {"Authorization": "Basic dXNlcjpwdw=="},
        "user": {"Authorization": f"Bearer {token('user', SOMEONE)}"}}
JSON = {"content-type": "application/json"}
BODIES = {
    "empty": (b"", JSON),
    "broken": (b"{", JSON),
    "array": (b"[]", JSON),
    "null": (b"null", JSON),
    "not_utf8": (b"\xff\xfe", JSON),
    "bad_user": (b'{"user_id": "x", "idempotency_key": "k"}', JSON),
    "extra_field": (json.dumps({"user_id": OTHER, "idempotency_key": "k", "amount": 5, "admin": True}).encode(), JSON),
    "float_amount": (json.dumps({"user_id": OTHER, "idempotency_key": "k", "amount": 5.0}).encode(), JSON),
    "nul_description": (json.dumps({"user_id": OTHER, "idempotency_key": "k", "description": "\u0000"}).encode(), JSON),
    "another_user": (json.dumps({"user_id": OTHER, "idempotency_key": "k", "amount": 5}).encode(), JSON),
    "text_plain": (json.dumps({"user_id": OTHER, "idempotency_key": "k", "amount": 5}).encode(), {"content-type": "text/plain"}),
    "no_content_type": (json.dumps({"user_id": OTHER, "idempotency_key": "k", "amount": 5}).encode(), {}),
    "json_suffix": (json.dumps({"amount": 3}).encode(), {"content-type": "application/merged-patch+json; charset=utf-8"}),
}


@pytest.fixture(scope="module")
def apps():
    from billing.app import create_app
    from billing.settings import Settings

    lean = create_app(Settings(database_url="postgresql://nobody@127.0.0.1:1/none", jwt_private_key=KEY))
    return lean, lean.app  # the whole app (lean path first) and its FastAPI app alone


def test_the_lean_path_answers_as_fastapi_does(apps):
    lean, fastapi = apps
    cases = list(itertools.product(ROUTES, AUTH, BODIES))

    async def ask(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://billing") as client:
            out = []
            for path, auth, body in cases:
                content, headers = BODIES[body]
                r = await client.post(path, content=content, headers={**AUTH[auth], **headers})
                out.append((r.status_code, r.content, r.headers.raw))
            return out

    loop = asyncio.new_event_loop()
    try:
        via_lean, via_fastapi = loop.run_until_complete(ask(lean)), loop.run_until_complete(ask(fastapi))
    finally:
        loop.close()
    differences = [(case, a, b) for case, a, b in zip(cases, via_lean, via_fastapi) if a != b]
    assert not differences, differences[:3]
    statuses = {answer[0] for answer in via_lean}
    assert {401, 403, 422} <= statuses and not any(s >= 500 for s in statuses)


def test_the_lean_path_serves_only_routes_fastapi_would_match(apps):
    lean, _ = apps
    scope = {"type": "http", "method": "POST", "headers": []}
    assert lean.lean.match({**scope, "path": "/v1/credits/consume"}) is not None
    assert lean.lean.match({**scope, "path": f"/v1/credits/holds/{uuid.uuid4()}/release"}) is not None
    for method, path in [("GET", "/v1/credits/consume"), ("POST", "/v1/credits/consume/"), ("POST", "/v1/credits/grant"),
                         ("POST", "/v1/credits/holds/x/y/capture"), ("POST", "/v1/credits/holds//release")]:
        assert lean.lean.match({**scope, "method": method, "path": path}) is None, (method, path)
