"""The billing database as the program deploys it (ADR 14): Patroni running PostgreSQL in every
database region, etcd on every consensus host, the backup job beside every member -- checked on
the offline plan's rendered files and on the bundles the deploys really ship."""

from __future__ import annotations

import json

import pytest
import yaml

from components import consensus, mocks, plan, postgres_config as pgc
from tests.conftest import REPO, stack_raw, third_region, without_witness
from tests.conftest import run_plan as run
from tests.infra import expected

P = "ciris-bridge"
TLS = {"cacert": "/run/ciris-postgres/ca.crt", "cert": "/run/ciris-postgres/server.crt", "key": "/run/ciris-postgres/server.key"}


def declared(raw: dict, primary: str) -> dict:
    for r in raw[f"{P}:regions"]:  # a declared switchover is this edit plus `pulumi up`
        r["postgres"] = "primary" if r["name"] == primary else "replica"
    return raw


def patroni(p: plan.Plan, host: str) -> dict:
    return yaml.safe_load(p.artifacts[f"{host}/postgres/etc/patroni.yml"])


def hba_lines(p: plan.Plan, host: str, raw: dict) -> list[str]:
    """The pg_hba a member must have: replication and pg_rewind from the other members' host
    addresses, billing from its own billing, billing's twin (while a deploy replaces billing) and
    backup container addresses and the other members' hosts (their billing writes here when this
    member is primary); nothing else."""
    members, _ = expected.topology(raw)
    ips = expected.addresses(p)
    # The peers in name order, whichever is primary (test_a_declared_switchover_rerenders_no_database_file).
    peers = [c for m in sorted(members) if m != host for c in (f"{ips[m][0]}/32", f"{ips[m][1]}/128")]
    index = [r["name"] for r in raw[f"{P}:regions"]].index(host)
    app = [f"172.30.{index}.10/32", f"172.30.{index}.13/32", f"172.30.{index}.11/32"]
    return ["local all postgres peer",
            *[f"hostssl replication replicator {c} scram-sha-256" for c in peers],
            *[f"hostssl postgres rewinder {c} scram-sha-256" for c in peers],
            *[f"hostssl cirisbilling +billing {c} scram-sha-256" for c in [*app, *peers]]]  # billing and its login roles


# --- Patroni on every member ----------------------------------------------------------------------


@pytest.mark.parametrize("stack,witness,third", [("production", True, False), ("staging", True, False),
                                                 ("production", False, False), ("production", True, True)],
                         ids=["production", "staging", "no-witness", "three-regions"])
