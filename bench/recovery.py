"""Both regions lost (ADR 24), timed: how long the restore from the bucket takes (RTO) and which
acknowledged writes it loses (RPO), for a stated database size. A figure, not a test.

    .venv/bin/python -m bench.recovery [--size-mb 200] [--rounds 2] [--write-seconds 20]

The drill's processes and restore path (tests/postgres/restoring.py, as test_restore.py uses it):
etcd + Patroni + PostgreSQL + pgBackRest in network namespaces, the rendered configs, WAL archived
to the S3 stand-in (moto behind TLS) with production's archive_timeout and asynchronous push. A
ledger-like table is filled to about --size-mb and a full backup taken; then each round commits a
small write every 0.2 s for --write-seconds (each commit's time recorded when it was acknowledged),
loses every host with its disks (data, etcd, pgBackRest's spool; the bucket survives) and
restores "latest" into a fresh cluster from the same config with the restore switch.

RTO: from starting the fresh cluster's first member until a write commits on it, then (separately)
until the second member, started then, streams synchronously. RPO: the acknowledged writes that did
not come back, and the time between the newest one that did and the last acknowledged one.
Rounds alternate: odd ones force a WAL switch and wait until the segment is in the bucket just
before the loss (`pgbackrest check`, as a clean shutdown or archive_timeout would), even ones lose
the host mid-segment, which is what a sudden loss does: the open segment was never archived, so up
to archive_timeout of writes (less on a busy database, whose 16 MB segments fill sooner) is gone.
Later rounds restore the same backup and replay the WAL of the rounds before (as production replays
up to a day's). The bucket is in this machine's memory: production adds the download over the
internet.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time

import psycopg

from components import postgres_config as pgc
from tests.postgres.ha import Cluster, Host
from tests.postgres.restoring import LEADER_WITHIN_S, patroni_exited, pgbackrest, restorable_cluster, sql

ROW_BYTES = 1000  # a ledger row with its payload, about what one takes on disk with its index entry
WRITE_PERIOD_S = 0.2


def fill(c: Cluster, h: Host, size_mb: int) -> None:
    """A ledger-like table (id, user, amount, time, a description) of about `size_mb` on disk."""
    sql(c, h, "CREATE TABLE ledger (id bigserial PRIMARY KEY, user_id bigint NOT NULL, amount bigint NOT NULL, "
              "at timestamptz NOT NULL DEFAULT now(), note text NOT NULL)")
    rows = size_mb * 1024 * 1024 // ROW_BYTES
    with psycopg.connect(c.dsn([h], target=None, connect_timeout=5), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = local")  # the fill is setup, not a measured write
        for start in range(0, rows, 50_000):
            conn.execute("INSERT INTO ledger (user_id, amount, note) SELECT g %% 1000, g, repeat(md5(g::text), 28) "
                         "FROM generate_series(%s::bigint, %s::bigint) g", (start, min(start + 50_000, rows) - 1))
    size = sql(c, h, "SELECT pg_database_size(current_database())")[0][0]
    print(f"# filled: {size / 2**20:.0f} MB database", file=sys.stderr, flush=True)


# Writes are known by their note, not their id: a restored sequence can hand out a lost write's id again.
_notes = itertools.count(1)


def acknowledged_writes(c: Cluster, h: Host, seconds: float) -> list[tuple[str, float]]:
    """Small commits for `seconds`: (note, wall-clock time the commit was acknowledged) each."""
    acked = []
    end = time.monotonic() + seconds
    with psycopg.connect(c.dsn([h], connect_timeout=5), autocommit=True) as conn:
        conn.execute("SET statement_timeout = '10s'")  # a hung commit ends the bench, not stalls it
        while time.monotonic() < end:
            note = f"ack {next(_notes)}"  # not hex: no fill row has it
            conn.execute("INSERT INTO ledger (user_id, amount, note) VALUES (1, -1, %s)", (note,))
            acked.append((note, time.time()))
            time.sleep(WRITE_PERIOD_S)
    return acked


def first_write(c: Cluster, h: Host, timeout: float) -> tuple[str, float]:
    """Until a write commits on `h` (it restored, recovered, promoted and accepts writes); its note and
    acknowledgement time."""
    note = f"ack {next(_notes)}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(c.dsn([h], connect_timeout=2), autocommit=True) as conn:
                # A commit as billing's (synchronous_mode is not strict: alone, the leader does not wait).
                conn.execute("SET statement_timeout = '3s'")
                conn.execute("INSERT INTO ledger (user_id, amount, note) VALUES (0, 0, %s)", (note,))
                return note, time.time()
        except psycopg.Error:
            pass
        if patroni_exited(h):
            raise RuntimeError(f"Patroni on {h.name} exited while restoring\n{c.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{h.name} not writable within {timeout:.0f} s\n{c.logs()}")
        time.sleep(0.2)


def streaming(c: Cluster, leader: Host, replica: Host, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while c.query(leader, "SELECT application_name, sync_state FROM pg_stat_replication") != [(replica.member, "sync")]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{replica.name} not streaming within {timeout:.0f} s\n{c.logs()}")
        time.sleep(0.2)


def round_(c: Cluster, n: int, switch: bool, write_seconds: float, earlier: list[tuple[str, float]],
           since: float) -> str:
    """One loss and restore. `earlier`: the acknowledged writes before this round (earlier rounds' and
    the first write on each restored cluster), appended to; `since`: the fill's last commit."""
    us, eu = c.by_name["us-east"], c.by_name["eu-west"]
    acked = acknowledged_writes(c, us, write_seconds)
    if switch:
        pgbackrest(us, "check")  # switches WAL and waits until the segment is in the bucket
    last_at = acked[-1][1]
    c.lose_everything()

    c.restore = "latest"
    c.rewrite_configs()
    t0 = time.monotonic()
    c.start(us)
    marker = first_write(c, us, LEADER_WITHIN_S)
    writable = time.monotonic() - t0
    c.start(eu)
    streaming(c, us, eu, 240)
    replica = time.monotonic() - t0 - writable

    everything = earlier + acked
    back = {r[0] for r in sql(c, us, "SELECT note FROM ledger WHERE note LIKE 'ack %%'")}
    lost = sum(note not in back for note, _ in acked)
    # RPO: from the newest acknowledged write that came back (of any round) to the last acknowledged.
    rpo = last_at - max([at for note, at in everything if note in back], default=since)
    earlier += acked + [marker]
    how = ("WAL switched and archived before the loss" if switch else
           f"lost mid-segment: up to archive_timeout {pgc.ARCHIVE_TIMEOUT_SECONDS} s")
    return (f"round {n}: restore to writable {writable:.0f} s (replica streaming +{replica:.0f} s), lost {lost} of "
            f"{len(acked):,} acknowledged writes (RPO {rpo:.0f} s: {how})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery")
    parser.add_argument("--size-mb", type=int, default=200, help="the ledger's size before the backup")
    parser.add_argument("--rounds", type=int, default=2, help="losses; odd ones switch WAL before the loss")
    parser.add_argument("--write-seconds", type=float, default=20, help="acknowledged writes before each loss")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("network namespaces need root")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log: one line per S3 call

    t0 = time.monotonic()
    lines = []
    with restorable_cluster(billing=False) as c:
        us = c.by_name["us-east"]
        c.start_all()
        leader = c.wait_healthy(timeout=180)
        assert leader is us, leader
        fill(c, us, args.size_mb)
        since = time.time()  # the fill's last commit: in the backup
        earlier: list[tuple[str, float]] = []
        pgbackrest(us, "stanza-create")
        b0 = time.monotonic()
        pgbackrest(us, "backup", "--type=full", timeout=900)
        print(f"# full backup {time.monotonic() - b0:.0f} s", file=sys.stderr, flush=True)
        for n in range(1, args.rounds + 1):
            line = round_(c, n, n % 2 == 1, args.write_seconds, earlier, since)
            lines.append(line)
            print(f"# {line}", file=sys.stderr, flush=True)
    print(f"recovery of a {args.size_mb} MB billing database from the bucket ({os.cpu_count()}-core machine, bucket local, "
          f"archive-async, archive_timeout {pgc.ARCHIVE_TIMEOUT_SECONDS} s): " + " | ".join(lines) +
          f" (bench {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
