"""ReplicatedPostgres: the billing database, primary in one region and synchronous replicas in others.

Each member region gets a Postgres container (payloads/postgres) with configs rendered by
components/postgres_config.py, a server certificate from the stack's small private CA (IP SANs:
the region's addresses, so replicas verify the primary with sslmode=verify-full), random passwords
kept as Pulumi secrets, and peer-only 5432 openings. Promotion stays manual (runbook).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_random as random
import pulumi_tls as tls

from components import cloud_init, postgres_config as pgc
from components.config import BackupSettings
from components.firewall import peer_rule
from components.postgres_config import standby_names
from components.region import Region
from components.witness import Witness
from components.services import (
    BACKUP_ADDRESS_SUFFIX, BILLING_ADDRESS_SUFFIX, ContainerSpec, env_file, payload_files,
)

PORT = 5432
CONFIG_MOUNT = "/etc/ciris-postgres"
RUN_DIR = "/run/ciris-postgres"  # where bootstrap.sh copies the files, owned by postgres
TLS_FILES = pgc.Tls(f"{RUN_DIR}/server.crt", f"{RUN_DIR}/server.key", f"{RUN_DIR}/ca.crt")
DATA_MOUNT = "/var/lib/postgresql/data"  # the volume; PGDATA inside it, so data moved aside stays on it
PGDATA = f"{DATA_MOUNT}/pgdata"
SOCKET_DIR = "/var/run/postgresql"
S3_CA_FILE = f"{CONFIG_MOUNT}/s3-ca.crt"  # backup.ca_cert, where both containers read it
SOCKET_VOLUME = "pgsocket"  # shared with the backup job, which talks to the server through it
TEN_YEARS = 24 * 365 * 10


@dataclass(frozen=True)
class ReplicatedPostgresArgs:
    primary: Region
    replicas: list[Region]
    backup: BackupSettings | None = None
    # Secrets from config: backup_encryption_key, backup_s3_access_key, backup_s3_secret_key.
    backup_secrets: dict[str, str | None] | None = None
    # The third host (a Node at a third provider), or None: the stack has no witness.
    witness: Witness | None = None


class ReplicatedPostgres(pulumi.ComponentResource):
    """Outputs: `summary` (the `database` stack output), `app_password` (secret), `ca_cert`."""

    def __init__(self, name: str, args: ReplicatedPostgresArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:ReplicatedPostgres", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        members = self._members = [args.primary, *args.replicas]
        replica_names = [r.spec.name for r in args.replicas]
        self._backup = args.backup
        self._backup_secrets = args.backup_secrets or {}
        self.witness = args.witness

        passwords = {
            role: random.RandomPassword(f"{name}-{role}-password", length=32, special=False, opts=child).result
            for role in ("superuser", "replication", "app")
        }
        self.app_password = passwords["app"]

        ca_key = tls.PrivateKey(f"{name}-ca-key", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
        ca = tls.SelfSignedCert(
            f"{name}-ca",
            private_key_pem=ca_key.private_key_pem,
            is_ca_certificate=True,
            subject=tls.SelfSignedCertSubjectArgs(common_name="ciris-bridge postgres CA"),
            validity_period_hours=TEN_YEARS,
            allowed_uses=["cert_signing", "crl_signing"],
            opts=child,
        )
        self.ca_cert = ca.cert_pem

        for member in members:
            peers = [(m.ipv4, m.ipv6) for m in members if m is not member]
            # Every member accepts every other one, so a promoted replica can feed the old primary.
            if peers:
                member.open("postgres", [peer_rule("postgres", PORT, peers, "Postgres replication from peer regions")])
            key = tls.PrivateKey(f"{name}-{member.spec.name}-key", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
            csr = tls.CertRequest(
                f"{name}-{member.spec.name}-csr",
                private_key_pem=key.private_key_pem,
                subject=tls.CertRequestSubjectArgs(common_name=f"postgres.{member.domain}"),
                ip_addresses=[member.ipv4, member.ipv6],
                opts=child,
            )
            cert = tls.LocallySignedCert(
                f"{name}-{member.spec.name}-cert",
                cert_request_pem=csr.cert_request_pem,
                ca_private_key_pem=ca_key.private_key_pem,
                ca_cert_pem=ca.cert_pem,
                validity_period_hours=TEN_YEARS,
                allowed_uses=["server_auth", "client_auth", "digital_signature", "key_encipherment"],
                opts=child,
            )
            self._deploy_member(member, args.primary, replica_names, passwords, key.private_key_pem, cert.cert_pem)

        if args.backup:
            missing = [k for k in ("backup_encryption_key", "backup_s3_access_key", "backup_s3_secret_key") if not self._backup_secrets.get(k)]
            if missing:
                pulumi.log.warn(f"postgres: backup is configured but {', '.join(f'ciris-bridge:{k}' for k in missing)} "
                                f"not set; the daily dump and WAL archiving will fail (pulumi config set --secret ciris-bridge:{missing[0]} ...)", self)
            self._backup_job(args.primary, passwords["app"])

        self.summary = {
            "primary": args.primary.spec.name,
            "replicas": replica_names,
            "mode": "synchronous" if args.replicas else "standalone",
            "synchronous_standby_names": standby_names(replica_names),
            "port": PORT,
            "backup": (
                {"bucket": args.backup.bucket, "retention_days": args.backup.retention_days, "hour_utc": args.backup.hour_utc}
                if args.backup
                else None
            ),
        }
        self.register_outputs({"summary": self.summary})

    def _deploy_member(self, member: Region, primary: Region, replica_names, passwords, key_pem, cert_pem) -> None:
        is_primary = member is primary
        role = "primary" if is_primary else "replica"
        slot = pgc.application_name(member.spec.name)
        archive = f"{RUN_DIR}/pgbackrest.conf" if self._backup else None
        if is_primary:
            conf = pulumi.Output.from_input(
                pgc.postgresql_conf(role="primary", replicas=replica_names, tls=TLS_FILES, archive_config=archive)
            )
            shown_conf = conf
        else:
            def replica_conf(a, password="[secret]"):
                conninfo = pgc.primary_conninfo(host=a, port=PORT, password=password, application=slot, ca_file=TLS_FILES.ca_file)
                return pgc.postgresql_conf(
                    role="replica", replicas=replica_names, tls=TLS_FILES, primary_conninfo=conninfo, slot=slot, archive_config=archive
                )

            conf = pulumi.Output.all(primary.ipv4, passwords["replication"]).apply(lambda a: replica_conf(a[0], a[1]))
            shown_conf = primary.ipv4.apply(replica_conf)
        # Replication comes from the other members (any of them may become primary). On this host only
        # billing's and the backup job's fixed addresses: never the whole network, whose gateway is
        # where Docker's proxy makes IPv6 clients appear from.
        app = [f"{member.network.address(s)}/32" for s in (BILLING_ADDRESS_SUFFIX, BACKUP_ADDRESS_SUFFIX)]
        hba = pulumi.Output.all(*[a for m in self._peers_of(member) for a in (m.ipv4, m.ipv6)]).apply(
            lambda addrs: pgc.pg_hba(peers=[f"{a}/{128 if ':' in a else 32}" for a in addrs], app_cidrs=app, app_peers=True)
        )
        env = pulumi.Output.all(passwords["superuser"], passwords["replication"], passwords["app"], primary.ipv4).apply(
            lambda a: env_file(
                {
                    "ROLE": role,
                    "POSTGRES_PASSWORD": a[0],
                    "REPLICATION_PASSWORD": a[1],
                    "BILLING_PASSWORD": a[2],
                    "PRIMARY_HOST": a[3],
                    "PRIMARY_PORT": PORT,
                    "SLOT": slot,
                    "SLOTS": " ".join(pgc.application_name(r) for r in replica_names),
                    **self._pgbackrest_env(),
                }
            )
        )
        archive_files = {"postgres/etc/pgbackrest.conf": self._pgbackrest_conf()} if self._backup else {}
        if self._backup and self._backup.ca_cert:
            archive_files["postgres/etc/s3-ca.crt"] = self._backup.ca_cert
        member.add_service(
            ContainerSpec(
                name="postgres",
                image="ciris-postgres:local",
                build="./postgres",
                ports=(f"{PORT}:{PORT}/tcp",),
                # The volume holds PGDATA's parent, so a rebuilt replica keeps the old data beside the new.
                volumes=(f"{self._data(member)}:{DATA_MOUNT}", f"{SOCKET_VOLUME}:{SOCKET_DIR}", f"./postgres/etc:{CONFIG_MOUNT}:ro"),
                env_file="./postgres/env",
            ),
            {
                **payload_files("postgres"),
                **archive_files,
                "postgres/env": pulumi.Output.secret(env),
                "postgres/etc/postgresql.conf": pulumi.Output.secret(conf),
                "postgres/etc/pg_hba.conf": hba,
                "postgres/etc/server.crt": cert_pem,
                "postgres/etc/server.key": pulumi.Output.secret(key_pem),
                "postgres/etc/ca.crt": self.ca_cert,
            },
            private=dict.fromkeys(["postgres/env", "postgres/etc/postgresql.conf", "postgres/etc/server.key"], 0),
            shown={
                "postgres/env": "[secret: ROLE, passwords, PRIMARY_HOST, SLOT(S), pgBackRest keys]\n",
                "postgres/etc/postgresql.conf": shown_conf,
                "postgres/etc/server.key": "[secret]\n",
            },
        )

    def _backup_job(self, primary: Region, app_password) -> None:
        """The daily pg_dump job runs beside the primary (it moves with the primary role)."""
        backup, secrets = self._backup, self._backup_secrets
        dsn = (
            f"host=postgres port={PORT} user={pgc.APP_ROLE} dbname={pgc.DATABASE} "
            f"sslmode=verify-ca sslrootcert={CONFIG_MOUNT}/ca.crt"  # certificates name IPs, not 'postgres'
        )

        def env(password: str) -> str:
            return env_file({
                "DATABASE_URL": f"{dsn} password={password}",
                "BACKUP_S3_ENDPOINT": backup.s3_endpoint,
                "BACKUP_S3_BUCKET": backup.bucket,
                "BACKUP_S3_REGION": backup.region,
                "BACKUP_RETENTION_DAYS": backup.retention_days,
                "BACKUP_HOUR_UTC": backup.hour_utc,
                **({"AWS_CA_BUNDLE": S3_CA_FILE} if backup.ca_cert else {}),  # boto3's trust for the S3 endpoint
                "BACKUP_ENCRYPTION_KEY": secrets.get("backup_encryption_key") or "",
                "BACKUP_S3_ACCESS_KEY": secrets.get("backup_s3_access_key") or "",
                "BACKUP_S3_SECRET_KEY": secrets.get("backup_s3_secret_key") or "",
                **self._pgbackrest_env(),
            })

        primary.add_service(
            ContainerSpec(
                name="backup",
                image="ciris-postgres:local",
                entrypoint=("tini", "--", "sh", "/usr/local/lib/ciris/backup-loop.sh"),
                address_suffix=BACKUP_ADDRESS_SUFFIX,
                # pgBackRest reads the data directory (same path as the server's) and asks the
                # server for backup start/stop through the shared socket.
                volumes=(f"{self._data(primary)}:{DATA_MOUNT}:ro", f"{SOCKET_VOLUME}:{SOCKET_DIR}", f"./postgres/etc:{CONFIG_MOUNT}:ro"),
                env_file="./postgres/backup.env",
            ),
            {"postgres/backup.env": pulumi.Output.secret(pulumi.Output.from_input(app_password).apply(env))},
            private={"postgres/backup.env": 0},
            shown={"postgres/backup.env": "[secret: DATABASE_URL, BACKUP_* settings and keys, pgBackRest keys]\n"},
        )

    def _pgbackrest_conf(self) -> str:
        b = self._backup
        return pgc.pgbackrest_conf(
            endpoint=b.s3_endpoint, bucket=b.bucket, region=b.region, retention_days=b.retention_days,
            pg_path=PGDATA, socket_dir=SOCKET_DIR, pg_port=PORT, ca_file=S3_CA_FILE if b.ca_cert else None,
        )

    def _pgbackrest_env(self) -> dict[str, str]:
        """The repository keys; the WAL cipher passphrase is the backup encryption key."""
        if not self._backup:
            return {}
        s = self._backup_secrets
        return {
            "PGBACKREST_REPO1_S3_KEY": s.get("backup_s3_access_key") or "",
            "PGBACKREST_REPO1_S3_KEY_SECRET": s.get("backup_s3_secret_key") or "",
            "PGBACKREST_REPO1_CIPHER_PASS": s.get("backup_encryption_key") or "",
        }

    @staticmethod
    def _data(member: Region) -> str:
        return f"{cloud_init.DATA_MOUNT}/postgres" if member.spec.volume_gb else "pgdata"

    def _peers_of(self, member: Region) -> list[Region]:
        return [m for m in self._members if m is not member]
