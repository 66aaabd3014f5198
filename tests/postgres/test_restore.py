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
import time

import pytest
import yaml

from components import postgres_config as pgc
from tests.conftest import require_binary
from tests.postgres import drill
from tests.postgres.ha import Cluster, Host
from tests.postgres.restoring import pgbackrest, restorable_cluster, sql, wait_leader


@pytest.fixture
def restorable():
    """us-east and eu-west archiving to an HTTPS moto bucket (tests/postgres/restoring.py)."""
    for binary in ("etcd", "patroni", "ip", "pgbackrest", "caddy"):
        require_binary(binary)
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root") if os.environ.get("CI") != "true" else pytest.fail("needs root")
    with restorable_cluster() as c:
        yield c


def write(c: Cluster, h: Host, note: str) -> None:
    sql(c, h, "INSERT INTO ledger (note) VALUES (%s)", (note,))


def notes(c: Cluster, h: Host) -> list[str]:
    return [r[0] for r in sql(c, h, "SELECT note FROM ledger ORDER BY id")]


def system_id(c: Cluster, h: Host) -> int:
    rows = c.query(h, "SELECT system_identifier FROM pg_control_system()")
    assert rows, f"no answer from {h.name}\n{c.logs()}"
    return rows[0][0]


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