def test_every_member_runs_patroni_with_its_rendered_configuration(stack, witness, third):
    raw, secret_keys = stack_raw(stack) if witness else without_witness(stack)
    if third:
        third_region(raw)
    p = run(stack, raw, secret_keys)
    members, consensus_hosts = expected.topology(raw)
    ips = expected.addresses(p)
    etcd_hosts = sorted(f"{ips[h][0]}:2379" for h in consensus_hosts)
    for host in members:
        doc = patroni(p, host)
        ipv4 = ips[host][0]
        assert (doc["scope"], doc["namespace"], doc["name"]) == ("ciris-billing", "/ciris/", host.replace("-", "_"))
        assert doc["restapi"]["connect_address"] == f"{ipv4}:8008" and doc["restapi"]["listen"] == "0.0.0.0:8008"
        assert doc["postgresql"]["connect_address"] == f"{ipv4}:5432" and doc["postgresql"]["listen"] == "0.0.0.0:5432"
        # The consensus: every consensus host's IPv4 client URL, over mutual TLS with the stack's CA.
        assert sorted(doc["etcd"]["hosts"]) == etcd_hosts and len(doc["etcd"]["hosts"]) == len(consensus_hosts)
        assert doc["etcd"] == {"hosts": doc["etcd"]["hosts"], "protocol": "https", **TLS}
        dcs = doc["bootstrap"]["dcs"]
        # Synchronous without strict: a lost standby is dropped, only a synchronous one is promoted.
        assert dcs["synchronous_mode"] is True and dcs["synchronous_mode_strict"] is False
        assert dcs["failsafe_mode"] is True  # a consensus outage does not stop writes (tests/postgres drill)
        assert dcs["maximum_lag_on_failover"] == 0
        assert dcs["postgresql"]["use_pg_rewind"] is True and dcs["postgresql"]["use_slots"] is True
        assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (20, 4, 8)
        # Replication and pg_rewind verify the leader's certificate against the stack's CA.
        auth = doc["postgresql"]["authentication"]
        for role, user in (("replication", "replicator"), ("rewind", "rewinder")):
            assert auth[role] == {"username": user, "password": "[secret]", "sslmode": "verify-full",
                                  "sslrootcert": "/run/ciris-postgres/ca.crt"}
        assert auth["superuser"] == {"username": "postgres", "password": "[secret]"}
        assert doc["restapi"]["authentication"] == {"username": "patroni", "password": "[secret]"}
        assert doc["postgresql"]["pg_hba"] == hba_lines(p, host, raw)
        assert doc["postgresql"]["data_dir"] == "/var/lib/postgresql/data/pgdata"
        # Patroni's API and Postgres published on the host's own addresses (the firewall is peer-only).
        pg = yaml.safe_load(p.artifacts[f"{host}/compose.yaml"])["services"]["postgres"]
        assert sorted(pg["ports"]) == sorted(f"{a}:{port}:{port}/tcp" for port in (5432, 8008)
                                             for a in (ipv4, f"[{ips[host][1]}]"))
        # No secret in its environment or an env file (ADR 26): pgBackRest reads its keys from an included file.
        backup = f"{P}:backup" in raw
        assert pg["image"] == "ciris-postgres:local" and pg.get("environment") == (
            {"PGBACKREST_CONFIG_INCLUDE_PATH": "/run/ciris-postgres/pgbackrest.d"} if backup else None)
        # The data on the region's volume when it has one, mounted as PGDATA's parent.
        data = "/srv/ciris/data/postgres" if next(r for r in raw[f"{P}:regions"] if r["name"] == host).get("volume_gb") else "pgdata"
        assert pg["volumes"] == [f"{data}:/var/lib/postgresql/data", "pgsocket:/var/run/postgresql", "./postgres/etc:/etc/ciris-postgres:ro"]
    assert {h for h in ips if f"{h}/postgres/etc/patroni.yml" in p.artifacts} == set(members)


def test_server_parameters_reach_patroni_unquoted():
    """Patroni quotes every value it writes to postgresql.conf: a value quoted here would reach
    PostgreSQL with its quotes (an enum dropped as invalid, an archive_command no shell can run)."""
    p = run("production")
    for host in ("us-east", "eu-west"):
        params = patroni(p, host)["bootstrap"]["dcs"]["postgresql"]["parameters"]
        assert not [k for k, v in params.items() if str(v).startswith("'")], params
        assert params["ssl"] == "on" and params["ssl_min_protocol_version"] == "TLSv1.2"
        assert params["password_encryption"] == "scram-sha-256"
        assert params["synchronous_commit"] == "on" and params["wal_log_hints"] == "on"
        assert params["log_statement"] == "none" and params["log_min_duration_statement"] == "-1"
        # WAL archiving (pgBackRest) on every member, so whichever Patroni promotes keeps archiving.
        assert params["archive_mode"] == "on"
        assert params["archive_command"] == "pgbackrest --config=/run/ciris-postgres/pgbackrest.conf --stanza=ciris archive-push %p"
        assert "synchronous_standby_names" not in params  # Patroni's to manage (synchronous_mode)
        # The same in the member's local parameters, which override the DCS's: bootstrap.dcs is read
        # once, when the cluster is created, so only these make a redeployed change take effect.
        assert patroni(p, host)["postgresql"]["parameters"] == params
        assert params["ssl_cert_file"] == TLS["cert"] and params["unix_socket_directories"] == "/var/run/postgresql"
    staging = patroni(run("staging"), "us-east")["bootstrap"]["dcs"]["postgresql"]["parameters"]
    assert not {"archive_mode", "archive_command"} & set(staging)  # no backup configured, no archiving


