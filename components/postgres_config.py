"""PostgreSQL settings and client authentication for ReplicatedPostgres (pure renderers).

The same functions configure the containers on the hosts and the clusters the tests start.
FSD §6.1: synchronous_commit = on, the replica named in synchronous_standby_names, manual
promotion only. Every TCP connection must be TLS with SCRAM passwords; replication only for the
replication role from the peer regions; the billing app only from the host's container network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

DATABASE = "cirisbilling"
APP_ROLE = "billing"
REPLICATION_ROLE = "replicator"


def application_name(region_name: str) -> str:
    """How a replica names itself to the primary (FSD: synchronous_standby_names = 'hetzner_replica')."""
    return f"{region_name.replace('-', '_')}_replica"


def standby_names(replicas: Sequence[str]) -> str:
    """Commit waits for the first listed replica that is streaming (FSD: synchronous)."""
    return f"FIRST 1 ({', '.join(application_name(r) for r in replicas)})" if replicas else ""


@dataclass(frozen=True)
class Tls:
    cert_file: str
    key_file: str
    ca_file: str


def _q(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def postgresql_conf(
    *,
    role: Literal["primary", "replica"],
    replicas: Sequence[str],
    tls: Tls,
    listen: str = "*",
    port: int = 5432,
    socket_dir: str = "/var/run/postgresql",
    primary_conninfo: str | None = None,
    slot: str | None = None,
) -> str:
    """A replica gets `primary_conninfo`/`slot` (its stream from the primary); both get the
    synchronous settings, so a promoted replica is ready once the roles are re-declared."""
    settings = {
        "listen_addresses": _q(listen),
        "port": str(port),
        "unix_socket_directories": _q(socket_dir),
        "ssl": "on",
        "ssl_cert_file": _q(tls.cert_file),
        "ssl_key_file": _q(tls.key_file),
        "ssl_ca_file": _q(tls.ca_file),
        "ssl_min_protocol_version": _q("TLSv1.2"),
        "password_encryption": _q("scram-sha-256"),
        "wal_level": "replica",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "wal_log_hints": "on",  # lets pg_rewind turn an old primary into a replica
        "hot_standby": "on",
        "synchronous_commit": "on",
        "synchronous_standby_names": _q(standby_names(replicas) if role == "primary" else ""),
        "log_connections": "on",
        "log_min_duration_statement": "-1",  # never log statements (they could carry user data)
        "log_statement": _q("none"),
    }
    if role == "replica":
        if not primary_conninfo or not slot:
            raise ValueError("a replica needs primary_conninfo and slot")
        settings["primary_conninfo"] = _q(primary_conninfo)
        settings["primary_slot_name"] = _q(slot)
    return "".join(f"{k} = {v}\n" for k, v in settings.items())


def primary_conninfo(*, host: str, port: int, password: str, application: str, ca_file: str) -> str:
    return (
        f"host={host} port={port} user={REPLICATION_ROLE} password={password} "
        f"application_name={application} sslmode=verify-full sslrootcert={ca_file}"
    )


def pg_hba(*, peers: Sequence[str], app_cidrs: Sequence[str]) -> str:
    """`peers`: CIDRs of the other regions (replication); `app_cidrs`: the container network."""
    lines = ["# TYPE  DATABASE  USER  ADDRESS  METHOD", "local all postgres peer"]
    lines += [f"hostssl replication {REPLICATION_ROLE} {cidr} scram-sha-256" for cidr in peers]
    lines += [f"hostssl {DATABASE} {APP_ROLE} {cidr} scram-sha-256" for cidr in app_cidrs]
    # Anything else -- including any non-TLS connection -- matches no line and is refused.
    return "\n".join(lines) + "\n"
