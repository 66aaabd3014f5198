"""The fault drill shared by tests/postgres/test_failover.py and bench/failover.py: one fault on a
running cluster (tests/postgres/ha.py) while clients write once per second, then the heal.

Writers: one through the multi-host DSN (what billing uses: every member, read-write target) and
one straight to each database member ("both sides"), each INSERTing a fresh id per attempt with a
client-side deadline. A write counts as acknowledged only when its COMMIT returned before the
deadline: a COMMIT whose wait for the synchronous standby was cancelled also "succeeds" (with a
WARNING), but it may not have reached the standby, so it is never counted.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
import jwt
import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from components import consensus, postgres_config as pgc
from tests.postgres.ha import Cluster, Host

_ids = itertools.count(int(time.time() * 1000) % 10**9 * 1000)


def timing() -> tuple[pgc.HaTiming, consensus.Timing]:
    """Fast timers for the drill; each can be set from the environment (CIRIS_DRILL_TTL...)."""
    env = lambda k, d: int(os.environ.get(f"CIRIS_DRILL_{k}", d))  # noqa: E731
    return (pgc.HaTiming(ttl=env("TTL", 10), loop_wait=env("LOOP_WAIT", 2), retry_timeout=env("RETRY_TIMEOUT", 3),
                         sender_timeout_s=env("SENDER_TIMEOUT", 4)),
            consensus.Timing(heartbeat_ms=env("HEARTBEAT_MS", 100), election_ms=env("ELECTION_MS", 1000)))


@dataclass
class Attempt:
    writer: str
    started: float
    id: int
    acked: bool
    latency: float
    error: str = ""


@dataclass
class Writer:
    """One write per `period` seconds to `dsn`, each with its own deadline."""
    name: str
    dsn: str
    deadline: float = 5.0
    period: float = 1.0
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _conn: psycopg.Connection | None = None

    def start(self) -> "Writer":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.deadline + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            threading.Thread(target=self._attempt, args=(t0,), daemon=True).start()
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t0)))

    def _attempt(self, t0: float) -> None:
        wid = next(_ids)
        timed_out = threading.Event()
        conn_box: list[psycopg.Connection] = []

        def expire() -> None:
            timed_out.set()
            if conn_box:
                try:
                    # Never conn.cancel(): libpq's PQcancel blocks on a frozen server while holding
                    # the GIL, which froze the whole test process (primary frozen, "hung" 14 min).
                    # cancel_safe is non-blocking (libpq >= 17, which psycopg's binary ships) and bounded.
                    if psycopg.pq.version() >= 170000:
                        conn_box[0].cancel_safe(timeout=2)
                except Exception:
                    pass

        timer = threading.Timer(self.deadline, expire)
        timer.start()
        error = ""
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn_box.append(conn)
                if not timed_out.is_set():
                    conn.execute("INSERT INTO drill (id, writer) VALUES (%s, %s)", (wid, self.name))
        except Exception as e:  # every failure is a refused write; what matters is what was acknowledged
            error = type(e).__name__
        finally:
            timer.cancel()
        acked = not error and not timed_out.is_set()
        self.attempts.append(Attempt(self.name, t0, wid, acked, time.monotonic() - t0, error))


@dataclass
class BillingWriter(Writer):
    """One consume per `period` through a billing service (payloads/billing): acknowledged only by
    a 200 answer before the deadline. `dsn` is billing's URL; `id` is the idempotency key's number."""
    user: str = ""
    token: str = ""

    def _attempt(self, t0: float) -> None:
        wid = next(_ids)
        error = ""
        try:
            r = httpx.post(f"{self.dsn}/v1/credits/consume", timeout=self.deadline,
                           headers={"Authorization": f"Bearer {self.token}"},
                           json={"user_id": self.user, "amount": 1, "idempotency_key": f"drill-{wid}"})
            if r.status_code != 200:
                error = f"{r.status_code} {r.json().get('error', {}).get('code', '') if r.headers.get('content-type', '').startswith('application/json') else ''}"
        except httpx.HTTPError as e:
            error = type(e).__name__
        self.attempts.append(Attempt(self.name, t0, wid, not error, time.monotonic() - t0, error))


def token(key_pem: str, role: str, sub: str) -> str:
    now = int(time.time())
    claims = {"sub": sub, "role": role, "iss": "ciris-billing", "aud": "ciris-bridge", "iat": now, "exp": now + 3600}
    return jwt.encode(claims, serialization.load_pem_private_key(key_pem.encode(), None), algorithm="EdDSA")


def billing_key() -> str:
    return Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()).decode()


def prepare(cluster: Cluster) -> None:
    leader = cluster.wait_healthy()
    with psycopg.connect(cluster.dsn([leader]), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS drill (id bigint PRIMARY KEY, writer text NOT NULL, "
                      "at timestamptz NOT NULL DEFAULT now())")
    if cluster.billing_key_pem:
        first, *others = [h for h in cluster.hosts if h.database]
        cluster.start_billing(first)  # it applies the migrations; then the others
        cluster.wait_billing_on(first)
        for h in others:
            cluster.start_billing(h)
        cluster.wait_billing()
        admin = {"Authorization": f"Bearer {token(cluster.billing_key_pem, 'admin', 'drill')}"}
        r = httpx.post(f"{cluster.billing_url(first)}/v1/users", json={"email": "drill@example.org"}, headers=admin, timeout=30)
        assert r.status_code == 201, r.text
        cluster.drill_user = r.json()["id"]
        r = httpx.post(f"{cluster.billing_url(first)}/v1/credits/grant", headers=admin, timeout=30,
                       json={"user_id": cluster.drill_user, "amount": 1_000_000, "idempotency_key": "drill", "reason": "drill"})
        assert r.status_code == 200, r.text


@dataclass
class Result:
    scenario: str
    stale: list[str]  # balances answered by a billing beside a member that was no longer primary
    resumed_after: float | None  # seconds from the fault to the first acknowledged write started after it
    longest_write: float
    lost: list[int]
    success_share: float
    attempts: list[Attempt]

    def line(self) -> str:
        resumed = f"{self.resumed_after:.1f}s" if self.resumed_after is not None else "never"
        return (f"{self.scenario}: writes resumed {resumed}, longest write {self.longest_write:.1f}s, "
                f"lost {len(self.lost)}, ok {self.success_share:.0%}")


@dataclass
class Scenario:
    name: str
    fault: Callable[[Cluster, Host, Host], None]  # (cluster, primary, replica)
    heal: Callable[[Cluster, Host, Host], None]


def _restart(c: Cluster, h: Host) -> None:
    c.start(h)


def _witness(c: Cluster) -> Host:
    return c.by_name["witness"]


def _cut_link(a: Host, b: Host, on: bool) -> None:
    from tests.postgres.ha import sh

    for x, y in ((a, b), (b, a)):
        for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
            sh("ip", "netns", "exec", x.ns, "iptables", "-A" if on else "-D", chain, flag, y.addr, "-j", "DROP")


SCENARIOS = [
    Scenario("primary killed", lambda c, p, r: p.kill(), lambda c, p, r: _restart(c, p)),
    Scenario("primary frozen", lambda c, p, r: p.freeze(), lambda c, p, r: p.thaw()),
    Scenario("primary cut off", lambda c, p, r: p.cut(), lambda c, p, r: p.reconnect()),
    Scenario("replica killed", lambda c, p, r: r.kill(), lambda c, p, r: _restart(c, r)),
    Scenario("replica cut off", lambda c, p, r: r.cut(), lambda c, p, r: r.reconnect()),
    Scenario("witness killed", lambda c, p, r: _witness(c).kill(), lambda c, p, r: _restart(c, _witness(c))),
    # Every etcd member gone at once: Patroni's failsafe mode keeps the primary writing.
    Scenario("consensus lost", lambda c, p, r: [h.kill_etcd() for h in c.consensus],
             lambda c, p, r: [c.start_etcd(h) for h in c.consensus]),
    Scenario("primary-replica link cut", lambda c, p, r: _cut_link(p, r, True), lambda c, p, r: _cut_link(p, r, False)),
]


def run(cluster: Cluster, scenario: Scenario, *, fault_seconds: float = 25, settle: float = 3,
        window: float | None = None) -> Result:
    """Writers on; the fault; it lasts `fault_seconds` (longer if writes have not resumed yet, up to
    60 s); the heal; writers off once the pair is synchronous again (and, with `window`, not before
    that many seconds from the fault: the share of successful writes is over the window). Then
    every acknowledged write must be on the leader."""
    primary = cluster.wait_healthy()
    replica = cluster.replica_of(primary)
    db_hosts = [h for h in cluster.hosts if h.database]
    if cluster.billing_key_pem:  # the user's view: a consume through each region's billing
        service = token(cluster.billing_key_pem, "service", "proxy")
        writers = [BillingWriter(f"billing-{h.name}", cluster.billing_url(h), deadline=6, user=cluster.drill_user,
                                 token=service) for h in db_hosts]
    else:
        writers = [Writer("multi", cluster.dsn(db_hosts))]
    writers += [Writer(f"direct-{h.name}", cluster.dsn([h], target=None)) for h in db_hosts]
    users = [w for w in writers if not w.name.startswith("direct-")]
    for w in writers:
        w.start()
    time.sleep(settle)
    t_fault = time.monotonic()
    try:  # the heal always runs, whatever happens during the fault (a host is never left frozen or cut off)
        scenario.fault(cluster, primary, replica)
        resumed = None
        while time.monotonic() - t_fault < max(fault_seconds, 0) or resumed is None:
            resumed = _resumed(users, t_fault)
            if time.monotonic() - t_fault > 60:
                break
            time.sleep(0.5)
    finally:
        scenario.heal(cluster, primary, replica)
    try:
        stale = _stale_reads(cluster, db_hosts) if cluster.billing_key_pem else []
        leader = cluster.wait_healthy()
        if cluster.billing_key_pem:
            cluster.wait_billing()
    finally:
        time.sleep(max(settle, (t_fault + window - time.monotonic()) if window else 0))
        for w in writers:
            w.stop()
    acked = [a.id for w in writers if w.name.startswith("direct-") or not cluster.billing_key_pem
             for a in w.attempts if a.acked]
    consumed = [f"drill-{a.id}" for w in users if isinstance(w, BillingWriter) for a in w.attempts if a.acked]
    with psycopg.connect(cluster.dsn([leader]), autocommit=True) as conn:
        present = {r[0] for r in conn.execute("SELECT id FROM drill WHERE id = ANY(%s)", (acked,))}
        present |= {int(r[0].removeprefix("drill-")) for r in conn.execute(
            "SELECT idempotency_key FROM transactions WHERE idempotency_key = ANY(%s)", (consumed,))} if consumed else set()
    acked += [int(k.removeprefix("drill-")) for k in consumed]
    mine = [a for w in users for a in w.attempts]
    during = [a for a in mine if a.started >= t_fault - 1]
    window_attempts = [a for a in mine if t_fault <= a.started < t_fault + (window or 1e9)]
    return Result(
        scenario.name,
        stale,
        _resumed(users, t_fault),
        max((a.latency for a in during), default=0.0),
        sorted(set(acked) - present),
        sum(a.acked for a in window_attempts) / max(1, len(window_attempts)),
        [a for w in writers for a in w.attempts],
    )


def _stale_reads(cluster: Cluster, hosts: list[Host], seconds: float = 5) -> list[str]:
    """Right after the heal (a thawed or reconnected old primary is back), read the drill user's
    balance through every billing, again and again: an answer must never be higher than the
    balance the leader had just before it was asked (consumes only lower it)."""
    service = {"Authorization": f"Bearer {token(cluster.billing_key_pem, 'service', 'proxy')}"}
    stale, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        leader = cluster.leader()
        truth = cluster.query(leader, f"SELECT balance FROM balances WHERE user_id = '{cluster.drill_user}'",
                              dbname=pgc.DATABASE) if leader else None
        for h in hosts:
            try:
                r = httpx.get(f"{cluster.billing_url(h)}/v1/credits/{cluster.drill_user}", headers=service, timeout=2)
            except httpx.HTTPError:
                continue
            if r.status_code == 200 and truth and r.json()["balance"] > truth[0][0]:
                stale.append(f"{h.name}: {r.json()['balance']} > {truth[0][0]}")
        time.sleep(0.2)
    return stale


def _resumed(writers: list[Writer], t_fault: float) -> float | None:
    ok = [a.started + a.latency for w in writers for a in w.attempts if a.acked and a.started >= t_fault]
    return min(ok) - t_fault if ok else None
