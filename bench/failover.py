"""What a user sees while a region dies: the fault drill of tests/postgres/test_failover.py run as a
benchmark (etcd + Patroni + PostgreSQL on three hosts in network namespaces, clients writing once
per second), one line per scenario, then what the HA engine costs in commit throughput. A figure,
not a test.

    .venv/bin/python -m bench.failover [--window 90] [--seconds 5] [--only "primary killed"]

Per scenario: the time until consumes through billing (one per second through each region's
billing, beside its member) resumed, the longest one during the fault, acknowledged writes lost
(must be 0; direct writes to each member count too) and the share of the consumes that succeeded
over `--window` seconds from the fault (the dead region's billing included: it answers nothing). Then commits/s at concurrency 1 and
32 on the Patroni leader with its synchronous standby, beside the hand-made pair of
bench/replication (b) measured in the same run: the engine must not cost throughput. The drill's
timers are the fast ones of tests/postgres/drill.py (CIRIS_DRILL_* to change them); production's
are components/postgres_config.HaTiming's defaults (about twice as long).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import psycopg

from bench.replication import measure
from components import postgres_config as pgc
from tests.postgres import drill
from tests.postgres.conftest import PRIMARY_ADDR, init_primary, start_replica, workspace
from tests.postgres.ha import Cluster


class _Leader:
    """bench.replication.measure()'s view of the Patroni leader: connect(dbname=...)."""

    def __init__(self, cluster: Cluster, leader):
        self.cluster, self.leader = cluster, leader

    def connect(self, dbname: str = pgc.DATABASE) -> psycopg.Connection:
        return psycopg.connect(self.cluster.dsn([self.leader], user="postgres", dbname=dbname), autocommit=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.failover")
    parser.add_argument("--window", type=float, default=90, help="seconds from the fault over which writes are counted")
    parser.add_argument("--seconds", type=float, default=5, help="per throughput figure")
    parser.add_argument("--only", action="append", help="run only the named scenario(s)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ciris-ha-bench-"))
    root.chmod(0o755)
    ha, dcs = drill.timing()
    cluster = Cluster(root, ha, dcs, billing_key_pem=drill.billing_key())
    lines = []
    try:
        cluster.create()
        cluster.start_all()
        drill.prepare(cluster)
        leader = cluster.wait_healthy()
        engine = {c: measure(_Leader(cluster, leader), c, args.seconds) for c in (1, 32)}
        for scenario in drill.SCENARIOS:
            if args.only and scenario.name not in args.only:
                continue
            t0 = time.monotonic()
            result = drill.run(cluster, scenario, fault_seconds=args.window / 2, window=args.window)
            lines.append(result.line() + f" (drill {time.monotonic() - t0:.0f} s)")
            print(lines[-1], flush=True)
    finally:
        cluster.stop()
        cluster.teardown_network()
        shutil.rmtree(root, ignore_errors=True)

    # The hand-made synchronous pair of bench/replication (b), on loopback, same run.
    root, tls = workspace()
    primary = init_primary(root, tls[PRIMARY_ADDR])
    replica = start_replica(root, tls, primary)
    try:
        pair = {c: measure(primary, c, args.seconds) for c in (1, 32)}
    finally:
        replica.stop("immediate")
        primary.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    figures = " | ".join(f"c={c} {engine[c][0]:.0f} commits/s p50 {engine[c][1]:.2f} ms (pair {pair[c][0]:.0f}/s, "
                         f"patroni/pair {engine[c][0] / pair[c][0]:.2f})" for c in (1, 32))
    print(f"failover: {len(lines)} scenarios, {sum(' lost 0,' not in x for x in lines)} with lost writes | "
          f"sync commits under Patroni: {figures}")


if __name__ == "__main__":
    main()
