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

import psycopg

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
                    conn_box[0].cancel()
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


def prepare(cluster: Cluster) -> None:
    leader = cluster.wait_healthy()
    with psycopg.connect(cluster.dsn([leader]), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS drill (id bigint PRIMARY KEY, writer text NOT NULL, "
                      "at timestamptz NOT NULL DEFAULT now())")


@dataclass
class Result:
    scenario: str
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
    writers = [Writer("multi", cluster.dsn(db_hosts))]
    writers += [Writer(f"direct-{h.name}", cluster.dsn([h], target=None)) for h in db_hosts]
    for w in writers:
        w.start()
    time.sleep(settle)
    t_fault = time.monotonic()
    scenario.fault(cluster, primary, replica)
    resumed = None
    while time.monotonic() - t_fault < max(fault_seconds, 0) or resumed is None:
        resumed = _resumed(writers[0], t_fault)
        if time.monotonic() - t_fault > 60:
            break
        time.sleep(0.5)
    scenario.heal(cluster, primary, replica)
    try:
        leader = cluster.wait_healthy()
    finally:
        time.sleep(max(settle, (t_fault + window - time.monotonic()) if window else 0))
        for w in writers:
            w.stop()
    acked = [a.id for w in writers for a in w.attempts if a.acked]
    with psycopg.connect(cluster.dsn([leader]), autocommit=True) as conn:
        present = {r[0] for r in conn.execute("SELECT id FROM drill WHERE id = ANY(%s)", (acked,))}
    during = [a for a in writers[0].attempts if a.started >= t_fault - 1]
    window_attempts = [a for a in writers[0].attempts if t_fault <= a.started < t_fault + (window or 1e9)]
    return Result(
        scenario.name,
        _resumed(writers[0], t_fault),
        max((a.latency for a in during), default=0.0),
        sorted(set(acked) - present),
        sum(a.acked for a in window_attempts) / max(1, len(window_attempts)),
        [a for w in writers for a in w.attempts],
    )


def _resumed(writer: Writer, t_fault: float) -> float | None:
    ok = [a.started + a.latency for a in writer.attempts if a.acked and a.started >= t_fault]
    return min(ok) - t_fault if ok else None
