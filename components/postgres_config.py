"""PostgreSQL settings and client authentication for ReplicatedPostgres (pure renderers).

The same functions configure the containers on the hosts and the clusters the tests start.
FSD §6.1: synchronous_commit = on, the replica named in synchronous_standby_names, manual
promotion only. Every TCP connection must be TLS with SCRAM passwords; replication only for the
replication role from the peer regions; the billing app only from the host's container network.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import shlex
from dataclasses import dataclass
from typing import Literal, Sequence
from urllib.parse import urlsplit

import yaml

DATABASE = "cirisbilling"
APP_ROLE = "billing"
REPLICATION_ROLE = "replicator"
REWIND_ROLE = "rewinder"  # pg_rewind's source connection: turns an old primary into a replica
# Billing's login roles (ADR 26): each logs in with its own password and acts as APP_ROLE, which owns
# the database; two exist only while one replaces the other.
LOGIN_PREFIX = f"{APP_ROLE}_"
SCOPE = "ciris-billing"  # Patroni's cluster name (its keys in etcd live under /ciris/<scope>/)


def login_role(name: str) -> str:
    """The database role of a login named in services.database_logins: the first one ever, "1", is
    APP_ROLE itself (a stack made before logins rotated keeps its role and password)."""
    return APP_ROLE if name == "1" else LOGIN_PREFIX + name


def scram_verifier(role: str, password: str, salt_key: str, iterations: int = 4096) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5802/7677), so the database hosts get
    the verifier and never the password. The salt is keyed by a secret of the stack (`salt_key`)
    and the role, never the password (a salt is stored in the clear): the same inputs render the
    same file, so a redeploy changes nothing."""
    salt = hmac.new(salt_key.encode(), f"ciris-scram-salt\0{role}".encode(), "sha256").digest()[:16]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


def logins_json(logins: dict[str, str], salt_key: str) -> str:
    """The logins file (payloads/postgres/apply-logins.sh): role -> verifier, for every login that may
    log in; billing's other login roles are shut."""
    return json.dumps({login_role(name): scram_verifier(login_role(name), pw, salt_key) for name, pw in logins.items()},
                      indent=1, sort_keys=True) + "\n"


def application_name(region_name: str) -> str:
    """How a member names itself to the primary: its Patroni member name (member_name())."""
    return region_name.replace("-", "_")


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


def _unquoted(settings: dict[str, str]) -> dict[str, str]:
    """postgresql.conf values as Patroni takes them: it quotes every value itself, so a quoted one
    would arrive with its quotes (an enum dropped as invalid, an archive_command that is no command)."""
    return {k: v[1:-1].replace("''", "'") if v.startswith("'") else v for k, v in settings.items()}


def wal_budget_mb(volume_gb: int) -> int:
    """The WAL a member may keep for what is not done with it (ADR 22): an absent replica's slot
    (max_slot_wal_keep_size) and, separately, WAL that archiving could not send yet (pgBackRest's
    archive-push-queue-max). A quarter of the data volume each, 2 GB on a host without one."""
    return volume_gb * 1024 // 4 if volume_gb else 2048


