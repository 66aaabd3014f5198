"""Settling with billing when something on the proxy's side goes wrong: a call log that cannot be
written, a journal entry billing keeps refusing, a proxy killed (SIGKILL) with calls in flight or in
the middle of a stream. Real billing and PostgreSQL, real proxy processes, the fake upstreams."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.billing.conftest import SERVICE
from tests.proxy.conftest import MODEL, Proxy, balance, chat, holds, new_user, proxy_env, user_token
from tests.proxy.test_standin import (  # noqa: F401  (fixtures)
    PRICE, metric, own_billing, settled_and_reconciled, until,
)


@pytest.fixture
def start_proxy(upstreams, tmp_path):
    """Proxy processes of the test's own (journal under tmp_path/<name>), killed at the end."""
    started: list[Proxy] = []

    def start(billing_url: str, name: str = "p", journal_text: str = "", **env) -> Proxy:
        journal = tmp_path / name / "captures.jsonl"
        journal.parent.mkdir(exist_ok=True)
        journal.write_text(journal_text)
        p = Proxy({**proxy_env(billing_url, upstreams, journal), **env}, tmp_path / f"{name}.log")
        started.append(p)
        p.start()
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)


def test_a_call_log_that_cannot_be_written_costs_no_answer_and_no_charge(start_proxy, billing, api, cluster, tmp_path):
    # Today's (and tomorrow's) call log is a directory: every write fails, root or not.
    calls = tmp_path / "p" / "calls"
    today = dt.datetime.now(dt.timezone.utc).date()
    for day in (today, today + dt.timedelta(days=1)):
        (calls / f"calls-{day.isoformat()}.jsonl").mkdir(parents=True)
    p = start_proxy(billing.url)
    user, poor = new_user(api, 100), new_user(api, 3)
    with httpx.Client(base_url=p.url, timeout=60) as c:
        codes = [chat(c, user_token(user)).status_code for _ in range(3)]
        codes.append(chat(c, user_token(user), stream=True).status_code)
        refused = chat(c, user_token(poor))
    assert codes == [200] * 4
    assert refused.status_code == 402, refused.text
    until(lambda: metric(p, "ciris_proxy_owed", 'kind="capture"') == 0, 20, "the captures")
    assert balance(api, user) == 100 - 4 * PRICE
    assert holds(cluster, user) == [("captured", PRICE)] * 4
    assert metric(p, "ciris_proxy_call_log_failures_total") >= 5
    assert "could not be written" in p.log.read_text()


def test_entries_billing_keeps_refusing_hold_up_no_other(start_proxy, billing, api):
    """Captures owed from a previous run, behind entries billing refuses every time (422: malformed
    voids, as an older or newer billing might answer) — a whole settler batch (64) of them: the
    captures settle promptly all the same, and so do new ones."""
    user, n = new_user(api, 10_000), 200
    placed = []
    for _ in range(n):  # holds the last process placed and whose calls were answered
        r = api.post("/v1/credits/holds", json={"user_id": user, "amount": PRICE, "idempotency_key": f"proxy:{uuid.uuid4()}",
                                                "ttl_seconds": 600}, headers=SERVICE)
        assert r.status_code == 201, r.text
        placed.append(r.json()["hold_id"])
    refused = [{"op": "void", "id": f"void:proxy:bad{i}", "user": user, "key": f"proxy:bad{i}", "amount": -1} for i in range(64)]
    lines = refused + [{"op": "capture", "id": h, "hold": h, "user": user} for h in placed]
    p = start_proxy(billing.url, journal_text="".join(json.dumps(line) + "\n" for line in lines))
    started = time.monotonic()
    until(lambda: metric(p, "ciris_proxy_owed", 'kind="capture"') == 0, 30, "the owed captures")
    took = time.monotonic() - started
    assert balance(api, user) == 10_000 - n * PRICE
    assert metric(p, "ciris_proxy_owed", 'kind="release"') == 64  # the refused ones are kept, still tried
    assert took < 10, f"{n} owed captures took {took:.1f} s to settle beside the refused entries"

    time.sleep(2)  # the refused entries' back-off has grown
    with httpx.Client(base_url=p.url, timeout=60) as c:
        assert chat(c, user_token(user)).status_code == 200
        answered = time.monotonic()
    until(lambda: balance(api, user) == 10_000 - (n + 1) * PRICE, 10, "the new call's capture")
    assert time.monotonic() - answered < 1.5, "a new capture waited behind the refused entries"
    assert metric(p, "ciris_proxy_owed", 'kind="release"') == 64
    assert metric(p, "ciris_proxy_capture_retries_total") >= 128


