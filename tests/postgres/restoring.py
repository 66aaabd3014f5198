"""The both-regions-lost setup shared by tests/postgres/test_restore.py and bench/recovery.py: two
members in network namespaces (tests/postgres/ha.py) archiving their WAL to the S3 stand-in (moto
behind Caddy's TLS, as in test_pitr), and pgBackRest run on a member as its server runs it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import boto3
import psycopg
from moto.server import ThreadedMotoServer

from components import postgres_config as pgc
from tests.postgres import drill
from tests.postgres.conftest import free_port, make_ca
from tests.postgres.ha import CLIENT_ADDR, Cluster, Host
from tests.postgres.test_pitr import tls_front

BUCKET = "ciris-bridge-backups"
ARCHIVE_ENV = {"PGBACKREST_REPO1_S3_KEY": "test", "PGBACKREST_REPO1_S3_KEY_SECRET": "test",
               "PGBACKREST_REPO1_CIPHER_PASS": "cipher-pass-for-tests"}
LEADER_WITHIN_S = 240  # a restore from the bucket, then recovery to the target, then promotion


@contextlib.contextmanager
def restorable_cluster(billing: bool = True) -> Iterator[Cluster]:
    """us-east and eu-west archiving to an HTTPS moto bucket reachable from their namespaces; etcd on
    us-east only (so us-east is the member that creates -- or restores -- the cluster). Not started.
    `billing`: a signing key, so billing can run beside each member."""
    root = Path(tempfile.mkdtemp(prefix="ciris-restore-"))
    root.chmod(0o755)
    ha, dcs = drill.timing()
    c = Cluster(root, ha, dcs, names=("us-east", "eu-west"), consensus_on=("us-east",), archive_env=ARCHIVE_ENV,
                billing_key_pem=drill.billing_key() if billing else None)
    server = front = None
    try:
        c.create()
        (root / "s3").mkdir()
        s3_ca, certs = make_ca(root / "s3", addrs=(CLIENT_ADDR,))
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        port = free_port()
        front = tls_front(root / "s3", port, server.get_host_and_port()[1], *certs[CLIENT_ADDR], addr=CLIENT_ADDR)
        boto3.client("s3", endpoint_url=f"https://{CLIENT_ADDR}:{port}", verify=str(s3_ca), aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="fsn1").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "fsn1"})
        for h in c.hosts:
            (h.dir / "pgbackrest.conf").write_text(pgc.pgbackrest_conf(
                endpoint=f"https://{CLIENT_ADDR}:{port}", bucket=BUCKET, region="fsn1", retention_days=30,
                pg_path=str(h.dir / "data"), socket_dir=str(h.dir / "sock"), ca_file=str(s3_ca),
                spool_path=str(h.dir / "pgbackrest-spool")))
        for p in [root / "s3", *(root / "s3").rglob("*"), *(h.dir / "pgbackrest.conf" for h in c.hosts)]:
            shutil.chown(p, "postgres", "postgres")
        yield c
    finally:
        c.stop()
        c.teardown_network()
        if front:
            front.terminate()
            front.wait(10)
        if server:
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{server.get_host_and_port()[1]}/moto-api/reset", method="POST"))
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def pgbackrest(h: Host, *args: str, timeout: float = 180) -> str:
    """pgBackRest on `h`, as its member's server runs it; its output, or a failure that shows it."""
    cmd = h.exec("pgbackrest", f"--config={h.dir / 'pgbackrest.conf'}", f"--stanza={pgc.STANZA}", *args)
    for _ in range(30):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ARCHIVE_ENV})
        # 50: the stanza's lock, held by the asynchronous archive-push while it pushes (stanza-create
        # takes it too); the push ends in seconds.
        if r.returncode != 50:
            break
        time.sleep(1)
    assert r.returncode == 0, f"pgbackrest {' '.join(args)} on {h.name} exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r.stdout


def sql(c: Cluster, h: Host, query: str, params=()) -> list[tuple]:
    """`query` on `h` as the billing app (the leader for writes), failing with the member's logs."""
    try:
        with psycopg.connect(c.dsn([h], target=None, connect_timeout=5), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []
    except psycopg.Error as e:
        raise AssertionError(f"{query!r} on {h.name}: {e}\n{c.logs()}") from None


def patroni_exited(h: Host) -> bool:
    # A failed bootstrap is fatal to Patroni (production's container restarts and tries again).
    return any(p.poll() is not None for p in h.procs if "patroni" in p.args)


def wait_leader(c: Cluster, h: Host, timeout: float = LEADER_WITHIN_S) -> None:
    """Until `h` is the running primary holding the lock (a restore ends with a promotion)."""
    deadline = time.monotonic() + timeout
    while c.leader() is not h:
        if patroni_exited(h):
            raise AssertionError(f"Patroni on {h.name} exited while creating the cluster\n{c.logs()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{h.name} did not lead within {timeout:.0f} s (Patroni: {h.api()})\n{c.logs()}")
        time.sleep(1)
