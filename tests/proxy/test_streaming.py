"""Streamed completions: charged once after the stream completes, never when the client leaves
before the first token."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

from tests.proxy.conftest import MODEL, balance, holds, new_user, user_token

PRICE = 5


def test_streamed_completion_is_charged_once_after_it_completes(client, api, cluster):
    user = new_user(api, 15)
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    words = []
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {user_token(user)}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                words.append(delta.get("content") or "")
    assert "".join(words) == "hello from together"
    assert holds(cluster, user) == [("captured", PRICE)]
    assert balance(api, user) == 15 - PRICE


def test_client_leaving_before_the_first_token_costs_nothing(proxy, api, cluster, upstreams):
    upstreams["together"].control(first_token_delay=3.0)
    user = new_user(api, 15)
    body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    url = urlsplit(proxy.url)
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {user_token(user)}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 10
        while upstreams["together"].requests == 0 or not holds(cluster, user, timeout=0):
            assert time.time() < deadline, "the request never reached the upstream"
            time.sleep(0.05)
    # The socket is closed while the upstream still withholds its first token.
    assert holds(cluster, user, timeout=15) == [("released", PRICE)]
    assert balance(api, user) == 15