def test_passwords_are_only_in_the_secret_files():
    p = run("production")
    dumped = json.dumps(p.as_json()) + json.dumps(p.artifacts)
    assert "mock-postgres-" not in dumped and "BEGIN PRIVATE KEY" not in dumped
    for host in ("us-east", "eu-west"):
        shipped = expected.bundle(p, host)
        text, mode, uid = shipped["postgres/etc/patroni.yml"]
        assert (mode, uid) == (0o600, 0)  # root's; start.sh copies it for postgres, still private
        doc = yaml.safe_load(text)
        auth = doc["postgresql"]["authentication"]
        assert auth["superuser"]["password"] == "mock-postgres-superuser-password-" + "x" * 16
        assert auth["replication"]["password"] == "mock-postgres-replication-password-" + "x" * 16
        assert auth["rewind"]["password"] == "mock-postgres-rewind-password-" + "x" * 16
        assert doc["restapi"]["authentication"]["password"] == "mock-postgres-api-password-" + "x" * 16
        # The shown copy is the same file but for the passwords.
        shown = yaml.safe_load(p.artifacts[f"{host}/postgres/etc/patroni.yml"])
        assert yaml.safe_dump(shown) == yaml.safe_dump(doc).replace("mock-postgres-superuser-password-" + "x" * 16, "'[secret]'") \
            .replace("mock-postgres-replication-password-" + "x" * 16, "'[secret]'") \
            .replace("mock-postgres-rewind-password-" + "x" * 16, "'[secret]'") \
            .replace("mock-postgres-api-password-" + "x" * 16, "'[secret]'")
        for private in ("postgres/etc/logins.json", "postgres/etc/pgbackrest-keys.conf", "postgres/etc/server.key",
                        "postgres/backup.env", "etcd/etc/server.key"):
            assert shipped[private][1:] == (0o600, 0), private
            assert p.artifacts[f"{host}/{private}"].startswith("[secret")
        # The database hosts get billing's login as a SCRAM verifier, never the password (ADR 26).
        logins = shipped["postgres/etc/logins.json"][0]
        assert json.loads(logins) == {"billing": pgc.scram_verifier("billing", "mock-postgres-app-password-" + "x" * 16, SALT_KEY)}
        assert "mock-postgres-app-password-" not in logins and "postgres/env" not in shipped
        assert "repo1-s3-key=" in shipped["postgres/etc/pgbackrest-keys.conf"][0]
    assert expected.bundle(p, "witness")["etcd/etc/server.key"][1:] == (0o600, 0)


# --- etcd on every consensus host -----------------------------------------------------------------


@pytest.mark.parametrize("witness", [True, False], ids=["witness", "no-witness"])
def test_etcd_runs_on_every_consensus_host_and_nowhere_else(witness):
    raw, secret_keys = stack_raw("production") if witness else without_witness()
    p = run("production", raw, secret_keys)
    _, consensus_hosts = expected.topology(raw)
    assert consensus_hosts == (["witness", "us-east", "eu-west"] if witness else ["us-east"])
    ips = expected.addresses(p)
    cluster = {f"{h}=https://{ips[h][0]}:2380" for h in consensus_hosts}
    for host in ips:
        # Every host's monitoring knows how many members to expect (EtcdMemberMissing).
        assert p.artifacts[f"{host}/monitoring/etc/textfile/etcd.prom"].endswith(f"ciris_etcd_members {len(consensus_hosts)}\n")
        has_etcd = "etcd" in {c.name for c in p.containers[host]}
        assert has_etcd == (host in consensus_hosts), host
        if not has_etcd:
            assert not [a for a in p.artifacts if a.startswith(f"{host}/etcd/")]
            continue
        conf = yaml.safe_load(p.artifacts[f"{host}/etcd/etc/etcd.conf.yml"])
        ipv4 = ips[host][0]
        assert conf["name"] == host
        assert set(conf["initial-cluster"].split(",")) == cluster and len(conf["initial-cluster"].split(",")) == len(cluster)
        assert conf["advertise-client-urls"] == f"https://{ipv4}:2379"
        assert conf["initial-advertise-peer-urls"] == f"https://{ipv4}:2380"
        assert (conf["listen-client-urls"], conf["listen-peer-urls"]) == ("https://0.0.0.0:2379", "https://0.0.0.0:2380")
        # Metrics and /health over plain HTTP, for the host's Prometheus and the health check: not published.
        assert conf["listen-metrics-urls"] == "http://0.0.0.0:2381"
        assert conf["initial-cluster-state"] == "new" and conf["initial-cluster-token"] == "ciris-bridge-dcs"
        tls = {"cert-file": "/run/ciris-etcd/server.crt", "key-file": "/run/ciris-etcd/server.key",
               "trusted-ca-file": "/run/ciris-etcd/ca.crt", "client-cert-auth": True}
        assert conf["client-transport-security"] == tls and conf["peer-transport-security"] == tls
        assert conf["enable-v2"] is True  # Patroni's etcd (v2) client (ADR 0014)
        assert p.artifacts[f"{host}/etcd/etc/server.key"] == "[secret]\n"
        # The same CA as Postgres: Patroni presents its member certificate to etcd.
        assert p.artifacts[f"{host}/etcd/etc/ca.crt"] == next(
            p.artifacts[f"{m}/postgres/etc/ca.crt"] for m in ("us-east", "eu-west"))
        svc = yaml.safe_load(p.artifacts[f"{host}/compose.yaml"])["services"]["etcd"]
        assert sorted(svc["ports"]) == sorted(f"{a}:{port}:{port}/tcp" for port in (2379, 2380)
                                              for a in (ipv4, f"[{ips[host][1]}]"))
        assert "etcd-data:/var/lib/etcd" in svc["volumes"]
    text = plan.render_text(p)
    assert ("losing any one provider leaves a majority" in text) == witness
    if not witness:  # the replica's Patroni uses the primary's etcd
        assert patroni(p, "eu-west")["etcd"]["hosts"] == [f"{ips['us-east'][0]}:2379"]


