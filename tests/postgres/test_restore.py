"""Both regions lost (issue #25, ADR 24): the whole billing database restored into a fresh cluster
from the bucket, by the restore switch in the rendered Patroni config (components/postgres_config.py:
restore_bootstrap), on real etcd + Patroni + PostgreSQL + pgBackRest in network namespaces
(tests/postgres/ha.py) against the S3 stand-in behind TLS the PITR tests use.

The drill: a cluster archives its WAL (billing migrated it and granted a user credits), takes a
backup, rows are written around a recorded moment;
then every host is lost with its data and etcd's (the bucket survives). A new cluster started from
the same rendered config with `restore` set to that moment has exactly the rows written before it,
keeps the old system id (the stanza still matches), billing starts on it without migrating again
and its ledger verifies, a second member clones it, and new writes are
archived into the same stanza. Then the same again with "latest" (everything archived, on the
restored cluster's timeline)."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
import psycopg
import pytest
import yaml
from moto.server import ThreadedMotoServer

from components import postgres_config as pgc
from tests.conftest import require_binary
from tests.postgres import drill
from tests.postgres.conftest import free_port, make_ca
from tests.postgres.ha import CLIENT_ADDR, Cluster, Host
from tests.postgres.test_pitr import tls_front

BUCKET = "ciris-bridge-backups"
ARCHIVE_ENV = {"PGBACKREST_REPO1_S3_KEY": "test", "PGBACKREST_REPO1_S3_KEY_SECRET": "test",
               "PGBACKREST_REPO1_CIPHER_PASS": "cipher-pass-for-tests"}
LEADER_WITHIN_S = 240  # a restore from the bucket, then recovery to the target, then promotion


@pytest.fixture
def restorable():
    """us-east and eu-west archiving to an HTTPS moto bucket reachable from their namespaces; etcd on
    us-east only (so us-east is the member that creates -- or restores -- the cluster)."""
    for binary in ("etcd", "patroni", "ip", "pgbackrest", "caddy"):
        require_binary(binary)
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root") if os.environ.get("CI") != "true" else pytest.fail("needs root")
    root = Path(tempfile.mkdtemp(prefix="ciris-restore-"))
    root.chmod(0o755)
    ha, dcs = drill.timing()
    c = Cluster(root, ha, dcs, names=("us-east", "eu-west"), consensus_on=("us-east",), archive_env=ARCHIVE_ENV,
                billing_key_pem=drill.billing_key())
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


def pgbackrest(h: Host, *args: str) -> str:
    """pgBackRest on `h`, as its member's server runs it; its output, or a failure that shows it."""
    cmd = h.exec("pgbackrest", f"--config={h.dir / 'pgbackrest.conf'}", f"--stanza={pgc.STANZA}", *args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **ARCHIVE_ENV})
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


def write(c: Cluster, h: Host, note: str) -> None:
    sql(c, h, "INSERT INTO ledger (note) VALUES (%s)", (note,))


def notes(c: Cluster, h: Host) -> list[str]:
    return [r[0] for r in sql(c, h, "SELECT note FROM ledger ORDER BY id")]


def system_id(c: Cluster, h: Host) -> int:
    rows = c.query(h, "SELECT system_identifier FROM pg_control_system()")
    assert rows, f"no answer from {h.name}\n{c.logs()}"
    return rows[0][0]


def wait_leader(c: Cluster, h: Host, timeout: float = LEADER_WITHIN_S) -> None:
    """Until `h` is the running primary holding the lock (a restore ends with a promotion)."""
    deadline = time.monotonic() + timeout
    while c.leader() is not h:
        # A failed bootstrap is fatal to Patroni (production's container restarts and tries again).
        if any(p.poll() is not None for p in h.procs if "patroni" in p.args):
            raise AssertionError(f"Patroni on {h.name} exited while creating the cluster\n{c.logs()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{h.name} did not lead within {timeout:.0f} s (Patroni: {h.api()})\n{c.logs()}")
        time.sleep(1)


def restore(c: Cluster, target) -> tuple[Host, Host]:
    """Every host lost, then the fresh cluster from the same rendered config with the restore switch:
    us-east restores and leads, eu-west clones it. Returns (leader, replica) once they are a
    synchronous pair."""
    c.lose_everything()
    c.restore = target
    c.rewrite_configs()
    us, eu = c.by_name["us-east"], c.by_name["eu-west"]
    c.start(us)
    wait_leader(c, us)
    c.start(eu)
    assert c.wait_healthy(timeout=180) is us
    # Billing starts as on a new host: its migrations meet a database that has had them.
    c.start_billing(us)
    c.wait_billing_on(us, timeout=90)
    log = (us.dir / "billing.log").read_text(errors="replace")
    assert "applied migrations" not in log, log[-3000:]
    return us, eu


