"""pg_exporter.py (the database alerts' series) as the postgres image runs it: the postgres user,
psql over each member's unix socket, config from components/postgres_config.exporter_conf, against
a real primary with a real synchronous replica."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from components import postgres_config as pgc
from tests.conftest import REPO
from tests.postgres.conftest import PRIMARY_ADDR, free_port, init_primary, pg_bin, workspace

EXPORTER = REPO / "payloads" / "postgres" / "pg_exporter.py"


class Exporter:
    """pg_exporter.py for one cluster, on a loopback port, as the postgres user."""

    def __init__(self, cluster, others=("eu-west",), backup_status: Path | None = None):
        self.port = free_port()
        self.backup_status = backup_status or cluster.root / f"{cluster.name}-backup-status.json"
        conf = cluster.root / f"{cluster.name}-exporter.json"
        conf.write_text(pgc.exporter_conf(list(others), socket_dir=str(cluster.socket_dir), pg_port=cluster.port,
                                          port=self.port, listen="127.0.0.1", backup_status=str(self.backup_status)))
        cmd = ["/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3", str(EXPORTER), str(conf)]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        env = {**os.environ, "PATH": os.path.dirname(pg_bin("psql")) + os.pathsep + os.environ["PATH"]}
        self.log = cluster.root / f"{cluster.name}-exporter.log"
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while True:
            try:
                self.scrape()
                return
            except httpx.TransportError:
                assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()
                time.sleep(0.1)

    def scrape(self) -> dict[str, float]:
        """Each sample as `name` or `name{member}` -> value."""
        r = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=15)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return {s.name + (f"{{{s.labels['member']}}}" if "member" in s.labels else ""): s.value
                for f in text_string_to_metric_families(r.text) for s in f.samples}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def exporters(pair):
    primary, replica = pair
    on = [Exporter(primary), Exporter(replica, others=("us-east",))]
    yield primary, replica, *on
    for e in on:
        e.stop()


def test_the_primary_reports_replication_and_the_replica_says_it_is_one(exporters):
    primary, replica, on_primary, on_replica = exporters
    got = on_primary.scrape()
    assert got["ciris_pg_up"] == 1 and got["ciris_pg_is_primary"] == 1
    assert got["ciris_pg_replicas_expected"] == 1 and got["ciris_pg_replicas_streaming"] == 1
    assert got["ciris_pg_sync_standbys"] == 1
    assert 0 <= got["ciris_pg_replication_lag_seconds{eu_west}"] < 10 and got["ciris_pg_replication_lag_bytes{eu_west}"] >= 0
    # No archiving configured here: never archived, never failed.
    assert got["ciris_pg_archiver_last_archived_timestamp_seconds"] == 0 == got["ciris_pg_archiver_last_failed_timestamp_seconds"]
    # The same verdict as replication_health() on the same query.
    with primary.connect() as conn:
        assert pgc.replication_health(conn.execute(pgc.REPLICATION_STATUS_SQL).fetchall(), ["eu-west"])[0] == "ok"
    there = on_replica.scrape()
    assert there["ciris_pg_up"] == 1 and there["ciris_pg_is_primary"] == 0
    assert not [k for k in there if k.startswith(("ciris_pg_replica", "ciris_pg_sync", "ciris_pg_archiver"))], there
    assert "ciris_backup_last_success_timestamp_seconds" not in there  # no backup status written yet
    # Every member: its WAL and the budget it may hold (max_slot_wal_keep_size, rendered: ADR 22).
    for scraped in (got, there):
        assert scraped["ciris_pg_wal_budget_bytes"] == pgc.wal_budget_mb(0) * 1024 * 1024
        assert 16 * 1024 * 1024 <= scraped["ciris_pg_wal_bytes"] < scraped["ciris_pg_wal_budget_bytes"]


def test_a_stopped_replica_drops_streaming_and_sync(exporters):
    primary, replica, on_primary, _ = exporters
    replica.stop()
    deadline = time.time() + 30
    while (got := on_primary.scrape())["ciris_pg_replicas_streaming"] != 0:
        assert time.time() < deadline, got
        time.sleep(0.3)
    assert got["ciris_pg_replicas_expected"] == 1 and got["ciris_pg_sync_standbys"] == 0
    assert "ciris_pg_replication_lag_seconds{eu_west}" not in got
    with primary.connect() as conn:
        assert pgc.replication_health(conn.execute(pgc.REPLICATION_STATUS_SQL).fetchall(), ["eu-west"])[0] == "critical"
    replica.start()
    deadline = time.time() + 30
    while (got := on_primary.scrape())["ciris_pg_sync_standbys"] != 1:
        assert time.time() < deadline, got
        time.sleep(0.3)
    assert got["ciris_pg_replicas_streaming"] == 1


def test_a_promoted_replica_reports_as_the_primary(exporters):
    primary, replica, on_primary, on_replica = exporters
    primary.stop("immediate")
    replica.promote()
    got = on_replica.scrape()
    assert got["ciris_pg_is_primary"] == 1 and got["ciris_pg_replicas_expected"] == 1
    assert got["ciris_pg_replicas_streaming"] == 0 and got["ciris_pg_sync_standbys"] == 0
    assert on_primary.scrape() == {"ciris_pg_up": 0}


def test_a_stopped_server_is_down_and_reports_nothing_else(exporters):
    primary, replica, on_primary, on_replica = exporters
    on_primary.backup_status.write_text(json.dumps({"newest": 1_790_000_000.0}))
    replica.stop("immediate")
    primary.stop("immediate")
    got = on_primary.scrape()
    assert got == {"ciris_pg_up": 0, "ciris_backup_last_success_timestamp_seconds": 1_790_000_000.0}, got
    assert on_replica.scrape() == {"ciris_pg_up": 0}
    primary.start()
    assert on_primary.scrape()["ciris_pg_is_primary"] == 1


def test_failing_wal_archiving_shows_as_a_newer_failure():
    """archive_command pointing at a pgBackRest config that is not there: every archive attempt fails."""
    root, tls = workspace()
    cluster = init_primary(root, tls[PRIMARY_ADDR], replicas=(), archive_config=str(root / "missing-pgbackrest.conf"))
    exporter = Exporter(cluster, others=())
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE TABLE t AS SELECT 1 AS x")
            conn.execute("SELECT pg_switch_wal()")
        deadline = time.time() + 30
        while (got := exporter.scrape())["ciris_pg_archiver_last_failed_timestamp_seconds"] == 0:
            assert time.time() < deadline, got
            time.sleep(0.5)
        assert got["ciris_pg_archiver_last_failed_timestamp_seconds"] > got["ciris_pg_archiver_last_archived_timestamp_seconds"]
        assert time.time() - 60 < got["ciris_pg_archiver_last_failed_timestamp_seconds"] <= time.time() + 1
        # No replicas expected: nothing to stream, nothing broken.
        assert got["ciris_pg_replicas_expected"] == 0 == got["ciris_pg_replicas_streaming"]
    finally:
        exporter.stop()
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def test_exporter_config_names_the_other_members_as_replicas():
    conf = json.loads(pgc.exporter_conf(["eu-west", "ap-south"]))
    assert conf["replicas"] == ["eu_west", "ap_south"] and conf["port"] == pgc.EXPORTER_PORT == 9187
    assert conf["replication_sql"] == pgc.REPLICATION_STATUS_SQL.strip()
    assert conf["socket_dir"] == "/var/run/postgresql" and conf["backup_status"].startswith("/var/run/postgresql/")
