"""Billing unreachable, a burst beyond a user's credit, captures owed across a restart."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx

from tests.proxy.conftest import MODEL, SERVICE, balance, chat, holds, new_user, total_requests, user_token
from components import postgres_config as pgc
from tests.postgres.conftest import free_port

PRICE = 5


def test_billing_down_is_503_and_no_upstream_call(second_proxy, api, upstreams):
    p = second_proxy(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    user = new_user(api, 15)
    before = total_requests(upstreams)
    with httpx.Client(base_url=p.url, timeout=30) as c:
        r = chat(c, user_token(user))
    assert r.status_code == 503, r.text
    assert "billing is unavailable" in r.text and "nothing charged" in r.text  # no recent balance: no stand-in
    assert total_requests(upstreams) == before
    with httpx.Client(base_url=p.url, timeout=30) as c:
        assert c.get("/health").status_code == 200  # alive ...
        ready = c.get("/ready")  # ... serving only whom billing recently vouched for
        assert ready.status_code == 200 and ready.json() == {"status": "degraded: stand-in"}
    assert balance(api, user) == 15


def test_owed_captures_are_replayed_after_a_restart(second_proxy, api, billing, cluster):
    """A capture written to the journal but not confirmed (the process died) is made at the next start."""
    user = new_user(api, 15)
    r = api.post("/v1/credits/holds", json={"user_id": user, "amount": PRICE, "idempotency_key": f"proxy:{uuid.uuid4()}"},
                 headers=SERVICE)
    assert r.status_code == 201, r.text
    hold = r.json()["hold_id"]
    settled_before = str(uuid.uuid4())
    lines = [{"capture": settled_before}, {"capture": hold}, {"done": settled_before}]
    # ... and a last line torn by the crash
    second_proxy(billing.url, "".join(json.dumps(e) + "\n" for e in lines) + '{"capt')
    assert holds(cluster, user) == [("captured", PRICE)]
    assert balance(api, user) == 15 - PRICE


def test_burst_beyond_credit_answers_and_charges_exactly_what_is_covered(proxy, api, cluster, upstreams):
    user = new_user(api, 30 * PRICE)
    tok = user_token(user)

    async def burst():
        async with httpx.AsyncClient(base_url=proxy.url, timeout=120, limits=httpx.Limits(max_connections=50)) as c:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {tok}"})
                                          for _ in range(50)))

    loop = asyncio.new_event_loop()  # not asyncio.run: it would leave the thread without a loop
    try:
        responses = loop.run_until_complete(burst())
    finally:
        loop.close()
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 30 and codes.count(402) == 20, codes
    assert holds(cluster, user) == [("captured", PRICE)] * 30
    assert balance(api, user) == 0


def test_a_restart_posts_answered_advices_and_drops_those_whose_call_never_ended(second_proxy, api, billing, cluster):
    user = new_user(api, 15)
    answered, unfinished = str(uuid.uuid4()), str(uuid.uuid4())
    lines = [{"op": "advice", "id": f"advice:{c}", "user": user, "call": c, "amount": PRICE} for c in (answered, unfinished)]
    lines.append({"answered": f"advice:{answered}"})
    p = second_proxy(billing.url, "".join(json.dumps(e) + "\n" for e in lines))
    deadline = time.time() + 20
    while balance(api, user) != 15 - PRICE and time.time() < deadline:
        time.sleep(0.1)
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        keys = conn.execute("SELECT idempotency_key, taken FROM forced_debits WHERE user_id = %s", (user,)).fetchall()
    assert keys == [(f"standin:{answered}", PRICE)]
    assert balance(api, user) == 15 - PRICE
    assert "dropped 1 stand-in advices whose calls never ended" in p.log.read_text()