def ledger_ok(c: Cluster, h: Host) -> str:
    """The ledger verification operators run (`python -m billing verify-ledger`) passes."""
    r = c.billing_command(h, "verify-ledger")
    assert r.returncode == 0, f"verify-ledger exited {r.returncode}: {r.stdout}{r.stderr}"
    return r.stdout


def test_both_regions_lost_restore_to_a_time_then_to_the_latest(restorable):
    c = restorable
    c.start_all()
    drill.prepare(c)  # billing migrates, a user is granted credits through its API
    leader = c.wait_healthy(timeout=180)
    granted = sql(c, leader, "SELECT user_id::text, balance FROM credit_balances")
    assert [u for u, _ in granted] == [c.drill_user] and granted[0][1] >= 1_000_000, granted  # (and any sign-up credit)
    pgbackrest(leader, "stanza-create")
    sql(c, leader, "CREATE TABLE ledger (id bigserial PRIMARY KEY, note text NOT NULL)")
    write(c, leader, "before the backup")
    pgbackrest(leader, "backup", "--type=full")
    # pgBackRest keeps a backup's stop time to the second: a target must come after it (a real one
    # does: the newest backup is up to a day old).
    time.sleep(2)
    write(c, leader, "after the backup")
    target = sql(c, leader, "SELECT clock_timestamp()")[0][0]
    time.sleep(1.5)  # commit timestamps clearly after the target
    write(c, leader, "after the target")
    pgbackrest(leader, "check")  # switches WAL and waits until it is in the bucket
    original = system_id(c, leader)

    # To a moment: exactly what was committed before it, on the old system id; both members have it.
    assert isinstance(target, datetime.datetime) and target.tzinfo
    us, eu = restore(c, target)
    assert notes(c, us) == ["before the backup", "after the backup"]
    log = (us.dir / "processes.log").read_text(errors="replace")
    assert "Running custom bootstrap script: pgbackrest" in log
    # pgBackRest read the target itself: it picked the newest backup before it, not just the last one.
    assert "automatic backup set selection cannot be performed" not in log, log[-3000:]
    assert system_id(c, us) == system_id(c, eu) == original
    assert sql(c, us, "SELECT user_id::text, balance FROM credit_balances") == granted
    assert "1 users" in ledger_ok(c, us)
    assert [r[0] for r in c.query(eu, "SELECT note FROM ledger ORDER BY id", dbname=pgc.DATABASE)] == \
        ["before the backup", "after the backup"]
    # Archiving goes on into the same stanza: the backup job's stanza-create accepts it, `check`
    # pushes a new segment, and a new backup is taken of the restored cluster.
    write(c, us, "after the restore")
    pgbackrest(us, "stanza-create")
    pgbackrest(us, "check")
    pgbackrest(us, "backup", "--type=full")
    info = pgbackrest(us, "info")
    assert "status: ok" in info and info.count("full backup") == 2, info

    # To the latest: everything archived, following the restored cluster's timeline (not the row
    # written after the target on the old one).
    us, eu = restore(c, "latest")
    assert notes(c, us) == ["before the backup", "after the backup", "after the restore"]
    assert system_id(c, us) == original
    ledger_ok(c, us)
    write(c, us, "after the second restore")
    pgbackrest(us, "check")


def test_restore_switch_renders_patronis_custom_bootstrap():
    tls = pgc.Tls("c", "k", "ca")
    common = dict(name="us_east", address="10.0.0.1", etcd_hosts=["10.0.0.1:2379"], tls=tls, hba="",
                  passwords=dict.fromkeys(("superuser", "replication", "rewind", "api"), "x"), data_dir="/d",
                  archive_config="/run/ciris-postgres/pgbackrest.conf")
    plain = yaml.safe_load(pgc.patroni_yml(**common))["bootstrap"]
    assert "method" not in plain and "initdb" in plain  # without the switch: a new, empty cluster
    at = datetime.datetime(2026, 11, 22, 15, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    boot = yaml.safe_load(pgc.patroni_yml(**common, restore=at))["bootstrap"]
    assert boot["method"] == "pgbackrest"
    assert boot["pgbackrest"] == {
        "command": "pgbackrest --config=/run/ciris-postgres/pgbackrest.conf --stanza=ciris restore --delta "
                   "--type=time '--target=2026-11-22 14:05:00+00' --target-action=promote",
        "keep_existing_recovery_conf": True, "no_params": True}
    latest = yaml.safe_load(pgc.patroni_yml(**common, restore="latest"))["bootstrap"]["pgbackrest"]["command"]
    assert latest == "pgbackrest --config=/run/ciris-postgres/pgbackrest.conf --stanza=ciris restore --delta"
    with pytest.raises(ValueError, match="needs WAL archiving"):
        pgc.patroni_yml(**{**common, "archive_config": None}, restore="latest")
    with pytest.raises(ValueError, match="needs a time zone, got '2026-11-22T15:05:00'"):
        pgc.restore_command("/p.conf", at.replace(tzinfo=None))
