"""Commit throughput and latency of the billing database: commits/second and p50/p99 commit latency
at concurrency 1 and 32, (a) primary alone, (b) with the synchronous replica on loopback, (c) with
the replica behind an emulated 90 ms round trip (the transatlantic link), all configured by the
project's renderers. A figure, not a test.

    .venv/bin/python -m bench.replication [--seconds 5] [--rtt-ms 90]

(c) uses a userspace relay that holds every chunk for half the round trip in each direction: this
machine's kernel has no sch_netem (`tc qdisc add ... netem` answers "Specified qdisc kind is
unknown"), so `ip netns` + `tc netem` cannot emulate the link here. The relay adds latency only,
not bandwidth limits or loss, which is what synchronous commit waits on.
"""

from __future__ import annotations

import argparse
import asyncio
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


class DelayRelay:
    """TCP relay on `host`:random port to `host`:`port`, delaying each direction by `one_way` s
    (pipelined: a chunk leaves one_way after it arrived, in order). TLS passes through untouched."""

    def __init__(self, host: str, port: int, one_way: float):
        self.host, self.target, self.one_way = host, port, one_way
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, self.host, 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((self.loop.time() + self.one_way, data))
        finally:
            queue.put_nowait(None)
            await sender


def line(label: str, results: dict[int, tuple[float, float, float]]) -> str:
    return f"replication {label}: " + " | ".join(
        f"c={c} {r[0]:.0f} commits/s p50 {r[1]:.2f} ms p99 {r[2]:.2f} ms" for c, r in results.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rtt-ms", type=float, default=90)
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
        primary.stop("immediate")
        shutil.rmtree(root)
        root, tls = workspace()
        primary = init_primary(root, tls[PRIMARY_ADDR])
        relay = DelayRelay(PRIMARY_ADDR, primary.port, args.rtt_ms / 2000)
        replica = start_replica(root, tls, primary, via_port=relay.port)
        try:
            far = {c: measure(primary, c, max(args.seconds, 10)) for c in (1, 32)}
        finally:
            replica.stop("immediate")
    finally:
        primary.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    print(line("(a) primary alone", alone))
    print(line("(b) sync replica on loopback", synced)
          + f" | sync/alone throughput c=1 {synced[1][0] / alone[1][0]:.2f}, c=32 {synced[32][0] / alone[32][0]:.2f}")
    print(line(f"(c) sync replica behind {args.rtt_ms:.0f} ms round trip", far)
          + f" | p50/rtt c=1 {far[1][1] / args.rtt_ms:.2f} | far/alone throughput c=1 {far[1][0] / alone[1][0]:.4f}, c=32 {far[32][0] / alone[32][0]:.3f}")


if __name__ == "__main__":
    main()
