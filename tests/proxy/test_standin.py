"""Paid inference while billing cannot write (issue #14): stand-in authorisation within the caps,
then every answered call charged exactly once and every failed one charged nothing, across a real
billing stopped, frozen (SIGSTOP) or refusing writes (its database read-only), a hold TTL passing
in between, and a proxy killed (SIGKILL) and restarted. Real billing and PostgreSQL, a real proxy,
the fake upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time

import httpx
import pytest

from components import postgres_config as pgc
from tests.billing.conftest import Billing, run
from tests.postgres.conftest import free_port
from tests.proxy.conftest import (
    MODEL, PAYLOAD, PROXY_PYTHON, Proxy, balance, chat, new_user, proxy_env, total_requests, user_token,
)

PRICE = 5
USER_CAP, INSTANCE_CAP, TTL = 20, 50, 5  # 4 calls per user, 10 per proxy, holds expire in 5 s


@pytest.fixture
def own_billing(billing, tmp_path):
    """A billing process of our own (same database) that the test may stop, freeze or restart."""
    b = Billing({**billing.env, "PORT": str(free_port()), "WORKERS": "1"}, tmp_path / "billing.log")
    b.start()
    yield b
    if b.proc.poll() is None:
        os.kill(b.proc.pid, signal.SIGCONT)
    b.stop()


@pytest.fixture
def standin_proxy(own_billing, upstreams, tmp_path):
    env = {**proxy_env(own_billing.url, upstreams, tmp_path / "journal" / "captures.jsonl"),
           "HOLD_TTL_SECONDS": str(TTL), "STANDIN_USER_CAP_CENTS": str(USER_CAP),
           "STANDIN_INSTANCE_CAP_CENTS": str(INSTANCE_CAP), "HOLD_PLACEMENT_TIMEOUT_MS": "1000"}
    p = Proxy(env, tmp_path / "proxy.log")
    p.start()
    yield p
    p.stop()


def metric(proxy: Proxy, name: str, labels: str = "") -> float:
    text = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + labels + '}' if labels else '')} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def burst(proxy: Proxy, tokens: list[str], **extra) -> list[int]:
    """One call per token, all at once; `extra`: more of the request body (an interaction's metadata)."""
    async def go():
        async with httpx.AsyncClient(base_url=proxy.url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {t}"})
                                        for t in tokens))
            return [r.status_code for r in rs]

    return run(go())


def until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def settled_and_reconciled(proxy: Proxy, billing, cluster, api, expected: dict[str, int]) -> None:
    """Once the proxy owes nothing: every balance is what the answered calls cost, no hold is left
    active, the ledger verifies and reconciliation names no call."""
    until(lambda: all(metric(proxy, "ciris_proxy_owed", f'kind="{k}"') == 0 for k in ("capture", "advice", "release")),
          60, "the proxy's journal to be settled")
    assert metric(proxy, "ciris_proxy_standin_exposure_cents") == 0
    assert {u: balance(api, u) for u in expected} == expected
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        active = conn.execute("SELECT count(*) FROM holds WHERE user_id = ANY(%s::uuid[]) AND status = 'active'",
                              (list(expected),)).fetchone()[0]
        negative = conn.execute("SELECT count(*) FROM credit_balances WHERE balance < 0 OR settled < 0").fetchone()[0]
    assert (active, negative) == (0, 0)
    verify = billing.run("verify-ledger")
    assert verify.returncode == 0, verify.stderr
    rec = subprocess.run([PROXY_PYTHON, "-m", "ciris_proxy", "reconcile"], cwd=PAYLOAD, env=proxy.env,
                         capture_output=True, text=True, timeout=60)
    assert rec.returncode == 0 and " 0 problems" in rec.stdout, rec.stdout + rec.stderr


