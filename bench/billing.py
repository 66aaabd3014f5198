"""Consumes/second and p50/p99 latency of the billing service at concurrency 1 and 32, next to the
raw ceiling: pgbench sending exactly the statement one consume sends (ledger.MOVE, prepared, as
psycopg prepares it), on the same database over the same TLS settings (the `billing` role,
verify-full), in the same run, in alternating slices (the machine is shared: other load falls on
both sides alike; the line shows the spread of the slices' ratios). Raw is one consume per
transaction, as a consume alone runs; the service commits the consumes that arrive together in one
transaction (batches.py, ADR 15), so under load it can pass that ceiling: the line gives how many
consumes shared a commit. Also the CPU each side spends per consume at the highest level. A figure,
not a test.

    .venv/bin/python -m bench.billing [--seconds 12] [--rounds 3] [--users 1000] [--workers 2] [--pool 20] [--levels 1 32]

Load comes from wrk (Debian package `wrk`; a C client, so the client costs little of the 2 cores
the service shares with it). Every request is a fresh debit of 1 cent from a random one of
`--users` users: its idempotency key carries a token unique to the wrk run, the thread and the
request (wrk's random numbers repeat from run to run; replays would flatter the service), and each
thread seeds its own user choice; the run fails unless the ledger gained a new row per request.
pgbench's keys carry a per-run token and its client id the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from tests.billing.conftest import KEY_PEM, Billing, database_url, token
from tests.conftest import require_binary
from tests.postgres.conftest import PRIMARY_ADDR, _ppid, as_postgres, free_port, init_primary, pg_bin, workspace

from billing import chain, ledger  # noqa: E402 (the payload's modules: tests.billing.conftest puts them on the path)

UID = "('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid"
KEY = "'pgb-' || :run || '-' || :client_id || '-' || :k"
REQ = chain.request_hash("consume", amount=1, description=None)  # the same body each time, as the service's

# The one statement a consume sends (ledger.consume: a 1-cent debit, no description).
PGBENCH_SCRIPT = f"""\\set n random(1, :users)
\\set k random(1, 9000000000000000000)
{ledger.MOVE % (UID, "'consume'", "-1", KEY, f"'{REQ}'", "NULL")};
"""

WRK_SCRIPT = """
local threads, run, counter = 0, "", 0
function setup(thread)  -- in the main state; `id` becomes a global of the thread's own state
  threads = threads + 1
  thread:set("id", threads)
end
function init(args)
  run = args[1]
  math.randomseed(tonumber(args[2]) + id * 7919)
end
function request()
  counter = counter + 1
  local n = math.random(1, USERS)
  local user = string.format("00000000-0000-0000-0000-%012d", n)
  local body = string.format('{"user_id":"%s","amount":1,"idempotency_key":"wrk-%s-%d-%d"}', user, run, id, counter)
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
    r = as_postgres([pg_bin("pgbench"), "-n", "-M", "prepared", "-f", str(script), "-D", f"users={users}",
                     "-D", f"run={secrets.token_hex(6)}", "-c", str(clients),
                     "-j", str(min(clients, 2)), "-T", str(int(seconds)), "-l", f"--log-prefix={logdir}/pgb", dsn], cwd=str(logdir))
    assert r.returncode == 0, r.stderr
    tps = float(re.search(r"tps = ([\d.]+)", r.stdout).group(1))
    latencies = [int(line.split()[2]) / 1000 for f in logdir.glob("pgb*") for line in f.read_text().splitlines()]
    q = statistics.quantiles(latencies, n=100)
    return tps, q[49], q[98]


def wrk(url: str, script: Path, clients: int, seconds: float, auth: str) -> tuple[float, float, float, int]:
    r = subprocess.run([require_binary("wrk"), "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{int(seconds)}s", "--latency",
                        "-s", str(script), "-H", f"Authorization: Bearer {auth}", "-H", "Content-Type: application/json", url,
                        "--", secrets.token_hex(6), str(secrets.randbelow(2**31))],
                       capture_output=True, text=True, timeout=seconds + 60)
    assert r.returncode == 0, r.stderr
    assert "Non-2xx" not in r.stdout, r.stdout
    ms = {p: _ms(re.search(rf"^\s+{p}%\s+(\S+)", r.stdout, re.M).group(1)) for p in ("50", "99")}
    requests = int(re.search(r"(\d+) requests in", r.stdout).group(1))
    return float(re.search(r"Requests/sec:\s+([\d.]+)", r.stdout).group(1)), ms["50"], ms["99"], requests


