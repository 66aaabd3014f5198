"""Billing's database logins rotate in place (ADR 26): payloads/postgres/apply-logins.sh, on a real
primary and its synchronous replica with the rendered configs, given the logins file the program
renders (SCRAM verifiers, never passwords)."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import psycopg
import pytest

from components import postgres_config as pgc
from tests.postgres.conftest import PASSWORDS, as_postgres

PAYLOAD = Path(__file__).resolve().parents[2] / "payloads" / "postgres"
APPLY, ON_ROLE = PAYLOAD / "apply-logins.sh", PAYLOAD / "on-role.sh"
SALT_KEY = "a-secret-of-the-stack"
NEW = "second-login-CANARY-pw"


def write(cluster, logins: dict[str, str]) -> Path:
    path = cluster.root / "logins.json"
    path.write_text(pgc.logins_json(logins, SALT_KEY))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def run(cluster, script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A payload script as the container runs it: as postgres, through the member's socket."""
    conninfo = f"host={cluster.socket_dir} port={cluster.port} user=postgres dbname=postgres"
    r = as_postgres(["sh", str(script), *args], env={**os.environ, "CIRIS_LOGINS_CONNINFO": conninfo, **env})
    assert r.returncode == 0, r.stderr
    return r


def apply(cluster, logins: dict[str, str]) -> subprocess.CompletedProcess:
    """As reload.sh runs it on every deploy."""
    return run(cluster, APPLY, str(write(cluster, logins)))


def login(cluster, user: str, password: str) -> psycopg.Connection:
    return psycopg.connect(cluster.conninfo(user="postgres", dbname=pgc.DATABASE).replace(
        "user=postgres", f"user={user}").replace(f"password={PASSWORDS['postgres']}", f"password={password}"), autocommit=True)


def test_a_second_login_acts_as_the_app_role_and_the_first_is_shut_without_a_restart(pair):
    primary, replica = pair
    old = PASSWORDS[pgc.APP_ROLE]
    # The first deploy after the upgrade: the app role keeps its password (a new salt only).
    assert "set the password of billing" in apply(primary, {"1": old}).stderr
    assert apply(primary, {"1": old}).stderr == ""  # again: nothing differs, nothing is written
    with login(primary, "billing", old) as conn:
        conn.execute("CREATE TABLE made_by_the_first (x int)")

    # Step 1: the second login exists beside the first; the replica replays it, its own run does nothing.
    out = apply(primary, {"1": old, "2": NEW}).stderr
    assert "created billing_2" in out and "set the password of billing_2" in out
    assert apply(replica, {"1": old, "2": NEW}).stderr == ""
    first = login(primary, "billing", old)
    with login(primary, "billing_2", NEW) as conn:
        # It acts as the app role: what it makes, the app role owns; what the first made, it may change.
        assert conn.execute("SELECT session_user, current_user").fetchone() == ("billing_2", "billing")
        conn.execute("CREATE TABLE made_by_the_second (x int)")
        conn.execute("INSERT INTO made_by_the_first VALUES (1)")
        conn.execute("ALTER TABLE made_by_the_first ADD COLUMN y int")
        owners = dict(conn.execute("SELECT tablename, tableowner FROM pg_tables WHERE tablename LIKE 'made_by%'").fetchall())
        assert owners == {"made_by_the_first": "billing", "made_by_the_second": "billing"}
    with login(replica, "billing_2", NEW) as conn:  # replicated: it logs in wherever billing connects
        assert conn.execute("SELECT count(*) FROM made_by_the_first").fetchone() == (1,)

    # Step 3: the first is shut: its password refused, its sessions ended; the second goes on.
    assert "shut billing" in apply(primary, {"2": NEW}).stderr
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(primary, "billing", old)
    with pytest.raises(psycopg.OperationalError):
        first.execute("SELECT 1")
    with login(primary, "billing_2", NEW) as conn:
        assert conn.execute("SELECT count(*) FROM made_by_the_second").fetchone() == (0,)
    assert apply(primary, {"2": NEW}).stderr == ""


def test_the_file_names_only_billing_login_roles(pair):
    primary, _ = pair
    path = primary.root / "bad-logins.json"
    path.write_text('{"postgres": "SCRAM-SHA-256$4096:x$y:z"}')
    os.chmod(path, 0o644)
    env = {**os.environ, "CIRIS_LOGINS_CONNINFO": f"host={primary.socket_dir} port={primary.port} user=postgres dbname=postgres"}
    r = as_postgres(["sh", str(APPLY), str(path)], env=env)
    assert r.returncode != 0 and "postgres is not a billing login role" in r.stderr
    with primary.connect() as conn:  # the superuser's password is untouched
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_new_primary_adds_the_logins_it_knows_and_shuts_none(pair):
    """Patroni's role-change callback (on-role.sh): on the member that now leads, the logins of its
    file are added; one its (possibly older) file does not list is left as it is; a replica's call
    does nothing."""
    primary, replica = pair
    old = PASSWORDS[pgc.APP_ROLE]
    apply(primary, {"1": old, "2": NEW})
    path = write(primary, {"1": old, "3": "third-login-CANARY-pw"})  # an older or newer file: billing_2 not in it
    env = {"CIRIS_LOGINS_FILE": str(path)}
    assert run(replica, ON_ROLE, "on_role_change", "replica", "ciris-billing", **env).stderr == ""
    assert "created billing_3" in run(primary, ON_ROLE, "on_role_change", "master", "ciris-billing", **env).stderr
    for user, password in (("billing", old), ("billing_2", NEW), ("billing_3", "third-login-CANARY-pw")):
        with login(primary, user, password) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("billing",)
