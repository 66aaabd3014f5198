"""Queries/second and p50/p99 latency of a local PowerDNS answering the rendered staging zones:
plain records, then a health-checked (LUA ifurlup) record. A figure, not a test.

    .venv/bin/python -m bench.dns_qps [--queries 20000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.message
import dns.rcode

from tests.dns.conftest import Server, free_port
from tests.dns.test_pdns import Health, Z1, Z2, render, wait_for


def load(port: int, name: str, queries: int, concurrency: int) -> tuple[float, float, float]:
    wire = dns.message.make_query(name, "A").to_wire()
    per_worker = queries // concurrency
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(_):
        mine = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
            for _ in range(per_worker):
                t = time.perf_counter()
                s.send(wire)
                reply = dns.message.from_wire(s.recv(4096))
                mine.append(time.perf_counter() - t)
                assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return len(latencies) / elapsed, q[49] * 1000, q[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    port = free_port()
    health = [Health("127.0.0.2", port), Health("127.0.0.3", port)]
    for h in health:
        h.start()
    zones_yaml = f"zones:\n  {Z1}:\n    - {{name: api, type: A, health_check: 'http://api.{Z1}:{port}/health'}}\n  {Z2}: []\n"
    server = Server(Path(tempfile.mkdtemp(prefix="dns-bench-")), health_interval=5)
    try:
        server.sync(render(zones_yaml, {"us-east": ("127.0.0.2", "::1"), "eu-west": ("127.0.0.3", "::1")}))
        wait_for(server, f"api.{Z1}", {"127.0.0.2", "127.0.0.3"})
        load(server.port, f"billing1.{Z1}", 2000, args.concurrency)  # warm-up
        plain = load(server.port, f"billing1.{Z1}", args.queries, args.concurrency)
        lua = load(server.port, f"api.{Z1}", args.queries, args.concurrency)
    finally:
        server.stop()
        for h in health:
            h.stop()
    print(
        f"dns_qps: concurrency {args.concurrency}, {args.queries} queries each | "
        f"plain {plain[0]:.0f} q/s p50 {plain[1]:.3f} ms p99 {plain[2]:.3f} ms | "
        f"health-checked {lua[0]:.0f} q/s p50 {lua[1]:.3f} ms p99 {lua[2]:.3f} ms | "
        f"health-checked/plain {lua[0] / plain[0]:.2f}"
    )


if __name__ == "__main__":
    main()