def server_parameters(
    *,
    tls: Tls,
    socket_dir: str = "/var/run/postgresql",
    archive_config: str | None = None,
    sender_timeout_s: int = 10,
    wal_budget: int = wal_budget_mb(0),
) -> dict[str, str]:
    """The settings every member runs with, whichever role it has (a promoted replica is ready as
    it is). `sender_timeout_s`: how soon a primary notices a standby that vanished without closing
    its connection (a frozen or cut-off host); until then a commit waits for it (Patroni then drops
    it from synchronous_standby_names)."""
    settings = {
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
        # A replica away longer than this much WAL loses its slot (it catches up from the archive or
        # is cloned again) instead of filling the primary's disk.
        "max_slot_wal_keep_size": f"{wal_budget}MB",
        "hot_standby": "on",
        "synchronous_commit": "on",
        "wal_sender_timeout": f"{sender_timeout_s}s",
        "wal_receiver_timeout": f"{sender_timeout_s}s",
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
        "log_connections": "on",
        "log_min_duration_statement": "-1",  # never log statements (they could carry user data)
        "log_statement": _q("none"),
        "log_min_error_statement": "panic",  # nor the statement that failed (its values are user data)
    }
    if archive_config:
        settings["archive_mode"] = "on"
        settings["archive_command"] = _q(f"pgbackrest --config={archive_config} --stanza={STANZA} archive-push %p")
        settings["archive_timeout"] = str(ARCHIVE_TIMEOUT_SECONDS)
    return settings


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
    archive_config: str | None = None,
) -> str:
    """A replica gets `primary_conninfo`/`slot` (its stream from the primary); both get the
    synchronous settings, so a promoted replica is ready once the roles are re-declared.
    `archive_config`: a pgbackrest.conf path turns on WAL archiving (a standby archives nothing
    until it is promoted, so every member carries the same setting)."""
    settings = {
        "listen_addresses": _q(listen),
        "port": str(port),
        **server_parameters(tls=tls, socket_dir=socket_dir, archive_config=archive_config),
        "synchronous_standby_names": _q(standby_names(replicas) if role == "primary" else ""),
    }
    if role == "replica":
        if not primary_conninfo or not slot:
            raise ValueError("a replica needs primary_conninfo and slot")
        settings["primary_conninfo"] = _q(primary_conninfo)
        settings["primary_slot_name"] = _q(slot)
    return "".join(f"{k} = {v}\n" for k, v in settings.items())


@dataclass(frozen=True)
class HaTiming:
    """Patroni's timers (its rule: loop_wait + 2 * retry_timeout <= ttl). A dead primary's lock
    expires after `ttl`, then the synchronous standby takes it: writes resume within about
    ttl + loop_wait. `sender_timeout_s`: see server_parameters()."""
    ttl: int = 20
    loop_wait: int = 4
    retry_timeout: int = 8
    sender_timeout_s: int = 10

    def __post_init__(self) -> None:
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError(f"Patroni needs loop_wait + 2 * retry_timeout <= ttl, got {self}")


def member_name(region: str) -> str:
    """A member's name in Patroni, which is also its application_name in synchronous_standby_names
    (so REPLICATION_STATUS_SQL's rows and replication_health() name members the same way)."""
    return application_name(region)