def test_etcd_renderer_lists_every_member():
    members = [consensus.Member("witness", "198.51.100.1"), consensus.Member("us-east", "192.0.2.1")]
    conf = yaml.safe_load(consensus.etcd_conf(members[1], members))
    assert conf["initial-cluster"] == "witness=https://198.51.100.1:2380,us-east=https://192.0.2.1:2380"
    assert conf["name"] == "us-east" and conf["advertise-client-urls"] == "https://192.0.2.1:2379"


# --- certificates, backup, output -----------------------------------------------------------------


def test_every_host_certificate_names_its_addresses_and_postgres():
    p = run("production")
    ips = expected.addresses(p)
    csrs = {r.name: mocks.unwrap(r.inputs) for r in p.registrations if r.type == "tls:index/certRequest:CertRequest"}
    assert set(csrs) == {f"postgres-{h}-csr" for h in ("witness", "us-east", "eu-west")}
    for host, (ipv4, ipv6) in ips.items():
        csr = csrs[f"postgres-{host}-csr"]
        assert csr["ipAddresses"] == [ipv4, ipv6] and csr["dnsNames"] == ["postgres"]
    certs = [mocks.unwrap(r.inputs) for r in p.registrations if r.type == "tls:index/locallySignedCert:LocallySignedCert"]
    assert len(certs) == 3 and all(set(c["allowedUses"]) >= {"server_auth", "client_auth"} for c in certs)


def test_the_backup_job_runs_beside_every_member():
    raw, secret_keys = stack_raw("production")
    secrets = {f"{P}:backup_encryption_key": "Q0FOQVJZLWtleS1iYWNrdXAtMzItYnl0ZXMtbG9uZyE=", f"{P}:backup_s3_secret_key": "CANARY-s3-secret"}
    raw.update(secrets)
    p = run("production", raw, secret_keys | set(secrets))
    assert "backup" not in {c.name for c in p.containers["witness"]}
    for host in ("us-east", "eu-west"):
        assert {c.name for c in p.containers[host]} >= {"postgres", "backup"}
        backup = yaml.safe_load(p.artifacts[f"{host}/compose.yaml"])["services"]["backup"]
        assert backup["entrypoint"] == ["tini", "--", "sh", "/usr/local/lib/ciris/backup-loop.sh"]
        assert "ports" not in backup
        data = "/srv/ciris/data/postgres" if host == "eu-west" else "pgdata"  # eu-west's volume
        assert backup["volumes"] == [f"{data}:/var/lib/postgresql/data:ro", "pgsocket:/var/run/postgresql", "./postgres/etc:/etc/ciris-postgres:ro",
                                     "./postgres/backup.env:/run/secrets/ciris.env:ro"]
        repo = p.artifacts[f"{host}/postgres/etc/pgbackrest.conf"]
        assert "repo1-s3-endpoint=s3.eu-central-003.backblazeb2.com\n" in repo and "repo1-retention-full=30\n" in repo
        env = expected.bundle(p, host)["postgres/backup.env"][0]
        assert "host=postgres port=5432 user=billing dbname=cirisbilling sslmode=verify-full" in env
        assert "BACKUP_ENCRYPTION_KEY=Q0FOQVJZ" in env
    # The job checks that its member is the primary before every run (Patroni moves that role).
    loop = (REPO / "payloads/postgres/backup-loop.sh").read_text()
    assert "pg_is_in_recovery()" in loop
    assert p.outputs["database"]["backup"] == {"bucket": "ciris-bridge-backups", "retention_days": 30, "hour_utc": 3}
    dumped = json.dumps(p.as_json()) + json.dumps(p.artifacts)
    assert "CANARY-s3-secret" not in dumped and "Q0FOQVJZ" not in dumped
    staging = run("staging")
    assert not [h for h, cs in staging.containers.items() if "backup" in {c.name for c in cs}]


