"""WAL archiving and point-in-time recovery with pgBackRest, configured by the project's renderers,
against a moto S3 server behind TLS (pgBackRest speaks only HTTPS to S3) and real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import boto3
import psycopg
import pytest
from moto.server import ThreadedMotoServer

from components import postgres_config as pgc
from tests.conftest import require_binary
from tests.postgres.conftest import PRIMARY_ADDR, Cluster, as_postgres, free_port, init_primary, make_ca, pg_bin, workspace

S3_ADDR = "127.0.0.1"
BUCKET = "ciris-bridge-backups"
CANARY = "pitr-canary-7f3a"


def tls_front(root, port: int, backend: int, cert, key, addr: str = S3_ADDR) -> subprocess.Popen:
    """Caddy terminating TLS in front of moto (pgBackRest speaks only HTTPS to S3; moto's own TLS
    closes connections without close_notify, which OpenSSL 3 reports as a truncated reply)."""
    caddyfile = root / "s3.Caddyfile"
    caddyfile.write_text(
        "{\n  admin off\n  auto_https off\n}\n"
        f"https://{addr}:{port} {{\n  tls {cert} {key}\n  reverse_proxy 127.0.0.1:{backend}\n}}\n"
    )
    env = {**os.environ, "HOME": str(root), "XDG_DATA_HOME": str(root / "caddy-data"), "XDG_CONFIG_HOME": str(root / "caddy-config")}
    proc = subprocess.Popen([require_binary("caddy"), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(root / "caddy.err", "wb"))
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (root / "caddy.err").read_text()[-2000:]
            time.sleep(0.1)


@pytest.fixture
def archived():
    """A primary archiving its WAL through the rendered archive_command to an HTTPS moto bucket."""
    require_binary("pgbackrest")
    root, tls = workspace()
    (root / "s3").mkdir()
    ca_file, certs = make_ca(root / "s3", addrs=(S3_ADDR,))
    crt, key = certs[S3_ADDR]
    server = ThreadedMotoServer(ip_address=S3_ADDR, port=0, verbose=False)
    server.start()
    port = free_port()
    front = tls_front(root, port, server.get_host_and_port()[1], crt, key)
    s3 = boto3.client(
        "s3", endpoint_url=f"https://{S3_ADDR}:{port}", verify=str(ca_file),
        aws_access_key_id="test", aws_secret_access_key="test", region_name="fsn1",
    )
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "fsn1"})
    conf = root / "pgbackrest.conf"
    spool = root / "pgbackrest-spool"
    spool.mkdir()
    env = {
        **os.environ,
        "PGBACKREST_REPO1_S3_KEY": "test",
        "PGBACKREST_REPO1_S3_KEY_SECRET": "test",
        "PGBACKREST_REPO1_CIPHER_PASS": "cipher-pass-for-tests",
    }
    cluster = init_primary(root, tls[PRIMARY_ADDR], replicas=(), archive_config=str(conf), env=env)
    rendered = pgc.pgbackrest_conf(
        endpoint=f"https://{S3_ADDR}:{port}", bucket=BUCKET, region="fsn1", retention_days=30,
        pg_path=str(cluster.data), socket_dir=str(cluster.socket_dir), pg_port=cluster.port,
        ca_file=str(ca_file), spool_path=str(spool),
    )
    conf.write_text(rendered)
    if os.geteuid() == 0:
        for p in [root, *root.rglob("*")]:
            shutil.chown(p, "postgres", "postgres")

    def pgbackrest(*args, env=env):
        return as_postgres(["pgbackrest", f"--config={conf}", f"--stanza={pgc.STANZA}", *args], env=env)

    yield root, tls, cluster, pgbackrest, s3
    cluster.stop("immediate")
    front.terminate()
    front.wait(10)
    urllib.request.urlopen(urllib.request.Request(f"http://{S3_ADDR}:{server.get_host_and_port()[1]}/moto-api/reset", method="POST"))
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def rows(conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT note FROM ledger ORDER BY id")]


def test_point_in_time_recovery_from_archived_wal(archived):
    root, tls, cluster, pgbackrest, s3 = archived
    r = pgbackrest("stanza-create")
    assert r.returncode == 0, r.stdout + r.stderr
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        conn.execute("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)")
        conn.execute("INSERT INTO ledger (note) VALUES ('before the backup')")
    r = pgbackrest("backup", "--type=full")
    assert r.returncode == 0, r.stdout + r.stderr
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        conn.execute(f"INSERT INTO ledger (note) VALUES ('after the backup {CANARY}')")
        conn.execute("SELECT pg_create_restore_point('before-the-mistake')")
        conn.execute("INSERT INTO ledger (note) VALUES ('the mistake')")
    # `check` switches WAL and waits until the segment is in the repository: archive_command works.
    r = pgbackrest("check")
    assert r.returncode == 0, r.stdout + r.stderr
    cluster.stop()

    restored = Cluster(root, "restored", PRIMARY_ADDR, cluster.port, cluster.tls, cluster.env)
    if os.geteuid() == 0:
        shutil.chown(restored.socket_dir, "postgres", "postgres")
    r = pgbackrest(f"--pg1-path={restored.data}", "restore", "--type=name", "--target=before-the-mistake", "--target-action=promote")
    assert r.returncode == 0, r.stdout + r.stderr
    # The restored copy keeps the original's settings (ciris.conf); only the socket directory moves.
    conf = (restored.data / "ciris.conf").read_text().replace(str(cluster.socket_dir), str(restored.socket_dir))
    (restored.data / "ciris.conf").write_text(conf)
    restored.start()
    try:
        with restored.connect(dbname=pgc.DATABASE) as conn:
            assert rows(conn) == ["before the backup", f"after the backup {CANARY}"]
    finally:
        restored.stop("immediate")


def test_archiving_that_fails_for_a_while_keeps_wal_within_its_budget_and_writes_go_on(archived):
    """The bucket unreachable (ADR 22): WAL waiting to be archived stays within the queue budget
    (pgBackRest drops it from the archive and says so) instead of growing until the disk is full,
    and every write commits meanwhile. Without the budget the waiting WAL would grow by a segment per
    switch below."""
    root, tls, cluster, pgbackrest, s3 = archived
    assert pgbackrest("stanza-create").returncode == 0
    conf = root / "pgbackrest.conf"
    unreachable = pgc.pgbackrest_conf(
        endpoint=f"https://{S3_ADDR}:{free_port()}", bucket=BUCKET, region="fsn1", retention_days=30,
        pg_path=str(cluster.data), socket_dir=str(cluster.socket_dir), pg_port=cluster.port,
        spool_path=str(root / "pgbackrest-spool"), queue_max_mb=48,  # three 16 MB segments
    )
    # Each attempt gives up after seconds, not production's minute, to keep the test short; the
    # drop does not depend on it (a new push drops the queue once it is over the budget).
    conf.write_text(unreachable.replace("[global]\n", "[global]\nio-timeout=2\narchive-timeout=4\n"))
    status = cluster.data / "pg_wal" / "archive_status"
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        conn.autocommit = True
        conn.execute("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)")
        for i in range(12):
            conn.execute("INSERT INTO ledger (note) VALUES (%s)", (f"written while the bucket is away {i}",))
            conn.execute("SELECT pg_switch_wal()")
            time.sleep(1)
        assert conn.execute("SELECT count(*) FROM ledger").fetchone()[0] == 12
    deadline = time.time() + 90
    while True:
        waiting = len(list(status.glob("*.ready")))
        dropped = "because archive queue exceeded" in cluster.log.read_text()
        if dropped and waiting <= 3:  # the budget: three segments
            break
        assert time.time() < deadline, f"{waiting} segments wait to be archived (dropped: {dropped})"
        time.sleep(1)


def test_repository_is_encrypted_and_wrong_passphrase_reads_nothing(archived):
    root, tls, cluster, pgbackrest, s3 = archived
    assert pgbackrest("stanza-create").returncode == 0
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        # Incompressible, so a plain copy would carry the canary verbatim.
        conn.execute(f"CREATE TABLE t AS SELECT '{CANARY}' || md5(g::text) AS note FROM generate_series(1, 1000) g")
    assert pgbackrest("check").returncode == 0
    assert pgbackrest("backup", "--type=full").returncode == 0
    assert "status: ok" in pgbackrest("info").stdout
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any("/archive/" in k for k in objects) and any("/backup/" in k for k in objects)
    for k in objects:  # only ciphertext in the bucket
        assert CANARY.encode() not in s3.get_object(Bucket=BUCKET, Key=k)["Body"].read(), k
    wrong = {**cluster.env, "PGBACKREST_REPO1_CIPHER_PASS": "not-the-passphrase"}
    r = pgbackrest("info", env=wrong)
    assert "status: ok" not in r.stdout and "unable to load info file" in r.stdout


def test_rendered_config_keeps_thirty_days_and_needs_https():
    conf = pgc.pgbackrest_conf(
        endpoint="https://fsn1.your-objectstorage.com", bucket="b", region="fsn1", retention_days=30,
        pg_path="/var/lib/postgresql/data", socket_dir="/var/run/postgresql",
    )
    assert "repo1-s3-endpoint=fsn1.your-objectstorage.com\n" in conf
    assert "repo1-retention-full-type=time\nrepo1-retention-full=30\n" in conf
    assert "repo1-cipher-type=aes-256-cbc\n" in conf
    assert "s3-key" not in conf and "cipher-pass" not in conf  # secrets come from the environment only
    with pytest.raises(ValueError, match="http://minio:9000"):
        pgc.pgbackrest_conf(endpoint="http://minio:9000", bucket="b", region="r", retention_days=30, pg_path="/d", socket_dir="/s")
    primary = pgc.postgresql_conf(role="primary", replicas=[], tls=pgc.Tls("c", "k", "ca"), archive_config="/run/p.conf")
    assert "archive_mode = on\n" in primary
    assert "archive_command = 'pgbackrest --config=/run/p.conf --stanza=ciris archive-push %p'\n" in primary
