"""ReplicatedPostgres: the billing database on Patroni, one member per database region, a
synchronous standby, and automatic failover and degrade (ADR 14).

Each member region gets a Postgres container (payloads/postgres) in which Patroni runs PostgreSQL
with the configuration rendered by components/postgres_config.py, and an etcd member
(components/consensus.py); the witness, when the stack has one, runs a third etcd member. Every
host gets a certificate from the stack's small private CA (IP SANs: its addresses, so every peer
connection is sslmode=verify-full; DNS SAN `postgres`: billing on the same host verifies it too),
random passwords kept as Pulumi secrets, and peer-only openings: 5432 (replication, billing,
pg_rewind) and 8008 (Patroni's API) between database members, 2379/2380 (etcd) between every host
of the consensus. `postgres: primary` in config is where the cluster is created; afterwards
Patroni decides who is primary, and a change of the declared primary is a Patroni switchover.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pulumi
import pulumi_command as command
import pulumi_random as random
import pulumi_tls as tls

from components import cloud_init, consensus, deploy, postgres_config as pgc
from components.config import BackupSettings
from components.firewall import peer_rule
from components.node import Node
from components.region import Region
from components.witness import Witness
from components.services import (
    BACKUP_ADDRESS_SUFFIX, BILLING_ADDRESS_SUFFIX, BILLING_TWIN_ADDRESS_SUFFIX, ContainerSpec, env_file, payload_files,
)

PORT = 5432
API_PORT = 8008  # Patroni's REST API: the members ask each other for their state before a promotion
CONFIG_MOUNT = "/etc/ciris-postgres"
RUN_DIR = "/run/ciris-postgres"  # where start.sh copies the files, owned by postgres
TLS_FILES = pgc.Tls(f"{RUN_DIR}/server.crt", f"{RUN_DIR}/server.key", f"{RUN_DIR}/ca.crt")
DATA_MOUNT = "/var/lib/postgresql/data"  # the volume; PGDATA inside it, so data moved aside stays on it
PGDATA = f"{DATA_MOUNT}/pgdata"
SOCKET_DIR = "/var/run/postgresql"
S3_CA_FILE = f"{CONFIG_MOUNT}/s3-ca.crt"  # backup.ca_cert, where both containers read it
SOCKET_VOLUME = "pgsocket"  # shared with the backup job, which talks to the server through it
POST_BOOTSTRAP = "sh /usr/local/lib/ciris/post-bootstrap.sh"
# Billing's logins and the bucket's keys change without a restart (ADR 26): files in the mounted
# config directory that reload.sh, run by every deploy, puts where postgres reads them.
RELOAD = ("sh", "/usr/local/lib/ciris/reload.sh")
ON_ROLE = "sh /usr/local/lib/ciris/on-role.sh"  # Patroni's callback: a new leader applies the logins
PGBACKREST_INCLUDE = f"{RUN_DIR}/pgbackrest.d"  # reload.sh copies pgbackrest-keys.conf there
TEN_YEARS = 24 * 365 * 10
PASSWORD_ROLES = ("superuser", "replication", "rewind", "api")


@dataclass(frozen=True)
class ReplicatedPostgresArgs:
    primary: Region
    replicas: list[Region]
    backup: BackupSettings | None = None
    # Secrets from config: backup_encryption_key, backup_s3_access_key, backup_s3_secret_key.
    backup_secrets: dict[str, str | None] | None = None
    # The third host (a Node at a third provider), or None: the stack has no witness.
    witness: Witness | None = None
    timing: pgc.HaTiming = pgc.HaTiming()
    logins: tuple[str, ...] = ("1",)  # services.database_logins: billing's login roles (ADR 26)
    login: str = "1"  # services.database_login: the one billing and the backup job use


class ReplicatedPostgres(pulumi.ComponentResource):
    """Outputs: `summary` (the `database` stack output), `app_user` and `app_password` (secret): the
    login billing uses, `ca_cert`."""

    def __init__(self, name: str, args: ReplicatedPostgresArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:ReplicatedPostgres", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        members = self._members = [args.primary, *args.replicas]
        self._backup = args.backup
        self._backup_secrets = args.backup_secrets or {}
        self._timing = args.timing
        self._login_names = args.logins
        self.witness = args.witness
        # etcd: one member per provider with a witness; without one a single member beside the
        # declared primary (the replica's loss still degrades by itself; the primary's needs a person).
        # Peers and consensus hosts in a fixed order (by name), never primary first: moving
        # `postgres: primary` must re-render no member's files, or every container restarts mid-switchover.
        self._by_name = sorted(members, key=lambda m: m.spec.name)
        self._consensus: list[Node] = [args.witness, *self._by_name] if args.witness else [args.primary]

        passwords = {
            role: random.RandomPassword(f"{name}-{role}-password", length=32, special=False, opts=child).result
            for role in PASSWORD_ROLES
        }
        # Billing's logins: "1" keeps the resource name of the app role's password from before logins rotated.
        logins = {
            login: random.RandomPassword(f"{name}-app-password" + ("" if login == "1" else f"-{login}"),
                                         length=32, special=False, opts=child).result
            for login in args.logins
        }
        self.app_user = pgc.login_role(args.login)
        self.app_password = logins[args.login]
        # The verifiers' salts are keyed by a secret the database hosts hold anyway (Patroni's superuser password).
        self._logins_file = pulumi.Output.secret(pulumi.Output.all(pulumi.Output.all(**logins), passwords["superuser"]).apply(
            lambda a: pgc.logins_json(a[0], a[1])))

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
        hosts = [*members, *([args.witness] if args.witness else [])]
        certs = {node.spec.name: self._certificate(name, node, ca_key, ca, child) for node in hosts}

        db_peers = lambda node: [(m.ipv4, m.ipv6) for m in self._by_name if m is not node]  # noqa: E731
        for node in hosts:
            opening = []
            if node in members and len(members) > 1:
                # Replication, billing and pg_rewind; Patroni's API: every member may become primary.
                opening += [peer_rule("postgres", PORT, db_peers(node), "Postgres from the other database members"),
                            peer_rule("patroni", API_PORT, db_peers(node), "Patroni API from the other database members")]
            if node in self._consensus:
                others = [(m.ipv4, m.ipv6) for m in self._consensus if m is not node]
                clients = db_peers(node)  # Patroni on the other members; its own comes from this host
                if clients:
                    opening.append(peer_rule("etcd-client", consensus.CLIENT_PORT, clients, "etcd clients: Patroni on the database members"))
                if others:
                    opening.append(peer_rule("etcd-peer", consensus.PEER_PORT, others, "etcd peers: the consensus members"))
            if opening:
                node.open("database", opening)
        for node in self._consensus:
            self._deploy_etcd(node, certs[node.spec.name])
        for member in members:
            self._deploy_member(member, passwords, certs[member.spec.name])

        if args.backup:
            missing = [k for k in ("backup_encryption_key", "backup_s3_access_key", "backup_s3_secret_key") if not self._backup_secrets.get(k)]
            if missing:
                pulumi.log.warn(f"postgres: backup is configured but {', '.join(f'ciris-bridge:{k}' for k in missing)} "
                                f"not set; the daily dump and WAL archiving will fail (pulumi config set --secret ciris-bridge:{missing[0]} ...)", self)
            for member in members:  # each job works only while its member is the primary
                self._backup_job(member, self.app_password)

        self.summary = {
            "engine": "patroni+etcd",
            "primary": args.primary.spec.name,  # where the cluster was created; Patroni moves it
            "replicas": [r.spec.name for r in args.replicas],
            "members": [pgc.member_name(m.spec.name) for m in members],
            "consensus": self.consensus_hosts,
            "failover": "automatic" if args.witness else "degrade only (no witness: promotion is manual)",
            "mode": "synchronous" if args.replicas else "standalone",
            "port": PORT,
            "backup": (
                {"bucket": args.backup.bucket, "retention_days": args.backup.retention_days, "hour_utc": args.backup.hour_utc,
                 **({"restore": _shown(args.backup.restore.target_time)} if args.backup.restore else {})}
                if args.backup
                else None
            ),
        }
        self.register_outputs({"summary": self.summary})

    @property
    def consensus_hosts(self) -> list[str]:
        """The hosts that run an etcd member."""
        return [n.spec.name for n in self._consensus]

    def declare_primary(self, after: list[pulumi.Resource]) -> command.remote.Command:
        """After the deploys: hand the primary role to the region config declares, when that changed
        (a Patroni switchover; a no-op when it already leads, e.g. on the first deploy)."""
        member = pgc.member_name(self._members[0].spec.name)
        return command.remote.Command(
            f"{self._name}-declared-primary",
            connection=self._members[0].connection,
            create=deploy.remote(deploy.SWITCHOVER, cloud_init.BUNDLE_DIR, member),
            triggers=[member],
            opts=pulumi.ResourceOptions(parent=self, depends_on=after),
        )

    @staticmethod
    def _certificate(name: str, node: Node, ca_key, ca, child) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
        """(certificate, key) for one host: server and client (etcd and Patroni verify both ways)."""
        key = tls.PrivateKey(f"{name}-{node.spec.name}-key", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
        csr = tls.CertRequest(
            f"{name}-{node.spec.name}-csr",
            private_key_pem=key.private_key_pem,
            subject=tls.CertRequestSubjectArgs(common_name=f"{node.spec.name} (ciris-bridge database)"),
            ip_addresses=[node.ipv4, node.ipv6],
            dns_names=["postgres"],  # billing on the same host connects by the container's name
            opts=child,
        )
        cert = tls.LocallySignedCert(
            f"{name}-{node.spec.name}-cert",
            cert_request_pem=csr.cert_request_pem,
            ca_private_key_pem=ca_key.private_key_pem,
            ca_cert_pem=ca.cert_pem,
            validity_period_hours=TEN_YEARS,
            allowed_uses=["server_auth", "client_auth", "digital_signature", "key_encipherment"],
            opts=child,
        )
        return cert.cert_pem, key.private_key_pem

    def _deploy_etcd(self, node: Node, cert) -> None:
        addresses = pulumi.Output.all(*[n.ipv4 for n in self._consensus])

        def conf(addrs: list[str]) -> str:
            members = [consensus.Member(n.spec.name, a) for n, a in zip(self._consensus, addrs)]
            me = members[self._consensus.index(node)]
            return consensus.etcd_conf(me, members)

        node.add_service(
            consensus.container(),
            {
                **payload_files("etcd"),
                "etcd/etc/etcd.conf.yml": addresses.apply(conf),
                "etcd/etc/server.crt": cert[0],
                "etcd/etc/server.key": pulumi.Output.secret(cert[1]),
                "etcd/etc/ca.crt": self.ca_cert,
            },
            private={"etcd/etc/server.key": 0},
            shown={"etcd/etc/server.key": "[secret]\n"},
        )

    def _deploy_member(self, member: Region, passwords, cert) -> None:
        archive = f"{RUN_DIR}/pgbackrest.conf" if self._backup else None
        # Billing's and the backup job's fixed addresses on this host, never the whole network (whose
        # gateway is where Docker's proxy makes IPv6 clients appear from); the other members' hosts.
        app = [f"{member.network.address(s)}/32"
               for s in (BILLING_ADDRESS_SUFFIX, BILLING_TWIN_ADDRESS_SUFFIX, BACKUP_ADDRESS_SUFFIX)]
        peers = pulumi.Output.all(*[a for m in self._peers_of(member) for a in (m.ipv4, m.ipv6)]).apply(
            lambda addrs: [f"{a}/{128 if ':' in a else 32}" for a in addrs])
        hba = peers.apply(lambda p: pgc.pg_hba(peers=p, app_cidrs=app, app_peers=True))
        etcd_hosts = pulumi.Output.all(*[n.ipv4 for n in self._consensus]).apply(
            lambda addrs: [f"{a}:{consensus.CLIENT_PORT}" for a in addrs])

        def patroni(a, secret: bool = True) -> str:
            address, hosts, hba_text, *pw = a
            shown = dict(zip(PASSWORD_ROLES, pw)) if secret else dict.fromkeys(PASSWORD_ROLES, "[secret]")
            return pgc.patroni_yml(
                name=pgc.member_name(member.spec.name), address=address, etcd_hosts=hosts, tls=TLS_FILES,
                passwords=shown, data_dir=PGDATA, socket_dir=SOCKET_DIR, hba=hba_text, archive_config=archive,
                post_bootstrap=POST_BOOTSTRAP, on_role=ON_ROLE, timing=self._timing, wal_budget=pgc.wal_budget_mb(member.spec.volume_gb),
                # A replacement stack's first deploy (ADR 24): the cluster is created from the bucket.
                restore=self._backup.restore.target_time if self._backup and self._backup.restore else None,
                # Without a witness the consensus lives beside the declared primary: only it may lead.
                nofailover=self.witness is None and member is not self._members[0])

        inputs = [member.ipv4, etcd_hosts, hba]
        conf = pulumi.Output.all(*inputs, *[passwords[r] for r in PASSWORD_ROLES]).apply(patroni)
        shown_conf = pulumi.Output.all(*inputs).apply(lambda a: patroni([*a], secret=False))
        archive_files = {"postgres/etc/pgbackrest.conf": self._pgbackrest_conf(member)} if self._backup else {}
        live = {"postgres/etc/logins.json": self._logins_file}
        if self._backup:
            s = self._backup_secrets
            live["postgres/etc/pgbackrest-keys.conf"] = pulumi.Output.secret(pgc.pgbackrest_keys(
                access_key=s.get("backup_s3_access_key") or "", secret_key=s.get("backup_s3_secret_key") or "",
                cipher_pass=s.get("backup_encryption_key") or ""))
        if self._backup and self._backup.ca_cert:
            archive_files["postgres/etc/s3-ca.crt"] = self._backup.ca_cert
        member.add_service(
            ContainerSpec(
                name="postgres",
                image="ciris-postgres:local",
                build="./postgres",
                ports=(f"{PORT}:{PORT}/tcp", f"{API_PORT}:{API_PORT}/tcp"),
                volumes=(f"{self._data(member)}:{DATA_MOUNT}", f"{SOCKET_VOLUME}:{SOCKET_DIR}", f"./postgres/etc:{CONFIG_MOUNT}:ro"),
                environment={"PGBACKREST_CONFIG_INCLUDE_PATH": PGBACKREST_INCLUDE} if self._backup else {},
                reload=RELOAD,
            ),
            {
                **payload_files("postgres"),
                **archive_files,
                "postgres/etc/patroni.yml": pulumi.Output.secret(conf),
                "postgres/etc/server.crt": cert[0],
                "postgres/etc/server.key": pulumi.Output.secret(cert[1]),
                "postgres/etc/ca.crt": self.ca_cert,
                # pg_exporter.py: every other member is a replica it expects while it is the primary.
                "postgres/etc/exporter.json": pgc.exporter_conf([m.spec.name for m in self._by_name if m is not member]),
            },
            private=dict.fromkeys(["postgres/etc/patroni.yml", "postgres/etc/server.key", *live], 0),
            shown={
                "postgres/etc/patroni.yml": shown_conf,
                "postgres/etc/server.key": "[secret]\n",
                "postgres/etc/logins.json": f"[secret: SCRAM verifiers of {', '.join(map(pgc.login_role, self._login_names))}]\n",
                **({"postgres/etc/pgbackrest-keys.conf": "[secret: the bucket's keys, the archive's cipher passphrase]\n"}
                   if self._backup else {}),
            },
            live=live,
        )

    def _backup_job(self, member: Region, app_password) -> None:
        """The backup job beside every member: it works only while its member is the primary, so the
        backups follow the primary wherever Patroni moves it."""
        backup, secrets = self._backup, self._backup_secrets
        dsn = (
            f"host=postgres port={PORT} user={self.app_user} dbname={pgc.DATABASE} "
            f"sslmode=verify-full sslrootcert={CONFIG_MOUNT}/ca.crt"
        )

        def env(password: str) -> str:
            return env_file({
                "DATABASE_URL": f"{dsn} password={password}",
                "BACKUP_S3_ENDPOINT": backup.s3_endpoint,
                "BACKUP_S3_BUCKET": backup.bucket,
                "BACKUP_S3_REGION": backup.region,
                "BACKUP_RETENTION_DAYS": backup.retention_days,
                "BACKUP_HOUR_UTC": backup.hour_utc,
                "BACKUP_STATUS_FILE": pgc.BACKUP_STATUS_FILE,  # on the socket volume: the exporter beside the server reads it
                **({"AWS_CA_BUNDLE": S3_CA_FILE} if backup.ca_cert else {}),  # boto3's trust for the S3 endpoint
                "BACKUP_ENCRYPTION_KEY": secrets.get("backup_encryption_key") or "",
                "BACKUP_S3_ACCESS_KEY": secrets.get("backup_s3_access_key") or "",
                "BACKUP_S3_SECRET_KEY": secrets.get("backup_s3_secret_key") or "",
                **self._pgbackrest_env(),
            })

        member.add_service(
            ContainerSpec(
                name="backup",
                image="ciris-postgres:local",
                entrypoint=("tini", "--", "sh", "/usr/local/lib/ciris/backup-loop.sh"),
                # Not the image's check (is *this member's* server up: a replica's may be cloning for
                # minutes) but is the loop alive. Whether backups happen is for the alerts (#16).
                healthcheck=("CMD", "sh", "/usr/local/lib/ciris/backup-loop.sh", "health"),
                address_suffix=BACKUP_ADDRESS_SUFFIX,
                # pgBackRest reads the data directory (same path as the server's) and asks the
                # server for backup start/stop through the shared socket.
                volumes=(f"{self._data(member)}:{DATA_MOUNT}:ro", f"{SOCKET_VOLUME}:{SOCKET_DIR}", f"./postgres/etc:{CONFIG_MOUNT}:ro"),
                env_file="./postgres/backup.env",
            ),
            {"postgres/backup.env": pulumi.Output.secret(pulumi.Output.from_input(app_password).apply(env))},
            private={"postgres/backup.env": 0},
            shown={"postgres/backup.env": "[secret: DATABASE_URL, BACKUP_* settings and keys, pgBackRest keys]\n"},
        )

    def _pgbackrest_conf(self, member: Region) -> str:
        b = self._backup
        return pgc.pgbackrest_conf(
            endpoint=b.s3_endpoint, bucket=b.bucket, region=b.region, retention_days=b.retention_days,
            pg_path=PGDATA, socket_dir=SOCKET_DIR, pg_port=PORT, ca_file=S3_CA_FILE if b.ca_cert else None,
            queue_max_mb=pgc.wal_budget_mb(member.spec.volume_gb),
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
        return [m for m in self._by_name if m is not member]


def _shown(target) -> str:
    """The restore target as the database output shows it (a time in UTC, or "latest")."""
    return target if target == "latest" else target.astimezone(datetime.timezone.utc).isoformat()
