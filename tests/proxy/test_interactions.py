"""One charge per agent interaction (issue #24, ADR 8): the calls of one user's
`metadata.interaction_id` inside a window share one charge, once across both regions' proxies,
retries and restarts; the window's time, calls or tokens passed start exactly one new charge; a call
without an interaction id is charged on its own. Real billing and PostgreSQL, real proxy processes,
the fake upstreams (whose answers report 8 tokens)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import httpx

from components import postgres_config as pgc
from tests.billing.conftest import SERVICE
from tests.proxy.conftest import MODEL, balance, chat, holds, new_user, total_requests, user_token
from tests.proxy.test_settling import in_flight, start_proxy  # noqa: F401  (start_proxy: a fixture)
from tests.proxy.test_standin import PRICE, burst, metric, own_billing, run, settled_and_reconciled, until  # noqa: F401


def ichat(client: httpx.Client, tok: str, interaction: str, **extra) -> httpx.Response:
    return chat(client, tok, metadata={"interaction_id": interaction, "retry_count": 0}, **extra)


def concurrently(proxy, tok: str, interaction: str, n: int) -> list[int]:
    return burst(proxy, [tok] * n, metadata={"interaction_id": interaction})


def charges(cluster, user: str) -> list[tuple[str, int]]:
    """The user's debits in the ledger (type, cents), oldest first."""
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        rows = conn.execute("SELECT type, amount FROM transactions WHERE user_id = %s AND amount < 0 ORDER BY seq",
                            (user,)).fetchall()
    return [(t, -int(a)) for t, a in rows]


def test_a_multi_call_interaction_is_charged_once_and_follow_ups_skip_billing(start_proxy, billing, api, cluster):
    p = start_proxy(billing.url)
    user = new_user(api, 100)
    tok, ix = user_token(user), f"ix-{uuid.uuid4()}"
    first = metric(p, "ciris_proxy_holds_total", 'outcome="placed"')
    with httpx.Client(base_url=p.url, timeout=60) as c:
        codes = [ichat(c, tok, ix, stream=i % 3 == 2).status_code for i in range(10)]
    codes += concurrently(p, tok, ix, 16)
    assert codes == [200] * 26
    assert metric(p, "ciris_proxy_holds_total", 'outcome="placed"') - first == 1  # one billing round trip in all
    assert metric(p, "ciris_proxy_interaction_calls_total", 'kind="followup"') >= 25
    until(lambda: balance(api, user) == 100 - PRICE, 10, "the window's capture")
    assert holds(cluster, user) == [("captured", PRICE)]
    settled_and_reconciled(p, billing, cluster, api, {user: 100 - PRICE})


def test_calls_without_an_interaction_id_are_charged_each_as_before(client, api, cluster):
    user = new_user(api, 100)
    assert [chat(client, user_token(user)).status_code for _ in range(3)] == [200] * 3
    assert holds(cluster, user) == [("captured", PRICE)] * 3
    assert balance(api, user) == 100 - 3 * PRICE


def test_one_interaction_across_both_regions_is_charged_once(start_proxy, billing, api, cluster):
    """Two proxy processes (two regions) against one billing: whichever places the window's hold,
    the other finds it by key and joins it; the calls on both sides are one charge."""
    east, west = start_proxy(billing.url, "east"), start_proxy(billing.url, "west")
    user = new_user(api, 100)
    tok, ix = user_token(user), f"ix-{uuid.uuid4()}"
    with httpx.Client(base_url=east.url, timeout=60) as e, httpx.Client(base_url=west.url, timeout=60) as w:
        codes = [ichat(e if i % 2 else w, tok, ix).status_code for i in range(6)]
    codes += concurrently(east, tok, ix, 8) + concurrently(west, tok, ix, 8)
    assert codes == [200] * 22
    assert metric(west, "ciris_proxy_interaction_windows_total", 'outcome="placed"') == 1
    assert metric(east, "ciris_proxy_interaction_windows_total", 'outcome="joined"') == 1
    until(lambda: balance(api, user) == 100 - PRICE, 10, "the window's capture")
    assert holds(cluster, user) == [("captured", PRICE)]
    assert charges(cluster, user) == [("capture", PRICE)]
    for p in (east, west):
        settled_and_reconciled(p, billing, cluster, api, {user: 100 - PRICE})

    # A restarted region walks billing's keys and joins the same window: still one charge.
    east.stop()
    east.start()
    with httpx.Client(base_url=east.url, timeout=60) as e:
        assert ichat(e, tok, ix).status_code == 200
    assert metric(east, "ciris_proxy_interaction_windows_total", 'outcome="joined"') == 1
    settled_and_reconciled(east, billing, cluster, api, {user: 100 - PRICE})