def patroni_yml(
    *,
    name: str,
    address: str,
    etcd_hosts: Sequence[str],
    tls: Tls,
    passwords: dict[str, str],
    data_dir: str,
    bin_dir: str = "/usr/lib/postgresql/15/bin",
    socket_dir: str = "/var/run/postgresql",
    pg_port: int = 5432,
    api_port: int = 8008,
    listen: str = "0.0.0.0",
    hba: str,
    archive_config: str | None = None,
    post_bootstrap: str | None = None,
    on_role: str | None = None,
    timing: HaTiming = HaTiming(),
    pgpass: str = "/tmp/pgpass-patroni",
    nofailover: bool = False,
    wal_budget: int = wal_budget_mb(0),
    restore: datetime.datetime | Literal["latest"] | None = None,
) -> str:
    """Patroni's configuration for one member (the same for every member but its name/address).

    `synchronous_mode` without `synchronous_mode_strict`: a commit waits for the synchronous
    standby while there is one; a standby that is gone is dropped from synchronous_standby_names
    (writes go on, unprotected: the alert says so), and only a member that was synchronous may be
    promoted, so no acknowledged commit is lost. `passwords`: superuser, replication, rewind, api.
    `nofailover`: never promote this member by itself (a stack without a witness: its consensus
    lives beside the declared primary, which must stay the leader; promotion is the runbook's).
    `restore`: create the cluster from the pgBackRest repository instead of initdb (restore_bootstrap()).
    `on_role`: a command Patroni runs when the member starts and when its role changes (it appends
    action, role and scope). Every TCP connection is TLS verified against the stack's CA; etcd with client certificates."""
    peer_ssl = {"sslmode": "verify-full", "sslrootcert": tls.ca_file}
    patroni_parameters = _unquoted(server_parameters(tls=tls, socket_dir=socket_dir, archive_config=archive_config,
                                                     sender_timeout_s=timing.sender_timeout_s, wal_budget=wal_budget))
    doc = {
        "scope": SCOPE,
        "namespace": "/ciris/",
        "name": name,
        "log": {"level": "INFO"},
        "restapi": {
            "listen": f"{listen}:{api_port}",
            "connect_address": f"{address}:{api_port}",
            "certfile": tls.cert_file,
            "keyfile": tls.key_file,
            "cafile": tls.ca_file,
            # Reads (/health, /patroni) are open to the peers the firewall lets in; changes need the password.
            "authentication": {"username": "patroni", "password": passwords["api"]},
        },
        "ctl": {"insecure": False, "cacert": tls.ca_file, "certfile": tls.cert_file, "keyfile": tls.key_file},
        # etcd's v2 API: Debian bookworm's etcd 3.4 is built without the gRPC gateway Patroni's
        # `etcd3` client speaks through (ADR 0014).
        "etcd": {
            "hosts": list(etcd_hosts),
            "protocol": "https",
            "cacert": tls.ca_file,
            "cert": tls.cert_file,
            "key": tls.key_file,
        },
        "bootstrap": {
            "dcs": {
                "ttl": timing.ttl,
                "loop_wait": timing.loop_wait,
                "retry_timeout": timing.retry_timeout,
                "maximum_lag_on_failover": 0,
                "synchronous_mode": True,
                "synchronous_mode_strict": False,
                # etcd unreachable from the leader (every member lost, or cut off from them): the
                # leader stays primary while it still reaches every member's Patroni, which then
                # cannot be promoted -- billing keeps writing through a consensus outage.
                "failsafe_mode": True,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": patroni_parameters,
                },
            },
            "initdb": [{"encoding": "UTF8"}, "data-checksums", {"auth-local": "peer"}, {"auth-host": "scram-sha-256"}],
            **(restore_bootstrap(archive_config, restore) if restore else {}),
            **({"post_bootstrap": post_bootstrap} if post_bootstrap else {}),
        },
        "postgresql": {
            "listen": f"{listen}:{pg_port}",
            "connect_address": f"{address}:{pg_port}",
            "data_dir": data_dir,
            "bin_dir": bin_dir,
            "pgpass": pgpass,
            "use_unix_socket": True,
            "authentication": {
                "superuser": {"username": "postgres", "password": passwords["superuser"]},
                "replication": {"username": REPLICATION_ROLE, "password": passwords["replication"], **peer_ssl},
                "rewind": {"username": REWIND_ROLE, "password": passwords["rewind"], **peer_ssl},
            },
            # Also here, not only in bootstrap.dcs (which is read once, when the cluster is created):
            # local parameters override the DCS's, so a redeployed file takes effect (Patroni keeps
            # the few that must match on every member -- wal_level, max_wal_senders... -- from the DCS).
            "parameters": patroni_parameters,
            "pg_hba": [line for line in hba.splitlines() if line and not line.startswith("#")],
            # An old primary that pg_rewind cannot bring back (e.g. it crashed first) is cloned
            # again from the leader by itself; what it had beyond the leader was never acknowledged.
            "remove_data_directory_on_rewind_failure": True,
            "remove_data_directory_on_diverged_timelines": True,
            "create_replica_methods": ["basebackup"],
            "basebackup": [{"checkpoint": "fast"}],
            **({"callbacks": {"on_start": on_role, "on_role_change": on_role}} if on_role else {}),
        },
        "tags": {"nofailover": nofailover, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def primary_conninfo(*, host: str, port: int, password: str, application: str, ca_file: str) -> str:
    return (
        f"host={host} port={port} user={REPLICATION_ROLE} password={password} "
        f"application_name={application} sslmode=verify-full sslrootcert={ca_file}"
    )


def pg_hba(*, peers: Sequence[str], app_cidrs: Sequence[str], app_peers: bool = False) -> str:
    """`peers`: CIDRs of the other regions (replication); `app_cidrs`: the container network.
    `app_peers`: the billing app in the other regions writes to this member too when it is primary
    (ADR 0007)."""
    lines = ["# TYPE  DATABASE  USER  ADDRESS  METHOD", "local all postgres peer"]
    lines += [f"hostssl replication {REPLICATION_ROLE} {cidr} scram-sha-256" for cidr in peers]
    # pg_rewind reads the new primary's files through the postgres database as its own role.
    lines += [f"hostssl postgres {REWIND_ROLE} {cidr} scram-sha-256" for cidr in peers]
    # +role: the app role and its login roles (ADR 26).
    lines += [f"hostssl {DATABASE} +{APP_ROLE} {cidr} scram-sha-256" for cidr in [*app_cidrs, *(peers if app_peers else ())]]
    # Anything else -- including any non-TLS connection -- matches no line and is refused.
    return "\n".join(lines) + "\n"


# --- WAL archiving for point-in-time recovery (pgBackRest, FSD §6.1) -----------------------------

STANZA = "ciris"
# A partly filled WAL segment is archived after at most this long: the PITR gap on a quiet database.
ARCHIVE_TIMEOUT_SECONDS = 300


def restore_command(archive_config: str, target: datetime.datetime | Literal["latest"]) -> str:
    """pgBackRest's restore of the whole cluster into this member's (empty) data directory: to the end
    of the archived WAL ("latest": on its newest timeline), or to just before `target` (an aware
    time) and promoted there. --delta: a bootstrap that failed half-way is picked up, not refused."""
    args = ["pgbackrest", f"--config={archive_config}", f"--stanza={STANZA}", "restore", "--delta"]
    if target != "latest":
        if target.tzinfo is None:
            raise ValueError(f"a restore target needs a time zone, got {target.isoformat()!r}")
        # pgBackRest's own time format (it picks the newest backup before it); PostgreSQL reads it too.
        at = target.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S" + (".%f" if target.microsecond else "") + "+00")
        args += ["--type=time", f"--target={at}", "--target-action=promote"]
    return shlex.join(args)


def restore_bootstrap(archive_config: str | None, target: datetime.datetime | Literal["latest"]) -> dict:
    """Patroni's custom bootstrap (bootstrap.method) for a cluster whose every member was lost: the
    member that creates the cluster restores it from the bucket; the others clone it as usual. The
    restored cluster keeps the old system id, so the stanza still matches and archiving goes on.
    keep_existing_recovery_conf: pgBackRest's recovery settings (restore_command, the target) stay
    until recovery ends; no_params: pgBackRest takes its data directory from its config."""
    if not archive_config:
        raise ValueError("a restore needs WAL archiving (a pgbackrest.conf: backup settings)")
    return {
        "method": "pgbackrest",
        "pgbackrest": {"command": restore_command(archive_config, target), "keep_existing_recovery_conf": True,
                       "no_params": True},
    }


def pgbackrest_conf(
    *,
    endpoint: str,
    bucket: str,
    region: str,
    retention_days: int,
    pg_path: str,
    socket_dir: str,
    pg_port: int = 5432,
    repo_path: str = "/pgbackrest",
    ca_file: str | None = None,
    spool_path: str = "/tmp/pgbackrest",
    queue_max_mb: int = wal_budget_mb(0),
) -> str:
    """pgBackRest's configuration for the stanza, repository in the same S3 bucket as the dumps.

    `endpoint`: an https:// URL (pgBackRest speaks only TLS to S3). Keys and the repository
    cipher passphrase are not in the file: pgbackrest_keys() (a file of the include path,
    PGBACKREST_CONFIG_INCLUDE_PATH), or PGBACKREST_REPO1_S3_KEY, PGBACKREST_REPO1_S3_KEY_SECRET and
    PGBACKREST_REPO1_CIPHER_PASS in the environment.
    Full backups are kept `retention_days` days, with the WAL needed to recover to any moment since.
    Archiving is asynchronous so that `queue_max_mb` bounds what waits while the bucket cannot be
    reached: beyond it pgBackRest drops WAL from the archive (a gap in point-in-time recovery until
    the next full backup) rather than fill the disk and stop every write (ADR 22).
    """
    url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if url.scheme != "https" or not url.hostname:
        raise ValueError(f"pgBackRest needs an https:// S3 endpoint, got {endpoint!r}")
    repo = {
        "repo1-type": "s3",
        "repo1-path": repo_path,
        "repo1-s3-endpoint": url.hostname,
        "repo1-s3-bucket": bucket,
        "repo1-s3-region": region,
        "repo1-s3-uri-style": "path",  # works on every S3-compatible store, bucket names with dots too
        "repo1-cipher-type": "aes-256-cbc",
        "repo1-retention-full-type": "time",
        "repo1-retention-full": str(retention_days),
        "compress-type": "zst",
        "start-fast": "y",
        "log-level-console": "info",
        "log-level-file": "off",
        "lock-path": spool_path,
        "spool-path": spool_path,
        "archive-async": "y",
        "archive-push-queue-max": f"{queue_max_mb}MiB",
    }
    if url.port:
        repo["repo1-storage-port"] = str(url.port)
    if ca_file:
        repo["repo1-storage-ca-file"] = ca_file
    stanza = {"pg1-path": pg_path, "pg1-socket-path": socket_dir, "pg1-port": str(pg_port), "pg1-user": "postgres"}
    section = lambda name, values: f"[{name}]\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    return section("global", repo) + "\n" + section(STANZA, stanza)


def pgbackrest_keys(*, access_key: str, secret_key: str, cipher_pass: str) -> str:
    """The repository's secrets as a pgBackRest config file for the include path: every pgBackRest
    run reads it afresh (archive_command runs one per WAL segment), so new bucket keys take effect
    without restarting the server (ADR 26)."""
    values = {"repo1-s3-key": access_key, "repo1-s3-key-secret": secret_key, "repo1-cipher-pass": cipher_pass}
    for key, value in values.items():
        if any(c in value for c in "\r\n"):
            raise ValueError(f"{key} holds a line break, which pgBackRest's config file cannot carry")
    return "[global]\n" + "".join(f"{k}={v}\n" for k, v in values.items())


# --- monitoring (FSD §9.5: lag > 10 s warning, replication broken critical) ----------------------

LAG_WARNING_SECONDS = 10

# Run on the primary; one row per connected standby. replay_lag is NULL when the primary has been
# idle (nothing to replay), which is no lag.
REPLICATION_STATUS_SQL = """
SELECT application_name,
       state,
       sync_state,
       COALESCE(EXTRACT(EPOCH FROM replay_lag), 0)::float8 AS lag_seconds,
       COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint AS lag_bytes
FROM pg_stat_replication
"""


EXPORTER_PORT = 9187  # payloads/postgres/pg_exporter.py: /metrics on the region's container network only
BACKUP_STATUS_FILE = "/var/run/postgresql/ciris-backup-status.json"  # on the socket volume both containers share


def exporter_conf(others: Sequence[str], *, socket_dir: str = "/var/run/postgresql", pg_port: int = 5432,
                  port: int = EXPORTER_PORT, listen: str = "0.0.0.0", backup_status: str = BACKUP_STATUS_FILE) -> str:
    """pg_exporter.py's config on one member: the replicas it expects while it is the primary (every
    other member: the same file whichever member is primary) and the one replication query."""
    return json.dumps({
        "replicas": [application_name(r) for r in others], "replication_sql": REPLICATION_STATUS_SQL.strip(),
        "socket_dir": socket_dir, "pg_port": pg_port, "port": port, "listen": listen, "backup_status": backup_status,
    }, indent=2) + "\n"


def replication_health(rows: Sequence[tuple], replicas: Sequence[str]) -> tuple[str, str]:
    """(severity, message) from REPLICATION_STATUS_SQL's rows: `critical` when an expected replica
    is not streaming or none is synchronous, `warning` when one lags more than 10 s, else `ok`."""
    by_name = {r[0]: r for r in rows}
    missing = [application_name(r) for r in replicas if application_name(r) not in by_name]
    if missing:
        return "critical", f"replication broken: {', '.join(missing)} not connected"
    not_streaming = [r[0] for r in rows if r[1] != "streaming"]
    if not_streaming:
        return "critical", f"replication broken: {', '.join(not_streaming)} not streaming"
    if replicas and not any(r[2] == "sync" for r in rows):
        return "critical", "no synchronous replica: commits are not protected"
    lagging = [f"{r[0]} {r[3]:.1f} s / {r[4]} bytes" for r in rows if r[3] > LAG_WARNING_SECONDS]
    if lagging:
        return "warning", f"replication lag over {LAG_WARNING_SECONDS} s: {', '.join(lagging)}"
    worst = max(rows, key=lambda r: r[3], default=None)
    return "ok", f"{len(rows)} replica(s) streaming" + (f", max lag {worst[3]:.1f} s / {worst[4]} bytes" if worst else "")