def combine(slices: list[tuple]) -> dict:
    """Equal-length slices: the mean rate, the median slice's p50, the worst slice's p99."""
    return {"rate": statistics.mean(s[0] for s in slices), "p50": statistics.median(s[1] for s in slices),
            "p99": max(s[2] for s in slices)}


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU of these processes, their live children, and their children that exited
    (backends of closed connections: counted in the root's cutime/cstime)."""
    children = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) in roots}
    total = 0
    for pid in {*roots, *children}:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if pid in roots else 0)
    return total / os.sysconf("SC_CLK_TCK")


def fresh_debits(dsn: str) -> tuple[int, int]:
    """The service's debits so far, and the transactions that wrote them (consumes that arrive
    together commit together: batches.py)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT xmin::text) FROM transactions WHERE idempotency_key LIKE 'wrk-%'").fetchone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12, help="per side and level, in --rounds slices")
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw/service slices per level")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (production runs 2)")
    parser.add_argument("--pool", type=int, default=None, help="DB_POOL_SIZE per worker (default: the service's)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 32], help="concurrency levels (the summary needs 32)")
    args = parser.parse_args()
    root, tls = workspace()
    cluster = init_primary(root, tls[PRIMARY_ADDR], replicas=())
    work = Path(tempfile.mkdtemp(prefix="ciris-bench-"))
    work.chmod(0o777)
    env = {**os.environ, "DATABASE_URL": database_url(cluster), "BILLING_JWT_PRIVATE_KEY": KEY_PEM,
           "HOST": "127.0.0.1", "PORT": str(free_port()), "WORKERS": str(args.workers),
           **({"DB_POOL_SIZE": str(args.pool)} if args.pool else {})}
    service = Billing(env, work / "billing.log")
    try:
        service.start()  # applies the migrations
        dsn = database_url(cluster)
        seed(dsn, args.users)
        (work / "consume.sql").write_text(PGBENCH_SCRIPT)
        (work / "consume.lua").write_text(f"USERS = {args.users}\n" + WRK_SCRIPT)
        os.chmod(work / "consume.sql", 0o644)
        auth = token("service", "bench")
        postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        raw, svc, cpu, per_commit = {}, {}, {}, {}
        slice_seconds = max(1, round(args.seconds / args.rounds))
        for c in args.levels:
            # Raw and service in alternating slices: the machine's other load falls on both alike.
            raw_slices, svc_slices, spent, debits, commits = [], [], [0.0, 0.0], 0, 0
            wrk(service.url, work / "consume.lua", c, 1, auth)  # warm-up: the pool grows to the level (pgbench connects outside its timing)
            for _ in range(args.rounds):
                raw_slices.append(pgbench(dsn, work / "consume.sql", args.users, c, slice_seconds, work))
                before = fresh_debits(dsn), cpu_seconds([service.proc.pid]), cpu_seconds([postmaster])
                svc_slices.append(wrk(service.url, work / "consume.lua", c, slice_seconds, auth))
                after = fresh_debits(dsn)
                fresh = after[0] - before[0][0]
                assert fresh >= svc_slices[-1][3], f"c={c}: {svc_slices[-1][3]} requests but {fresh} fresh debits (replayed keys?)"
                debits += fresh
                commits += after[1] - before[0][1]
                spent[0] += cpu_seconds([service.proc.pid]) - before[1]
                spent[1] += cpu_seconds([postmaster]) - before[2]
            raw[c], svc[c] = combine(raw_slices), combine(svc_slices)
            raw[c]["slice ratios"] = [s[0] / r[0] for s, r in zip(svc_slices, raw_slices)]
            cpu[c] = [seconds * 1000 / debits for seconds in spent]
            per_commit[c] = debits / commits
    finally:
        service.stop()
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    parts = [f"c={c} service {svc[c]['rate']:.0f}/s p50 {svc[c]['p50']:.2f} ms p99 {svc[c]['p99']:.2f} ms, "
             f"raw {raw[c]['rate']:.0f}/s p50 {raw[c]['p50']:.2f} ms p99 {raw[c]['p99']:.2f} ms, "
             f"service/raw {svc[c]['rate'] / raw[c]['rate']:.2f} (slices {min(raw[c]['slice ratios']):.2f}–{max(raw[c]['slice ratios']):.2f}), "
             f"{per_commit[c]:.1f} consumes per commit"
             for c in args.levels]
    c = max(args.levels)
    parts.append(f"CPU per consume at c={c}: service {cpu[c][0]:.2f} ms, postgres {cpu[c][1]:.2f} ms")
    pool = f", pool {args.pool}" if args.pool else ""
    print(f"billing consume ({args.workers} workers{pool}): " + " | ".join(parts))


if __name__ == "__main__":
    main()