def test_the_window_passing_starts_exactly_one_new_charge_in_both_regions(start_proxy, billing, api, cluster):
    east = start_proxy(billing.url, "east", INTERACTION_WINDOW_SECONDS="2")
    west = start_proxy(billing.url, "west", INTERACTION_WINDOW_SECONDS="2")
    user = new_user(api, 100)
    tok, ix = user_token(user), f"ix-{uuid.uuid4()}"
    with httpx.Client(base_url=east.url, timeout=60) as e, httpx.Client(base_url=west.url, timeout=60) as w:
        assert [ichat(c, tok, ix).status_code for c in (e, w, e)] == [200] * 3
        time.sleep(2.3)
        assert [ichat(c, tok, ix).status_code for c in (w, e, w, e)] == [200] * 4
    until(lambda: balance(api, user) == 100 - 2 * PRICE, 10, "the two windows' captures")
    assert holds(cluster, user) == [("captured", PRICE)] * 2
    for p in (east, west):
        settled_and_reconciled(p, billing, cluster, api, {user: 100 - 2 * PRICE})


def test_the_call_and_token_budgets_start_exactly_one_new_charge(start_proxy, billing, api, cluster):
    calls = start_proxy(billing.url, "calls", INTERACTION_MAX_CALLS="3")
    tokens = start_proxy(billing.url, "tokens", INTERACTION_MAX_TOKENS="10")  # each answer reports 8 tokens
    by_calls, by_tokens = new_user(api, 100), new_user(api, 100)
    ix = f"ix-{uuid.uuid4()}"
    with httpx.Client(base_url=calls.url, timeout=60) as c:
        assert [ichat(c, user_token(by_calls), ix).status_code for _ in range(7)] == [200] * 7  # 3 + 3 + 1
    with httpx.Client(base_url=tokens.url, timeout=60) as c:
        assert [ichat(c, user_token(by_tokens), ix).status_code for _ in range(5)] == [200] * 5  # 8+8, 8+8, 8
    for user in (by_calls, by_tokens):
        assert holds(cluster, user) == [("captured", PRICE)] * 3
    settled_and_reconciled(calls, billing, cluster, api, {by_calls: 100 - 3 * PRICE})
    settled_and_reconciled(tokens, billing, cluster, api, {by_tokens: 100 - 3 * PRICE})


def test_an_interaction_nothing_answered_costs_nothing_and_the_next_call_pays_once(client, api, cluster, upstreams):
    user = new_user(api, 100)
    tok, ix = user_token(user), f"ix-{uuid.uuid4()}"
    for u in upstreams.values():
        u.control(fail=True)
    assert ichat(client, tok, ix).status_code == 502
    assert holds(cluster, user) == [("released", PRICE)]
    for u in upstreams.values():
        u.control(reset=True)
    assert [ichat(client, tok, ix).status_code for _ in range(3)] == [200] * 3
    until(lambda: balance(api, user) == 100 - PRICE, 10, "the new window's capture")
    assert holds(cluster, user) == [("released", PRICE), ("captured", PRICE)]


