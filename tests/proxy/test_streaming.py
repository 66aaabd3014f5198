"""Streamed completions and when a request is charged (server.py's rule): once a provider has taken
the work on — an answer returned, a stream opened, or the whole prompt handed to it — the client pays,
even if it leaves before the first token; a stream that breaks before any content, and anything no
provider accepted, is released. A client that leaves cancels the upstream call."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from tests.proxy.conftest import MODEL, balance, holds, new_user, user_token

PRICE = 5


def stream_body(**extra) -> dict:
    return {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}], **extra}


def read_stream(client, user: str, body: dict) -> list[dict]:
    events = []
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {user_token(user)}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def leave_early(proxy, upstream, user: str, body: dict, wait: float = 0.3) -> None:
    """Send the request on a raw socket and hang up once it has reached the upstream."""
    data = json.dumps(body).encode()
    url = urlsplit(proxy.url)
    before = upstream.requests
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {user_token(user)}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        deadline = time.time() + 10
        while upstream.requests == before:
            assert time.time() < deadline, "the request never reached the upstream"
            time.sleep(0.05)
        time.sleep(wait)


def wait_cancelled(upstream, before: int) -> None:
    deadline = time.time() + 10
    while upstream.stats()["cancelled"] == before:
        assert time.time() < deadline, "the upstream call was not cancelled when the client left"
        time.sleep(0.05)


def test_streamed_completion_is_charged_once_after_it_completes(client, api, cluster):
    user = new_user(api, 15)
    events = read_stream(client, user, stream_body(stream_options={"include_usage": True}))
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "hello from together"
    assert {e["model"] for e in events} == {MODEL}  # the exposed name, never the provider's id
    assert events[-1]["usage"]["completion_tokens"] > 0  # stream_options reached the provider
    assert holds(cluster, user) == [("captured", PRICE)]
    assert balance(api, user) == 15 - PRICE


def test_client_leaving_after_the_provider_opened_the_stream_pays_and_cancels_it(proxy, api, cluster, upstreams):
    """The provider accepted the (maybe huge) prompt: its work is done, so the price is due."""
    upstream = upstreams["together"]
    upstream.control(first_token_delay=5.0)
    user, cancelled = new_user(api, 15), upstream.stats()["cancelled"]
    leave_early(proxy, upstream, user, stream_body())
    wait_cancelled(upstream, cancelled)
    assert holds(cluster, user, timeout=15) == [("captured", PRICE)]
    assert balance(api, user) == 15 - PRICE


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_once_a_provider_has_the_prompt_pays_and_cancels_the_call(proxy, api, cluster, upstreams, stream):
    """A 200 kB prompt handed to the provider and abandoned 0.7 s later, before any answer: the
    provider did the prefill, so the price is due (issue #24); the upstream call is cancelled."""
    upstream = upstreams["together"]
    upstream.control(accept_delay=5.0)
    user, cancelled = new_user(api, 15), upstream.stats()["cancelled"]
    body = stream_body(stream=stream, messages=[{"role": "user", "content": "x" * 200_000}])
    started = time.time()
    leave_early(proxy, upstream, user, body, wait=0.7)
    assert time.time() - started < 5  # the client left long before any answer
    wait_cancelled(upstream, cancelled)
    assert holds(cluster, user, timeout=15) == [("captured", PRICE)]
    assert balance(api, user) == 15 - PRICE


def test_stream_that_breaks_after_content_is_charged(client, api, cluster, upstreams):
    upstreams["together"].control(die_after=1)
    user = new_user(api, 15)
    events = read_stream(client, user, stream_body())
    assert events[0]["choices"][0]["delta"]["content"] == "hello "
    assert events[-1]["error"]["code"] == "upstream_error"  # the client is told the answer is cut short
    assert holds(cluster, user) == [("captured", PRICE)]
    assert balance(api, user) == 15 - PRICE


def test_stream_that_breaks_before_any_content_is_released(client, api, cluster, upstreams):
    upstreams["together"].control(die_after=0)
    user = new_user(api, 15)
    events = read_stream(client, user, stream_body())
    assert [e for e in events if "error" not in e and any(c["delta"].get("content") for c in e["choices"])] == []
    assert "nothing was charged" in events[-1]["error"]["message"]
    assert holds(cluster, user) == [("released", PRICE)]
    assert balance(api, user) == 15