def test_the_restore_switch_creates_the_cluster_from_the_bucket():
    """backup.restore (ADR 24): every member's Patroni would restore instead of initdb (only the one
    that creates the cluster does); without it the cluster starts empty."""
    raw, secret_keys = stack_raw("production")
    raw[f"{P}:backup"] = {**raw[f"{P}:backup"], "restore": {"target_time": "2026-11-22T15:05:00+01:00"}}
    p = run("production", raw, secret_keys)
    for host in ("us-east", "eu-west"):
        boot = patroni(p, host)["bootstrap"]
        assert boot["method"] == "pgbackrest" and boot["pgbackrest"]["keep_existing_recovery_conf"] is True
        assert boot["pgbackrest"]["command"] == (
            "pgbackrest --config=/run/ciris-postgres/pgbackrest.conf --stanza=ciris restore --delta "
            "--type=time '--target=2026-11-22 14:05:00+00' --target-action=promote")
    assert p.outputs["database"]["backup"]["restore"] == "2026-11-22T14:05:00+00:00"
    assert "method" not in patroni(run("production"), "us-east")["bootstrap"]


def test_the_database_output_without_a_witness_says_promotion_is_manual():
    raw, secret_keys = without_witness()
    assert run("production", raw, secret_keys).outputs["database"] == {
        "engine": "patroni+etcd",
        "primary": "us-east",
        "replicas": ["eu-west"],
        "members": ["us_east", "eu_west"],
        "consensus": ["us-east"],
        "failover": "degrade only (no witness: promotion is manual)",
        "mode": "synchronous",
        "port": 5432,
        "backup": {"bucket": "ciris-bridge-backups", "retention_days": 30, "hour_utc": 3},
    }


@pytest.mark.parametrize("third", [False, True], ids=["two-regions", "three-regions"])
def test_a_declared_switchover_rerenders_no_database_file(third):
    """Moving `postgres: primary` is a Patroni switchover and nothing more: no rendered file changes
    (etcd's, Patroni's, billing's multi-host DATABASE_URL), so no container restarts under it."""
    runs = []
    for primary in ("us-east", "eu-west"):
        raw, secret_keys = stack_raw("production")
        if third:
            third_region(raw)
        runs.append(run("production", declared(raw, primary), secret_keys))
    before, after = runs
    changed = {path for path in set(before.artifacts) | set(after.artifacts)
               if before.artifacts.get(path) != after.artifacts.get(path)}
    assert changed == set()
    assert before.firewall_matrix() == after.firewall_matrix()
    assert after.outputs["database"]["primary"] == "eu-west"


def test_without_a_witness_only_the_declared_primary_may_lead():
    """The consensus lives beside the declared primary: the others never promote themselves (a
    promotion there would lose the lock with its region anyway); with a witness anyone may."""
    for raw_secret, replica_may_lead in ((without_witness(), False), (stack_raw("production"), True)):
        p = run("production", *raw_secret)
        tags = {r: yaml.safe_load(p.artifacts[f"{r}/postgres/etc/patroni.yml"])["tags"]["nofailover"]
                for r in ("us-east", "eu-west")}
        assert tags == {"us-east": False, "eu-west": not replica_may_lead}