def in_flight(proxy: Proxy, token: str, n: int, **extra) -> list:
    """`n` paid calls sent in threads; their futures (the proxy may die under them). `extra`: more
    of the request body (an interaction's metadata)."""
    pool = ThreadPoolExecutor(n)

    def call():
        try:
            with httpx.Client(base_url=proxy.url, timeout=60) as c:
                return chat(c, token, **extra).status_code
        except httpx.TransportError as e:
            return type(e).__name__

    futures = [pool.submit(call) for _ in range(n)]
    pool.shutdown(wait=False)
    return futures


def test_killed_with_calls_in_flight_their_holds_released_at_restart(start_proxy, billing, api, cluster, upstreams):
    user = new_user(api, 4 * PRICE)  # exactly the four calls in flight
    p = start_proxy(billing.url, HOLD_TTL_SECONDS="600")
    for u in upstreams.values():
        u.control(accept_delay=30.0)
    calls = in_flight(p, user_token(user), 4)
    until(lambda: balance(api, user) == 0, 20, "the four holds")  # placed; the upstream is thinking
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(10)
    assert sorted(f.result(timeout=30) for f in calls) != [200] * 4  # nobody got an answer
    for u in upstreams.values():
        u.control(reset=True)

    p.start()  # the same journal: its in-flight holds are released now, not in 10 minutes
    until(lambda: balance(api, user) == 4 * PRICE, 10, "the in-flight holds' releases")
    assert [status for status, _ in holds(cluster, user)] == ["released"] * 4
    with httpx.Client(base_url=p.url, timeout=60) as c:
        r = chat(c, user_token(user))
    assert r.status_code == 200, r.text  # not 402 with the money in the account
    settled_and_reconciled(p, billing, cluster, api, {user: 3 * PRICE})


def test_killed_mid_stream_the_answer_already_streamed_is_charged(start_proxy, own_billing, api, cluster, upstreams):
    """A stream is charged once content reached the client, so a proxy killed mid-stream still
    charges it (a hold's capture, a stand-in's advice), once."""
    hold_user, standin_user = new_user(api, 100), new_user(api, 100)
    p = start_proxy(own_billing.url, HOLD_PLACEMENT_TIMEOUT_MS="1000")

    def first_chunk_then_kill(user: str) -> None:
        for u in upstreams.values():
            u.control(chunk_delay=30.0)
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=p.url, timeout=60) as c:
            with c.stream("POST", "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {user_token(user)}"}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if '"content"' in line:
                        break  # the client has content; the rest is 30 s away
                p.proc.send_signal(signal.SIGKILL)
                p.proc.wait(10)
        for u in upstreams.values():
            u.control(reset=True)

    first_chunk_then_kill(hold_user)  # a billing hold
    p.start()
    with httpx.Client(base_url=p.url, timeout=60) as c:
        assert chat(c, user_token(standin_user)).status_code == 200  # billing vouches for this one's balance
    until(lambda: metric(p, "ciris_proxy_owed", 'kind="capture"') == 0, 20, "the captures")
    own_billing.stop()
    first_chunk_then_kill(standin_user)  # billing is down: stood in
    p.start()
    own_billing.start()
    settled_and_reconciled(p, own_billing, cluster, api, {hold_user: 100 - PRICE, standin_user: 100 - 2 * PRICE})
    assert [status for status, _ in holds(cluster, hold_user)] == ["captured"]
