"""ReplicatedPostgres on real PostgreSQL: synchronous, TLS-only, peer-only, and no acknowledged
commit lost when the primary dies."""

from __future__ import annotations

import subprocess
import threading
import time

import psycopg
import pytest

from components import postgres_config as pgc
from tests.postgres.conftest import PASSWORDS, as_postgres, pg_bin


def test_replica_is_synchronous_and_named(pair):
    primary, replica = pair
    with primary.connect() as conn:
        rows = conn.execute("SELECT application_name, sync_state, ssl FROM pg_stat_replication "
                            "JOIN pg_stat_ssl USING (pid)").fetchall()
    assert rows == [("eu_west", "sync", True)]


def test_committed_row_is_on_the_replica_which_refuses_writes(pair):
    primary, replica = pair
    with primary.connect() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    with replica.connect() as conn:
        # synchronous_commit=on waits for the replica's flush, not its replay: allow replay a moment.
        deadline = time.time() + 10
        while conn.execute("SELECT to_regclass('t') IS NOT NULL AND EXISTS (SELECT 1 FROM t WHERE id = 1)").fetchone()[0] is not True:
            assert time.time() < deadline
            time.sleep(0.1)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO t VALUES (2)")


def test_commit_waits_for_the_replica(pair):
    primary, replica = pair
    with primary.connect() as conn:
        conn.execute("CREATE TABLE w (id int)")
    replica.stop()
    done = threading.Event()

    def commit():
        with primary.connect() as conn:
            conn.execute("INSERT INTO w VALUES (1)")
        done.set()

    threading.Thread(target=commit, daemon=True).start()
    assert not done.wait(3), "commit returned while the synchronous replica was down"
    replica.start()
    assert done.wait(30), "commit did not complete once the replica was back"


def test_non_tls_connections_are_refused(pair):
    primary, _ = pair
    with pytest.raises(psycopg.OperationalError, match="no encryption|pg_hba.conf"):
        psycopg.connect(primary.conninfo(sslmode="disable"))
    with pytest.raises(psycopg.OperationalError, match="no encryption|pg_hba.conf"):
        psycopg.connect(primary.conninfo(user=pgc.APP_ROLE, dbname=pgc.DATABASE, sslmode="disable"))
    with psycopg.connect(primary.conninfo(user=pgc.APP_ROLE, dbname=pgc.DATABASE)) as ok:
        assert ok.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_replication_from_an_unlisted_address_is_refused(pair):
    primary, _ = pair
    # Peers listed: only 127.0.0.3 -- our clients arrive from 127.0.0.1, so they are not a peer.
    (primary.data / "pg_hba.conf").write_text(pgc.pg_hba(peers=["127.0.0.3/32"], app_cidrs=[]) + "hostssl all postgres 127.0.0.1/32 scram-sha-256\n")
    with primary.connect() as conn:
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    result = subprocess.run(
        [pg_bin("psql"), primary.conninfo(user=pgc.REPLICATION_ROLE, replication="true"), "-c", "IDENTIFY_SYSTEM"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert 'no pg_hba.conf entry for replication connection from host "127.0.0.1"' in result.stderr
    # and the app role cannot open a replication connection from anywhere
    assert "replication" not in pgc.pg_hba(peers=[], app_cidrs=["10.0.0.0/8"]).split("local all postgres peer")[1]


def test_no_acknowledged_commit_is_lost_when_the_primary_is_killed(pair):
    primary, replica = pair
    with primary.connect() as conn:
        conn.execute("CREATE TABLE ledger (n int PRIMARY KEY)")
    acked: list[int] = []
    stop = threading.Event()

    def writer():
        try:
            with primary.connect() as conn:
                n = 0
                while not stop.is_set():
                    n += 1
                    conn.execute("INSERT INTO ledger VALUES (%s)", (n,))
                    acked.append(n)  # the commit returned: acknowledged to the client
        except psycopg.Error:
            pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    while len(acked) < 200:
        time.sleep(0.01)
    primary.kill9()
    t.join(15)
    stop.set()
    replica.promote()
    with replica.connect() as conn:
        present = {n for (n,) in conn.execute("SELECT n FROM ledger")}
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    assert len(acked) >= 200
    missing = set(acked) - present
    assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {sorted(missing)[:5]}"


def test_replication_health_query_follows_the_fsd_thresholds(pair):
    primary, replica = pair
    with primary.connect() as conn:
        severity, message = pgc.replication_health(conn.execute(pgc.REPLICATION_STATUS_SQL).fetchall(), ["eu-west"])
    assert severity == "ok" and message.startswith("1 replica(s) streaming"), message
    replica.stop()
    with primary.connect() as conn:
        deadline = time.time() + 10
        while (rows := conn.execute(pgc.REPLICATION_STATUS_SQL).fetchall()) and time.time() < deadline:
            time.sleep(0.2)
        assert pgc.replication_health(rows, ["eu-west"]) == ("critical", "replication broken: eu_west not connected")


@pytest.mark.parametrize(
    "rows,expected",
    [
        ([("eu_west", "streaming", "sync", 12.5, 4096)], "warning"),
        ([("eu_west", "streaming", "sync", 9.9, 4096)], "ok"),
        ([("eu_west", "catchup", "sync", 0.0, 0)], "critical"),
        ([("eu_west", "streaming", "async", 0.0, 0)], "critical"),
    ],
)
def test_replication_health_classification(rows, expected):
    assert pgc.replication_health(rows, ["eu-west"])[0] == expected