def test_billing_stopped_past_the_hold_ttl_and_the_proxy_killed(standin_proxy, own_billing, api, cluster, upstreams):
    p = standin_proxy
    users = [new_user(api, 100) for _ in range(4)]
    poor, fresh, late = new_user(api, 8), new_user(api, 100), new_user(api, 100)
    tokens = {u: user_token(u) for u in [*users, poor, fresh, late]}
    spent = dict.fromkeys([*users, poor, fresh, late], 0)
    with httpx.Client(base_url=p.url, timeout=60) as c:
        for u in [*users, poor, late]:  # billing vouches for their balances
            assert chat(c, tokens[u]).status_code == 200
            spent[u] += PRICE
    until(lambda: metric(p, "ciris_proxy_owed", 'kind="capture"') == 0, 20, "the first captures")

    # Calls answered while billing goes away: their captures wait in the journal past the hold TTL.
    for u in upstreams.values():
        u.control(accept_delay=2.0)

    # (A third caller leaves before any answer, after the provider had its prompt: it pays too.)
    async def in_flight():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        auth = {"Authorization": f"Bearer {tokens[late]}"}
        async with httpx.AsyncClient(base_url=p.url, timeout=60) as ac, httpx.AsyncClient(base_url=p.url, timeout=1.5) as leaves:
            tasks = [asyncio.ensure_future(ac.post("/v1/chat/completions", json=body, headers=auth)) for _ in range(2)]
            left = asyncio.ensure_future(leaves.post("/v1/chat/completions", json=body, headers=auth))
            await asyncio.sleep(1.0)
            own_billing.stop()  # the holds are placed; billing leaves before the captures and the release
            with pytest.raises(httpx.ReadTimeout):
                await left
            return [(await t).status_code for t in tasks]

    assert run(in_flight()) == [200, 200]
    spent[late] += 3 * PRICE
    assert metric(p, "ciris_proxy_owed", 'kind="capture"') == 3
    for u in upstreams.values():
        u.control(reset=True)

    # Billing is gone: users it vouched for are stood in, exactly within the caps. One user's
    # burst meets the per-user cap; the others' burst then meets the per-proxy cap.
    per_user, per_proxy = USER_CAP // PRICE, INSTANCE_CAP // PRICE
    before = total_requests(upstreams)
    first = burst(p, [tokens[users[0]]] * 8)
    assert sorted(first) == [200] * per_user + [503] * (8 - per_user), first
    rest = burst(p, [tokens[u] for u in users[1:] for _ in range(8)])
    assert rest.count(200) == per_proxy - per_user and rest.count(503) == len(rest) - rest.count(200), rest
    assert total_requests(upstreams) - before == per_proxy  # nothing upstream beyond the caps
    with httpx.Client(base_url=p.url, timeout=60) as c:
        r = chat(c, tokens[fresh])  # billing never vouched for this one
        assert r.status_code == 503 and "nothing charged" in r.text
        assert chat(c, tokens[poor]).status_code == 503  # 3 cents known: less than a call
        assert c.get("/ready").json() == {"status": "degraded: stand-in"}
    assert metric(p, "ciris_proxy_standin_active") == 1
    assert metric(p, "ciris_proxy_standin_exposure_cents") == INSTANCE_CAP
    assert metric(p, "ciris_proxy_owed", 'kind="advice"') == per_proxy
    assert metric(p, "ciris_proxy_standin_total", 'outcome="authorised"') == per_proxy
    assert metric(p, "ciris_proxy_standin_total", 'outcome="over_user_cap"') >= 8 - per_user + 1  # + the poor user
    assert metric(p, "ciris_proxy_standin_total", 'outcome="over_instance_cap"') >= 1
    assert metric(p, "ciris_proxy_standin_total", 'outcome="no_recent_balance"') == 1
    answered = [first.count(200)] + [rest[i * 8:(i + 1) * 8].count(200) for i in range(3)]
    assert all(n <= per_user for n in answered)
    for u, n in zip(users, answered):
        spent[u] += PRICE * n

    # The proxy dies with everything owed; its successor replays the journal.
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(10)
    time.sleep(TTL + 1)  # every hold placed before the outage has expired
    p.start()
    assert metric(p, "ciris_proxy_standin_exposure_cents") == INSTANCE_CAP
    own_billing.start()
    settled_and_reconciled(p, own_billing, cluster, api, {u: (8 if u == poor else 100) - s for u, s in spent.items()})
    assert metric(p, "ciris_proxy_standin_active") == 0
    with httpx.Client(base_url=p.url, timeout=60) as c:
        assert c.get("/ready").json() == {"status": "ready"}


@contextlib.contextmanager
def billing_fault(fault: str, billing, cluster):
    """Billing frozen (SIGSTOP: requests hang), or its database refusing every write."""
    def read_only(on: bool):
        with cluster.connect() as conn:
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on" if on else
                         "ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")

    if fault == "frozen":
        os.kill(billing.proc.pid, signal.SIGSTOP)
    else:
        read_only(True)
    try:
        yield
    finally:
        if fault == "frozen":
            os.kill(billing.proc.pid, signal.SIGCONT)
        else:
            read_only(False)


@pytest.mark.parametrize("fault", ["frozen", "read_only"])
def test_billing_frozen_or_unable_to_write(fault, standin_proxy, own_billing, api, cluster, upstreams):
    p = standin_proxy
    users = [new_user(api, 100) for _ in range(3)]
    tokens = [user_token(u) for u in users]
    with httpx.Client(base_url=p.url, timeout=60) as c:
        for t in tokens:
            assert chat(c, t).status_code == 200
    until(lambda: metric(p, "ciris_proxy_owed", 'kind="capture"') == 0, 20, "the first captures")
    with billing_fault(fault, own_billing, cluster):
        started = time.monotonic()
        codes = burst(p, [t for t in tokens for _ in range(3)])
        took = time.monotonic() - started
        # One call fails upstream: stood in, not answered, so never charged.
        for u in upstreams.values():
            u.control(fail=True)
        with httpx.Client(base_url=p.url, timeout=60) as c:
            failed = chat(c, tokens[0])
        for u in upstreams.values():
            u.control(reset=True)
    assert codes == [200] * 9, codes
    assert took < 15, f"stand-in answers took {took:.1f} s"  # each waited at most the 1 s placement budget
    assert failed.status_code != 200 and "nothing was charged" in failed.text
    settled_and_reconciled(p, own_billing, cluster, api, {u: 100 - 4 * PRICE for u in users})


def test_the_stand_in_state_clears_when_billing_returns_without_another_paid_call(standin_proxy, own_billing, api):
    """An outage in which every paid call was refused (no recent balance) leaves nothing owed: the
    proxy still notices billing is back, so ciris_proxy_standin_active (and the ProxyStandIn alert)
    does not stay up until the next paid call."""
    user = new_user(api, 15)
    own_billing.stop()
    with httpx.Client(base_url=standin_proxy.url, timeout=60) as c:
        r = chat(c, user_token(user))
    assert r.status_code == 503 and "nothing charged" in r.text
    assert metric(standin_proxy, "ciris_proxy_standin_active") == 1
    assert sum(metric(standin_proxy, "ciris_proxy_owed", f'kind="{k}"') for k in ("capture", "advice", "release")) == 0
    own_billing.start()
    until(lambda: metric(standin_proxy, "ciris_proxy_standin_active") == 0, 15, "the stand-in state to clear")
