"""payloads/postgres/bootstrap.sh -- the container entrypoint -- run for real: it initialises a
primary (roles, database, slot), then a replica from it with pg_basebackup, and the pair streams
synchronously with the rendered configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from components import postgres_config as pgc
from tests.conftest import REPO
from tests.postgres.conftest import PASSWORDS, PRIMARY_ADDR, REPLICA_ADDR, REPLICA_SOURCE, free_port, pg_bin, workspace

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


def member(root, tls, procs, name, addr, port, role, region, peer, primary=None):
    """Start one member through the entrypoint and wait for it: `region` is this member's region,
    `peer` the other one's; a replica streams from `primary` = (host, port)."""
    slot = pgc.application_name(region if role == "replica" else peer)
    env, conf = {"ROLE": role}, {"role": role, "replicas": [peer if role == "primary" else region]}
    if role == "primary":
        env["SLOTS"] = slot
    else:
        env.update(SLOT=slot, PRIMARY_HOST=primary[0], PRIMARY_PORT=str(primary[1]))
        conf.update(slot=slot, primary_conninfo=pgc.primary_conninfo(
            host=primary[0], port=primary[1], password=PASSWORDS[pgc.REPLICATION_ROLE], application=slot,
            ca_file=str(root / f"{name}-run" / "ca.crt")))
    proc = start(root, name, tls[addr], addr, port, env, conf)
    procs.append(proc)
    wait_ready(addr, port, tls[addr].ca_file, proc, root / f"{name}.log")
    return proc


def superuser(addr, port, ca, dbname="postgres"):
    return psycopg.connect(f"host={addr} port={port} user=postgres password={PASSWORDS['postgres']} dbname={dbname} "
                           f"sslmode=verify-full sslrootcert={ca}", autocommit=True)


def wait_sync(conn, slot):
    deadline = time.time() + 30
    while (rows := conn.execute("SELECT application_name, sync_state FROM pg_stat_replication").fetchall()) != [(slot, "sync")]:
        assert time.time() < deadline, f"no synchronous standby named {slot}: {rows}"
        time.sleep(0.2)


def stop_all(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@dataclass
class Pair:
    root: Path
    tls: dict
    procs: list
    pport: int
    rport: int
    ca: str


@pytest.fixture
def entrypoint_pair():
    """us-east primary on 127.0.0.2 and eu-west replica on 127.0.0.3, both started by the
    entrypoint, streaming synchronously."""
    root, tls = workspace()
    pair = Pair(root, tls, [], free_port(), free_port(), tls[PRIMARY_ADDR].ca_file)
    try:
        member(root, tls, pair.procs, "primary", PRIMARY_ADDR, pair.pport, "primary", "us-east", "eu-west")
        member(root, tls, pair.procs, "replica", REPLICA_ADDR, pair.rport, "replica", "eu-west", "us-east", (PRIMARY_ADDR, pair.pport))
        with superuser(PRIMARY_ADDR, pair.pport, pair.ca) as conn:
            wait_sync(conn, pgc.application_name("eu-west"))
        yield pair
    finally:
        stop_all(pair.procs)
        shutil.rmtree(root, ignore_errors=True)


def test_bootstrap_builds_a_synchronous_pair(entrypoint_pair):
    p = entrypoint_pair
    app = f"host={PRIMARY_ADDR} port={p.pport} user={pgc.APP_ROLE} password={PASSWORDS[pgc.APP_ROLE]} dbname={pgc.DATABASE} sslmode=verify-full sslrootcert={p.ca}"
    with psycopg.connect(app, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t VALUES (1)")  # returns only once the replica has it
        assert not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    with superuser(REPLICA_ADDR, p.rport, p.ca, pgc.DATABASE) as conn:
        deadline = time.time() + 10  # flushed on the replica at commit; replayed a moment later
        while conn.execute("SELECT to_regclass('t') IS NOT NULL").fetchone()[0] is not True or conn.execute("SELECT n FROM t").fetchall() != [(1,)]:
            assert time.time() < deadline
            time.sleep(0.1)


def test_declared_failover_swaps_roles_without_losing_data(entrypoint_pair):
    """Moving `postgres: primary` in config restarts both members with swapped roles: the replica
    comes up as primary with every row; the old primary keeps its data aside and re-clones."""
    p = entrypoint_pair
    with superuser(PRIMARY_ADDR, p.pport, p.ca) as conn:
        conn.execute("CREATE TABLE ledger (n int)")
        conn.execute("INSERT INTO ledger SELECT generate_series(1, 100)")
    stop_all(p.procs)

    # Roles swapped in config; each restarts with its newly rendered files.
    for d in ("primary-run", "primary-sock", "replica-run", "replica-sock"):
        shutil.rmtree(p.root / d)
    member(p.root, p.tls, p.procs, "replica", REPLICA_ADDR, p.rport, "primary", "eu-west", "us-east")
    member(p.root, p.tls, p.procs, "primary", PRIMARY_ADDR, p.pport, "replica", "us-east", "eu-west", (REPLICA_ADDR, p.rport))
    with superuser(REPLICA_ADDR, p.rport, p.ca) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (100,)
        wait_sync(conn, pgc.application_name("us-east"))
        conn.execute("INSERT INTO ledger VALUES (101)")
    assert list(p.root.glob("primary-data.old-*")), "the old primary's data was not kept aside"
