"""Real PostgreSQL clusters on loopback, configured by the project's renderers, with a test CA."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from components import postgres_config as pgc
from tests.conftest import require_binary

PRIMARY_ADDR, REPLICA_ADDR = "127.0.0.2", "127.0.0.3"
# Every loopback client connects from 127.0.0.1, so that is the replica region's source address here.
REPLICA_SOURCE = "127.0.0.1/32"
PASSWORDS = {"postgres": "su-pass-CANARY", pgc.REPLICATION_ROLE: "repl-pass-CANARY", pgc.APP_ROLE: "app-pass-CANARY"}


def pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return require_binary(name)


def as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root; drop to the postgres user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120, **kw)


def make_ca(dirpath: Path, addrs=(PRIMARY_ADDR, REPLICA_ADDR)) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """A CA and one server certificate per address (SAN IP), as the program's small CA does."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ciris-bridge test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = dirpath / "ca.crt"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs = {}
    for addr in addrs:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addr)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(_san(addr)), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        crt, pem = dirpath / f"{addr}.crt", dirpath / f"{addr}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        pem.chmod(0o600)
        certs[addr] = (crt, pem)
    return ca_file, certs


def _san(addr: str) -> list[x509.GeneralName]:
    # Also as a DNS name: pgBackRest matches the endpoint string against DNS names only.
    return [x509.IPAddress(ipaddress.ip_address(addr)), x509.DNSName(addr)]