# --- billing's logins and the bucket's keys change without a restart (ADR 26) ----------------------


SALT_KEY = "mock-postgres-superuser-password-" + "x" * 16  # the verifiers' salts are keyed by it


def with_services(**services) -> plan.Plan:
    raw, secret_keys = stack_raw("production")
    raw[f"{P}:services"] = {**raw.get(f"{P}:services", {}), **services}
    return run("production", raw, secret_keys)


def labels(files, service: str) -> dict[str, str]:
    return yaml.safe_load(files["compose.yaml"][0])["services"][service]["labels"]


def billing_login(files) -> tuple[str, str]:
    url = next(line.split("=", 1)[1] for line in files["billing/env"][0].splitlines() if line.startswith("DATABASE_URL="))
    user, password = url.removeprefix("postgresql://").split("@")[0].split(":")
    return user, password


def test_billings_login_rotates_in_three_deploys_and_postgres_never_restarts():
    """docs/runbook-secrets.md: the new login is made beside the old one, billing (and the backup
    job) switch to it, the old one is shut. At every step the login billing uses is in the file the
    primary applies, and neither the database server's files nor its container change: only the
    logins file, which reload.sh takes live."""
    steps = [with_services(), with_services(database_logins=["1", "2"]),
             with_services(database_logins=["1", "2"], database_login="2"), with_services(database_logins=["2"])]
    pw = lambda login: f"mock-postgres-app-password{'' if login == '1' else '-' + login}-" + "x" * 16  # noqa: E731
    v = lambda role, login: pgc.scram_verifier(role, pw(login), SALT_KEY)  # noqa: E731
    for region in ("us-east", "eu-west"):
        bundles = [expected.bundle(p, region) for p in steps]
        logins = [json.loads(b["postgres/etc/logins.json"][0]) for b in bundles]
        assert logins == [{"billing": v("billing", "1")}, {"billing": v("billing", "1"), "billing_2": v("billing_2", "2")},
                          {"billing": v("billing", "1"), "billing_2": v("billing_2", "2")}, {"billing_2": v("billing_2", "2")}]
        used = [billing_login(b) for b in bundles]
        assert used == [("billing", pw("1")), ("billing", pw("1")), ("billing_2", pw("2")), ("billing_2", pw("2"))]
        for (user, password), applied in zip(used, logins):
            assert applied[user] == pgc.scram_verifier(user, password, SALT_KEY)
        # While a region deploys, the billing before and the billing after both run, and the
        # database holds the logins before or after: each must accept both billings' login.
        for i in range(len(steps) - 1):
            assert {used[i][0], used[i + 1][0]} <= set(logins[i]) & set(logins[i + 1]), i
        assert [f"user={u} " in b["postgres/backup.env"][0] for b, (u, _) in zip(bundles, used)] == [True] * 4
        assert len({json.dumps(labels(b, "postgres")) for b in bundles}) == 1, "the database server would restart"
        assert len({b["postgres/etc/patroni.yml"][0] for b in bundles}) == 1


def test_new_bucket_keys_reach_the_server_without_a_restart():
    raw, secret_keys = stack_raw("production")
    keys = {f"{P}:backup_s3_access_key": "AK-CANARY-1", f"{P}:backup_s3_secret_key": "SK-CANARY-1"}
    first = expected.bundle(run("production", {**raw, **keys}, secret_keys | set(keys)), "us-east")
    keys2 = {f"{P}:backup_s3_access_key": "AK-CANARY-2", f"{P}:backup_s3_secret_key": "SK-CANARY-2"}
    second = expected.bundle(run("production", {**raw, **keys2}, secret_keys | set(keys2)), "us-east")
    assert "repo1-s3-key=AK-CANARY-2\nrepo1-s3-key-secret=SK-CANARY-2\n" in second["postgres/etc/pgbackrest-keys.conf"][0]
    assert labels(first, "postgres") == labels(second, "postgres")  # the server is not recreated
    assert labels(first, "backup") != labels(second, "backup")  # the backup job (boto3 reads its env at start) is
    compose = second["compose.yaml"][0]
    assert "# ciris.reload postgres sh /usr/local/lib/ciris/reload.sh\n" in compose

