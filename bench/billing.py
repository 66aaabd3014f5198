"""Consumes/second and p50/p99 latency of the billing service at concurrency 1 and 32, next to the
raw ceiling: pgbench running the same SQL statements a consume executes, on the same database
(TLS, the `billing` role), in the same run. A figure, not a test.

    .venv/bin/python -m bench.billing [--seconds 10] [--users 1000]

Load comes from wrk (Debian package `wrk`; a C client, so the client costs little of the 2 cores
the service shares with it); each request debits 1 cent from a random one of `--users` users with a
fresh idempotency key. pgbench picks users the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from components import postgres_config as pgc
from tests.billing.conftest import KEY_PEM, Billing, database_url, token
from tests.conftest import require_binary
from tests.postgres.conftest import PRIMARY_ADDR, as_postgres, free_port, init_primary, pg_bin, workspace

UID = "('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid"

# The statements of ledger.consume, in order (the hash is computed by the service in Python).
PGBENCH_SCRIPT = f"""\\set n random(1, :users)
\\set k random(1, 9000000000000000000)
BEGIN;
SELECT user_id, balance, settled, last_seq, last_hash FROM credit_balances WHERE user_id = {UID} FOR UPDATE \\gset
SELECT id, request_hash, available_after FROM transactions WHERE user_id = {UID} AND idempotency_key = 'pgb-' || :k;
INSERT INTO transactions (user_id, seq, type, amount, balance_after, available_after, idempotency_key, request_hash, description, ref, created_at, prev_hash, hash)
  VALUES ({UID}, :last_seq + 1, 'consume', -1, :settled - 1, :balance - 1, 'pgb-' || :k, md5(:k::text), NULL, NULL, now(), sha256(:k::text::bytea), sha256(:k::text::bytea)) RETURNING id;
UPDATE credit_balances SET balance = :balance - 1, settled = :settled - 1, last_seq = :last_seq + 1, last_hash = sha256(:k::text::bytea), updated_at = now() WHERE user_id = {UID};
END;
"""

WRK_SCRIPT = """
local counter, id = 0, 0
function setup(thread) thread:set("tid", math.random(1, 2^30)) end
function init(args) id = tid end
function request()
  counter = counter + 1
  local n = math.random(1, USERS)
  local user = string.format("00000000-0000-0000-0000-%012d", n)
  local body = string.format('{"user_id":"%s","amount":1,"idempotency_key":"wrk-%d-%d"}', user, id, counter)
  return wrk.format("POST", "/v1/credits/consume", nil, body)
end
"""


def seed(dsn: str, users: int) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO users (id, email) SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'bench' || g || '@example.org'
               FROM generate_series(1, %s) g""", (users,))
        conn.execute(
            """INSERT INTO credit_balances (user_id, balance, settled, last_seq, last_hash) SELECT id, 1000000000, 1000000000, 0, '\\x00'::bytea
               FROM users WHERE email LIKE 'bench%%'""")


def pgbench(dsn: str, script: Path, users: int, clients: int, seconds: float, logdir: Path) -> tuple[float, float, float]:
    for f in logdir.glob("pgb*"):
        f.unlink()
    r = as_postgres([pg_bin("pgbench"), "-n", "-M", "prepared", "-f", str(script), "-D", f"users={users}", "-c", str(clients),
                     "-j", str(min(clients, 2)), "-T", str(int(seconds)), "-l", f"--log-prefix={logdir}/pgb", dsn], cwd=str(logdir))
    assert r.returncode == 0, r.stderr
    tps = float(re.search(r"tps = ([\d.]+)", r.stdout).group(1))
    latencies = [int(line.split()[2]) / 1000 for f in logdir.glob("pgb*") for line in f.read_text().splitlines()]
    q = statistics.quantiles(latencies, n=100)
    return tps, q[49], q[98]


def wrk(url: str, script: Path, clients: int, seconds: float, auth: str) -> tuple[float, float, float]:
    r = subprocess.run([require_binary("wrk"), "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{int(seconds)}s", "--latency",
                        "-s", str(script), "-H", f"Authorization: Bearer {auth}", "-H", "Content-Type: application/json", url],
                       capture_output=True, text=True, timeout=seconds + 60)
    assert r.returncode == 0, r.stderr
    assert "Non-2xx" not in r.stdout, r.stdout
    ms = {p: _ms(re.search(rf"^\s+{p}%\s+(\S+)", r.stdout, re.M).group(1)) for p in ("50", "99")}
    return float(re.search(r"Requests/sec:\s+([\d.]+)", r.stdout).group(1)), ms["50"], ms["99"]


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (production runs 2)")
    args = parser.parse_args()
    root, tls = workspace()
    cluster = init_primary(root, tls[PRIMARY_ADDR], replicas=())
    work = Path(tempfile.mkdtemp(prefix="ciris-bench-"))
    work.chmod(0o777)
    env = {**os.environ, "DATABASE_URL": database_url(cluster), "BILLING_JWT_PRIVATE_KEY": KEY_PEM, "STRIPE_SECRET_KEY": "sk_test_bench",
           "STRIPE_WEBHOOK_SECRET": "whsec_bench", "HOST": "127.0.0.1", "PORT": str(free_port()),
           "WORKERS": str(args.workers)}
    service = Billing(env, work / "billing.log")
    try:
        service.start()  # applies the migrations
        dsn = database_url(cluster)
        seed(dsn, args.users)
        (work / "consume.sql").write_text(PGBENCH_SCRIPT)
        (work / "consume.lua").write_text(f"USERS = {args.users}\n" + WRK_SCRIPT)
        os.chmod(work / "consume.sql", 0o644)
        auth = token("service", "bench")
        raw = {c: pgbench(dsn, work / "consume.sql", args.users, c, args.seconds, work) for c in (1, 32)}
        svc = {c: wrk(service.url, work / "consume.lua", c, args.seconds, auth) for c in (1, 32)}
    finally:
        service.stop()
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    parts = [f"c={c} service {svc[c][0]:.0f}/s p50 {svc[c][1]:.2f} ms p99 {svc[c][2]:.2f} ms, raw {raw[c][0]:.0f}/s "
             f"p50 {raw[c][1]:.2f} ms p99 {raw[c][2]:.2f} ms, service/raw {svc[c][0] / raw[c][0]:.2f}" for c in (1, 32)]
    print("billing consume: " + " | ".join(parts))


if __name__ == "__main__":
    main()