class Cluster:
    def __init__(self, root: Path, name: str, addr: str, port: int, tls: pgc.Tls, env: dict | None = None):
        self.root, self.name, self.addr, self.port, self.tls = root, name, addr, port, tls
        self.env = env  # the server's environment (archive_command reads pgBackRest's keys from it)
        self.data = root / name
        self.socket_dir = root / f"{name}-sock"
        self.socket_dir.mkdir()
        self.log = root / f"{name}.log"

    def write_config(self, conf: str, hba: str) -> None:
        (self.data / "postgresql.auto.conf").write_text("")
        (self.data / "ciris.conf").write_text(conf)
        (self.data / "pg_hba.conf").write_text(hba)
        base = self.data / "postgresql.conf"
        if "include 'ciris.conf'" not in base.read_text():
            base.write_text(base.read_text() + "\ninclude 'ciris.conf'\n")

    def start(self) -> None:
        r = as_postgres([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"], env=self.env)
        assert r.returncode == 0, r.stderr + self.log.read_text()[-2000:]

    def stop(self, mode: str = "fast") -> None:
        as_postgres([pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def kill9(self) -> None:
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid]
        for p in [pid, *children]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def promote(self) -> None:
        r = as_postgres([pg_bin("pg_ctl"), "-D", str(self.data), "-w", "promote"])
        assert r.returncode == 0, r.stderr

    def conninfo(self, user: str = "postgres", dbname: str = "postgres", sslmode: str = "verify-full", **extra) -> str:
        parts = {
            "host": self.addr, "port": self.port, "user": user, "password": PASSWORDS[user], "dbname": dbname,
            "sslmode": sslmode, "sslrootcert": self.tls.ca_file, "connect_timeout": 5, **extra,
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, **kw) -> psycopg.Connection:
        return psycopg.connect(self.conninfo(**kw), autocommit=True)


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workspace() -> tuple[Path, dict[str, pgc.Tls]]:
    """A directory the postgres user owns, with a CA and a certificate per test address."""
    require_binary("pg_basebackup")
    root = Path(tempfile.mkdtemp(prefix="ciris-pg-"))
    root.chmod(0o755)
    ca_file, certs = make_ca(root)
    if os.geteuid() == 0:
        for p in [root, *root.iterdir()]:
            shutil.chown(p, "postgres", "postgres")
    return root, {addr: pgc.Tls(str(crt), str(key), str(ca_file)) for addr, (crt, key) in certs.items()}


def init_primary(root: Path, tls: pgc.Tls, name: str = "primary", addr: str = PRIMARY_ADDR, replicas=("eu-west",),
                 archive_config: str | None = None, env: dict | None = None) -> Cluster:
    """initdb, the rendered configs, start, and the roles and database the bridge uses."""
    cluster = Cluster(root, name, addr, free_port(), tls, env)
    pwfile = root / f"{name}-pw"
    pwfile.write_text(PASSWORDS["postgres"])
    if os.geteuid() == 0:
        shutil.chown(cluster.socket_dir, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    r = as_postgres([pg_bin("initdb"), "-D", str(cluster.data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"])
    assert r.returncode == 0, r.stderr
    cluster.write_config(
        pgc.postgresql_conf(role="primary", replicas=list(replicas), tls=tls, listen=addr, port=cluster.port,
                            socket_dir=str(cluster.socket_dir), archive_config=archive_config),
        # The superuser over TLS is a test convenience; production admin goes through the socket.
        pgc.pg_hba(peers=[REPLICA_SOURCE], app_cidrs=["127.0.0.1/32"]) + "hostssl all postgres 127.0.0.1/32 scram-sha-256\n",
    )
    cluster.start()
    with cluster.connect() as conn:
        # Bootstrap commits cannot wait for a replica that does not exist yet.
        conn.execute("SET synchronous_commit = local")
        conn.execute(f"CREATE ROLE {pgc.REPLICATION_ROLE} WITH REPLICATION LOGIN PASSWORD '{PASSWORDS[pgc.REPLICATION_ROLE]}'")
        conn.execute(f"CREATE ROLE {pgc.APP_ROLE} WITH LOGIN PASSWORD '{PASSWORDS[pgc.APP_ROLE]}'")
        conn.execute(f"CREATE DATABASE {pgc.DATABASE} OWNER {pgc.APP_ROLE}")
        for replica in replicas:
            conn.execute(f"SELECT pg_create_physical_replication_slot('{pgc.application_name(replica)}')")
    return cluster


@pytest.fixture
def single():
    """One standalone cluster (no replicas), for backup and restore."""
    root, tls = workspace()
    cluster = init_primary(root, tls[PRIMARY_ADDR], replicas=())
    yield root, tls, cluster
    cluster.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


def start_replica(root: Path, tls: dict[str, pgc.Tls], primary: Cluster, via_port: int | None = None) -> Cluster:
    """A synchronous replica of `primary` on 127.0.0.3, bootstrapped with pg_basebackup over TLS
    through its physical slot, with the rendered replica config. `via_port`: reach the primary
    through a relay on that port of the primary's address (the benchmark's delayed link)."""
    upstream = via_port or primary.port
    replica = Cluster(root, "replica", REPLICA_ADDR, free_port(), tls[REPLICA_ADDR])
    if os.geteuid() == 0:
        shutil.chown(replica.socket_dir, "postgres", "postgres")
    slot = pgc.application_name("eu-west")
    ca_file = tls[PRIMARY_ADDR].ca_file
    env = {**os.environ, "PGPASSWORD": PASSWORDS[pgc.REPLICATION_ROLE], "PGSSLMODE": "verify-full", "PGSSLROOTCERT": ca_file}
    r = as_postgres(
        [pg_bin("pg_basebackup"), "-h", PRIMARY_ADDR, "-p", str(upstream), "-U", pgc.REPLICATION_ROLE,
         "-D", str(replica.data), "-X", "stream", "-S", slot, "-R", "--checkpoint=fast"],
        env=env,
    )
    assert r.returncode == 0, r.stderr
    conninfo = pgc.primary_conninfo(host=PRIMARY_ADDR, port=upstream, password=PASSWORDS[pgc.REPLICATION_ROLE], application=slot, ca_file=ca_file)
    replica.write_config(
        pgc.postgresql_conf(role="replica", replicas=["eu-west"], tls=replica.tls, listen=REPLICA_ADDR, port=replica.port,
                            socket_dir=str(replica.socket_dir), primary_conninfo=conninfo, slot=slot),
        pgc.pg_hba(peers=[REPLICA_SOURCE], app_cidrs=["127.0.0.1/32"]) + "hostssl all postgres 127.0.0.1/32 scram-sha-256\n",
    )
    replica.start()
    deadline = time.time() + 30
    with primary.connect() as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'").fetchone()[0] == 0:
            assert time.time() < deadline, "replica never became synchronous"
            time.sleep(0.2)
    return replica


@pytest.fixture
def pair():
    """A primary on 127.0.0.2 and a synchronous replica on 127.0.0.3, both with the rendered configs."""
    root, tls = workspace()
    primary = init_primary(root, tls[PRIMARY_ADDR])
    replica = start_replica(root, tls, primary)
    yield primary, replica
    for c in (replica, primary):
        c.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)
