"""Commit throughput and latency of the billing database: commits/second and p50/p99 commit latency
at concurrency 1 and 32, (a) primary alone, (b) with the synchronous replica on loopback, both
configured by the project's renderers. A figure, not a test.

    .venv/bin/python -m bench.replication [--seconds 5]

(c) the transatlantic case (replica behind an emulated 90 ms round trip with ip netns + tc netem)
is not measured yet; expect every commit to take at least one round trip, about 90 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
import time

from components import postgres_config as pgc
from tests.postgres.conftest import PRIMARY_ADDR, init_primary, start_replica, workspace


def measure(cluster, concurrency: int, seconds: float) -> tuple[float, float, float]:
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench (id bigserial PRIMARY KEY, n int)")
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker():
        mine = []
        with cluster.connect(dbname=pgc.DATABASE) as conn:
            while time.monotonic() < stop:
                t = time.perf_counter()
                conn.execute("INSERT INTO bench (n) VALUES (1)")  # autocommit: one commit each
                mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q = statistics.quantiles(latencies, n=100)
    return len(latencies) / (time.monotonic() - start), q[49] * 1000, q[98] * 1000


def line(label: str, results: dict[int, tuple[float, float, float]]) -> str:
    return f"replication {label}: " + " | ".join(
        f"c={c} {r[0]:.0f} commits/s p50 {r[1]:.2f} ms p99 {r[2]:.2f} ms" for c, r in results.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    root, tls = workspace()
    primary = init_primary(root, tls[PRIMARY_ADDR], replicas=())
    try:
        alone = {c: measure(primary, c, args.seconds) for c in (1, 32)}
        primary.stop()
        shutil.rmtree(root)
        root, tls = workspace()
        primary = init_primary(root, tls[PRIMARY_ADDR])
        replica = start_replica(root, tls, primary)
        try:
            synced = {c: measure(primary, c, args.seconds) for c in (1, 32)}
        finally:
            replica.stop("immediate")
    finally:
        primary.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    print(line("(a) primary alone", alone))
    print(line("(b) sync replica on loopback", synced)
          + f" | sync/alone throughput c=1 {synced[1][0] / alone[1][0]:.2f}, c=32 {synced[32][0] / alone[32][0]:.2f}")
    print("replication (c) 90 ms round trip: not measured (needs ip netns + tc netem; see module docstring)")


if __name__ == "__main__":
    main()
