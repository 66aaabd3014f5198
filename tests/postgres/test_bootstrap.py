"""payloads/postgres/bootstrap.sh -- the container entrypoint -- run for real: it initialises a
primary (roles, database, slot), then a replica from it with pg_basebackup, and the pair streams
synchronously with the rendered configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from components import postgres_config as pgc
from tests.conftest import REPO
from tests.postgres.conftest import PASSWORDS, PRIMARY_ADDR, REPLICA_ADDR, REPLICA_SOURCE, free_port, pg_bin, workspace

REPLICA_DSN = f"host={REPLICA_ADDR} port={{rport}} user=postgres password={PASSWORDS['postgres']} dbname={pgc.DATABASE} sslmode=verify-full sslrootcert={{ca}}"
BOOTSTRAP = REPO / "payloads" / "postgres" / "bootstrap.sh"


def start(root: Path, name: str, tls: pgc.Tls, addr: str, port: int, env: dict, conf_kw: dict) -> subprocess.Popen:
    run_dir, sock = root / f"{name}-run", root / f"{name}-sock"
    run_dir.mkdir()
    sock.mkdir()
    for src in (tls.cert_file, tls.key_file, tls.ca_file):
        shutil.copy(src, run_dir / {tls.cert_file: "server.crt", tls.key_file: "server.key", tls.ca_file: "ca.crt"}[src])
    files = pgc.Tls(str(run_dir / "server.crt"), str(run_dir / "server.key"), str(run_dir / "ca.crt"))
    (run_dir / "postgresql.conf").write_text(pgc.postgresql_conf(tls=files, listen=addr, port=port, socket_dir=str(sock), **conf_kw))
    (run_dir / "pg_hba.conf").write_text(
        pgc.pg_hba(peers=[REPLICA_SOURCE], app_cidrs=["127.0.0.1/32"]) + "hostssl all postgres 127.0.0.1/32 scram-sha-256\n"
    )
    if os.geteuid() == 0:
        for p in [run_dir, sock, *run_dir.iterdir()]:
            shutil.chown(p, "postgres", "postgres")
    (run_dir / "server.key").chmod(0o600)
    full_env = {
        **os.environ, **env, "PGDATA": str(root / f"{name}-data"), "RUN_DIR": str(run_dir), "SOCKET_DIR": str(sock),
        "PATH": os.path.dirname(pg_bin("initdb")) + os.pathsep + os.environ["PATH"],
        "POSTGRES_PASSWORD": PASSWORDS["postgres"], "REPLICATION_PASSWORD": PASSWORDS[pgc.REPLICATION_ROLE],
        "BILLING_PASSWORD": PASSWORDS[pgc.APP_ROLE],
    }
    cmd = ["sh", str(BOOTSTRAP)]
    if os.geteuid() == 0:  # the container's root branch uses gosu; here we start as postgres directly
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.Popen(cmd, env=full_env, stdout=open(root / f"{name}.log", "wb"), stderr=subprocess.STDOUT)


def wait_ready(addr: str, port: int, ca: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 90
    while True:
        try:
            psycopg.connect(f"host={addr} port={port} user=postgres password={PASSWORDS['postgres']} dbname=postgres "
                            f"sslmode=verify-full sslrootcert={ca} connect_timeout=2").close()
            return
        except psycopg.OperationalError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"bootstrap did not bring up {addr}: {log.read_text()[-3000:]}")
            time.sleep(0.3)


def test_bootstrap_builds_a_synchronous_pair():
    root, tls = workspace()
    procs = []
    try:
        pport, rport = free_port(), free_port()
        ca = tls[PRIMARY_ADDR].ca_file
        slot = pgc.application_name("eu-west")
        primary = start(root, "primary", tls[PRIMARY_ADDR], PRIMARY_ADDR, pport, {"ROLE": "primary", "SLOTS": slot},
                        {"role": "primary", "replicas": ["eu-west"]})
        procs.append(primary)
        wait_ready(PRIMARY_ADDR, pport, ca, primary, root / "primary.log")
        conninfo = pgc.primary_conninfo(host=PRIMARY_ADDR, port=pport, password=PASSWORDS[pgc.REPLICATION_ROLE], application=slot, ca_file=str(root / "replica-run" / "ca.crt"))
        replica = start(root, "replica", tls[REPLICA_ADDR], REPLICA_ADDR, rport,
                        {"ROLE": "replica", "SLOT": slot, "PRIMARY_HOST": PRIMARY_ADDR, "PRIMARY_PORT": str(pport)},
                        {"role": "replica", "replicas": ["eu-west"], "primary_conninfo": conninfo, "slot": slot})
        procs.append(replica)
        wait_ready(REPLICA_ADDR, rport, ca, replica, root / "replica.log")

        su = f"host={PRIMARY_ADDR} port={pport} user=postgres password={PASSWORDS['postgres']} dbname=postgres sslmode=verify-full sslrootcert={ca}"
        with psycopg.connect(su, autocommit=True) as conn:
            deadline = time.time() + 30
            while conn.execute("SELECT application_name, sync_state FROM pg_stat_replication").fetchall() != [(slot, "sync")]:
                assert time.time() < deadline, f"no synchronous standby named {slot}: {conn.execute('SELECT application_name, sync_state FROM pg_stat_replication').fetchall()}"
                time.sleep(0.2)
        app = f"host={PRIMARY_ADDR} port={pport} user={pgc.APP_ROLE} password={PASSWORDS[pgc.APP_ROLE]} dbname={pgc.DATABASE} sslmode=verify-full sslrootcert={ca}"
        with psycopg.connect(app, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t VALUES (1)")  # returns only once the replica has it
            assert not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        with psycopg.connect(REPLICA_DSN.format(rport=rport, ca=ca), autocommit=True) as conn:
            deadline = time.time() + 10  # flushed on the replica at commit; replayed a moment later
            while conn.execute("SELECT to_regclass('t') IS NOT NULL").fetchone()[0] is not True or conn.execute("SELECT n FROM t").fetchall() != [(1,)]:
                assert time.time() < deadline
                time.sleep(0.1)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_declared_failover_swaps_roles_without_losing_data():
    """Moving `postgres: primary` in config restarts both members with swapped roles: the replica
    comes up as primary with every row; the old primary keeps its data aside and re-clones."""
    root, tls = workspace()
    procs: list[subprocess.Popen] = []
    try:
        pport, rport = free_port(), free_port()
        ca = tls[PRIMARY_ADDR].ca_file
        us, eu = pgc.application_name("us-east"), pgc.application_name("eu-west")
        old = start(root, "primary", tls[PRIMARY_ADDR], PRIMARY_ADDR, pport, {"ROLE": "primary", "SLOTS": eu},
                    {"role": "primary", "replicas": ["eu-west"]})
        procs.append(old)
        wait_ready(PRIMARY_ADDR, pport, ca, old, root / "primary.log")
        info = pgc.primary_conninfo(host=PRIMARY_ADDR, port=pport, password=PASSWORDS[pgc.REPLICATION_ROLE], application=eu, ca_file=str(root / "replica-run" / "ca.crt"))
        new = start(root, "replica", tls[REPLICA_ADDR], REPLICA_ADDR, rport,
                    {"ROLE": "replica", "SLOT": eu, "PRIMARY_HOST": PRIMARY_ADDR, "PRIMARY_PORT": str(pport)},
                    {"role": "replica", "replicas": ["eu-west"], "primary_conninfo": info, "slot": eu})
        procs.append(new)
        wait_ready(REPLICA_ADDR, rport, ca, new, root / "replica.log")
        su = f"host={PRIMARY_ADDR} port={pport} user=postgres password={PASSWORDS['postgres']} dbname=postgres sslmode=verify-full sslrootcert={ca}"
        with psycopg.connect(su, autocommit=True) as conn:
            deadline = time.time() + 30
            while conn.execute("SELECT sync_state FROM pg_stat_replication").fetchall() != [("sync",)]:
                assert time.time() < deadline
                time.sleep(0.2)
            conn.execute("CREATE TABLE ledger (n int)")
            conn.execute("INSERT INTO ledger SELECT generate_series(1, 100)")
        for p in (old, new):
            p.terminate()
            p.wait(30)

        # Roles swapped in config; each restarts with its newly rendered files.
        for d in ("primary-run", "primary-sock", "replica-run", "replica-sock"):
            shutil.rmtree(root / d)
        new = start(root, "replica", tls[REPLICA_ADDR], REPLICA_ADDR, rport, {"ROLE": "primary", "SLOTS": us},
                    {"role": "primary", "replicas": ["us-east"]})
        procs.append(new)
        wait_ready(REPLICA_ADDR, rport, ca, new, root / "replica.log")
        info = pgc.primary_conninfo(host=REPLICA_ADDR, port=rport, password=PASSWORDS[pgc.REPLICATION_ROLE], application=us, ca_file=str(root / "primary-run" / "ca.crt"))
        old = start(root, "primary", tls[PRIMARY_ADDR], PRIMARY_ADDR, pport,
                    {"ROLE": "replica", "SLOT": us, "PRIMARY_HOST": REPLICA_ADDR, "PRIMARY_PORT": str(rport)},
                    {"role": "replica", "replicas": ["us-east"], "primary_conninfo": info, "slot": us})
        procs.append(old)
        wait_ready(PRIMARY_ADDR, pport, ca, old, root / "primary.log")
        new_su = su.replace(f"host={PRIMARY_ADDR} port={pport}", f"host={REPLICA_ADDR} port={rport}")
        with psycopg.connect(new_su, autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (100,)
            deadline = time.time() + 30
            while conn.execute("SELECT application_name, sync_state FROM pg_stat_replication").fetchall() != [(us, "sync")]:
                assert time.time() < deadline, "old primary did not come back as the synchronous replica"
                time.sleep(0.2)
            conn.execute("INSERT INTO ledger VALUES (101)")
        assert list(root.glob("primary-data.old-*")), "the old primary's data was not kept aside"
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(root, ignore_errors=True)