def test_a_window_released_by_its_region_while_another_answered_is_charged_once(start_proxy, billing, api, cluster, upstreams):
    """Region B joins the hold region A placed; A's calls fail and A releases it while B's call is
    answered: B's capture is refused, and becomes a forced debit under the capture's key."""
    west = start_proxy(billing.url, "west")
    user = new_user(api, 100)
    tok, ix = user_token(user), f"ix-{uuid.uuid4()}"
    placed = api.post("/v1/credits/holds", json={"user_id": user, "amount": PRICE, "idempotency_key": f"ix:{user}:{ix}:0",
                                                 "ttl_seconds": 900}, headers=SERVICE)  # region A's
    assert placed.status_code == 201, placed.text
    for u in upstreams.values():
        u.control(accept_delay=1.5)

    async def b_answers_while_a_releases():
        async with httpx.AsyncClient(base_url=west.url, timeout=60) as c:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "metadata": {"interaction_id": ix}}
            call = asyncio.ensure_future(c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {tok}"}))
            await asyncio.sleep(0.7)
            released = api.post(f"/v1/credits/holds/{placed.json()['hold_id']}/release", headers=SERVICE)
            assert released.status_code == 200
            return (await call).status_code

    assert run(b_answers_while_a_releases()) == 200
    assert metric(west, "ciris_proxy_interaction_windows_total", 'outcome="joined"') == 1
    until(lambda: balance(api, user) == 100 - PRICE, 10, "the forced debit")
    assert charges(cluster, user) == [("forced", PRICE)]
    settled_and_reconciled(west, billing, cluster, api, {user: 100 - PRICE})


def test_an_interaction_during_a_billing_outage_is_stood_in_and_settled_once(start_proxy, own_billing, api, cluster, upstreams):
    p = start_proxy(own_billing.url, HOLD_PLACEMENT_TIMEOUT_MS="1000")
    user = new_user(api, 100)
    tok = user_token(user)
    with httpx.Client(base_url=p.url, timeout=60) as c:
        assert chat(c, tok).status_code == 200  # billing vouches for the balance
        until(lambda: metric(p, "ciris_proxy_owed", 'kind="capture"') == 0, 10, "the first capture")
        own_billing.stop()
        ix = f"ix-{uuid.uuid4()}"
        before = total_requests(upstreams)
        assert [ichat(c, tok, ix).status_code for _ in range(5)] == [200] * 5
        assert total_requests(upstreams) - before == 5
    assert concurrently(p, tok, ix, 8) == [200] * 8
    assert metric(p, "ciris_proxy_interaction_windows_total", 'outcome="stood_in"') == 1
    assert metric(p, "ciris_proxy_standin_exposure_cents") == PRICE  # one window, not 13 calls
    assert metric(p, "ciris_proxy_owed", 'kind="advice"') == 1
    own_billing.start()
    settled_and_reconciled(p, own_billing, cluster, api, {user: 100 - 2 * PRICE})
    assert charges(cluster, user) == [("capture", PRICE), ("forced", PRICE)]


def test_killed_with_an_interactions_first_call_in_flight_the_restart_releases_it_and_walks_on(
        start_proxy, billing, api, cluster, upstreams):
    """The window's placement was in flight when the proxy died: the restart voids it (no call was
    answered, nothing is charged), and the interaction's next call skips the released key and pays
    the next window once."""
    p = start_proxy(billing.url, HOLD_TTL_SECONDS="600")
    user = new_user(api, 100)
    tok, ix = user_token(user), f"ix-{uuid.uuid4()}"
    for u in upstreams.values():
        u.control(accept_delay=30.0)
    calls = in_flight(p, tok, 3, metadata={"interaction_id": ix})
    until(lambda: balance(api, user) == 100 - PRICE, 20, "the window's hold")  # one hold for the three calls
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(10)
    assert all(f.result(timeout=30) != 200 for f in calls)
    for u in upstreams.values():
        u.control(reset=True)
    p.start()
    until(lambda: balance(api, user) == 100, 10, "the void of the in-flight window")
    with httpx.Client(base_url=p.url, timeout=60) as c:
        assert [ichat(c, tok, ix).status_code for _ in range(3)] == [200] * 3
    assert metric(p, "ciris_proxy_interaction_windows_total", 'outcome="skipped"') == 1
    assert holds(cluster, user) == [("released", PRICE), ("captured", PRICE)]
    settled_and_reconciled(p, billing, cluster, api, {user: 100 - PRICE})

