"""Backup round trip against a moto S3 server and real PostgreSQL: dump, encrypt, upload, prune
by age, download, decrypt, restore into a fresh cluster; tampering and wrong keys fail loudly."""

from __future__ import annotations

import base64
import datetime as dt
import importlib.util
import json
import os
import sys

import boto3
import psycopg
import pytest
from moto.server import ThreadedMotoServer

from components import postgres_config as pgc
from tests.conftest import REPO
from tests.postgres.conftest import PASSWORDS, REPLICA_ADDR, init_primary, pg_bin

spec = importlib.util.spec_from_file_location("ciris_backup", REPO / "payloads" / "postgres" / "backup.py")
backup = sys.modules["ciris_backup"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(backup)

KEY = bytes(range(32))
NOW = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def store():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket="ciris-backups")
    yield backup.Store(client, "ciris-backups")
    server.stop()


@pytest.fixture(autouse=True)
def pg_tools_on_path(monkeypatch):
    monkeypatch.setenv("PATH", os.path.dirname(pg_bin("pg_dump")) + os.pathsep + os.environ["PATH"])


def dsn(cluster, db=pgc.DATABASE, user="postgres"):
    return cluster.conninfo(user=user, dbname=db)


def seed(cluster):
    with psycopg.connect(dsn(cluster, user=pgc.APP_ROLE), autocommit=True) as conn:
        conn.execute("CREATE TABLE credits (user_id text PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0))")
        conn.execute("INSERT INTO credits SELECT 'u' || g, g * 5 FROM generate_series(1, 500) g")


def contents(cluster):
    with psycopg.connect(dsn(cluster), autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('credits')").fetchone()[0] is None:
            return None
        return conn.execute("SELECT user_id, balance FROM credits ORDER BY user_id").fetchall()


def test_round_trip_prune_and_restore_into_a_fresh_cluster(single, store):
    root, tls, cluster = single
    seed(cluster)
    # Two old backups: one inside the 30-day retention, one past it.
    store.put(backup.backup_name(NOW - dt.timedelta(days=10)), b"x")
    store.put(backup.backup_name(NOW - dt.timedelta(days=31)), b"x")

    name, pruned = backup.run(store, dsn(cluster), KEY, retention_days=30, now=NOW)
    assert name == "ciris-20261122T030000Z.dump.enc"
    assert pruned == [backup.backup_name(NOW - dt.timedelta(days=31))]
    assert store.names() == [backup.backup_name(NOW - dt.timedelta(days=10)), name]
    blob = store.get(name)
    assert blob.startswith(backup.MAGIC) and b"u42" not in blob  # ciphertext only in the bucket

    fresh = init_primary(root, tls[REPLICA_ADDR], name="fresh", addr=REPLICA_ADDR, replicas=())
    try:
        backup.restore(store, name, KEY, dsn(fresh))
        assert contents(fresh) == contents(cluster) and len(contents(fresh)) == 500
    finally:
        fresh.stop("immediate")


@pytest.mark.parametrize("damage", ["tamper", "wrong_key", "truncate"])
def test_bad_backup_fails_loudly_and_restores_nothing(single, store, damage):
    root, tls, cluster = single
    seed(cluster)
    name, _ = backup.run(store, dsn(cluster), KEY, retention_days=30, now=NOW)
    key = KEY
    if damage == "tamper":
        blob = bytearray(store.get(name))
        blob[len(blob) // 2] ^= 0x01
        store.put(name, bytes(blob))
    elif damage == "truncate":
        store.put(name, store.get(name)[:20])
    else:
        key = bytes(32)
    fresh = init_primary(root, tls[REPLICA_ADDR], name="fresh", addr=REPLICA_ADDR, replicas=())
    try:
        with pytest.raises(backup.BackupError, match="wrong key or tampered|bad header"):
            backup.restore(store, name, key, dsn(fresh))
        assert contents(fresh) is None
    finally:
        fresh.stop("immediate")


def test_cli_reports_missing_settings_clearly(monkeypatch, capsys):
    for var in ("BACKUP_S3_ENDPOINT", "BACKUP_S3_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    assert backup.main(["list"]) == 1
    assert capsys.readouterr().err.strip() == "backup: BACKUP_S3_ENDPOINT is not set"


def test_status_records_the_newest_backup_in_the_bucket(single, store, tmp_path, monkeypatch):
    """`backup.py run` and `status` (every member's job, daily) write what pg_exporter.py serves as
    ciris_backup_last_success_timestamp_seconds: the newest backup, whichever member made it."""
    _, _, cluster = single
    seed(cluster)
    status = tmp_path / "status.json"
    # moto keeps its buckets for the whole process: a prefix of this test's own is an empty store.
    store = backup.Store(store.client, store.bucket, f"status-{tmp_path.name}/")
    monkeypatch.setenv("BACKUP_STATUS_FILE", str(status))
    for var, value in {"BACKUP_S3_ENDPOINT": store.client.meta.endpoint_url, "BACKUP_S3_BUCKET": store.bucket,
                       "BACKUP_PREFIX": store.prefix, "BACKUP_S3_ACCESS_KEY": "test", "BACKUP_S3_SECRET_KEY": "test"}.items():
        monkeypatch.setenv(var, value)
    assert backup.main(["status"]) == 0 and not status.exists()  # an empty bucket claims no backup
    backup.run(store, dsn(cluster), KEY, retention_days=30, now=NOW - dt.timedelta(days=1))
    store.put(backup.backup_name(NOW), b"x")  # another member's, newer
    assert backup.main(["status"]) == 0
    assert json.loads(status.read_text()) == {"newest": NOW.timestamp()}
    # `run` records it too, on success only.
    monkeypatch.setenv("DATABASE_URL", dsn(cluster))
    monkeypatch.setenv("BACKUP_ENCRYPTION_KEY", base64.b64encode(KEY).decode())
    assert backup.main(["run"]) == 0
    assert json.loads(status.read_text())["newest"] > NOW.timestamp()
    before = status.read_text()
    monkeypatch.setenv("DATABASE_URL", "host=127.0.0.1 port=1 dbname=nothing connect_timeout=2")
    assert backup.main(["run"]) == 1 and status.read_text() == before
