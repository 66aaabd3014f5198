"""The Pulumi program under the mock runtime.

Two styles: component outputs are checked inside an `Output.apply` the test returns (so an apply
that never runs fails the test instead of passing it); whole-program properties (firewall rules,
secrets, cost) are checked on a finished offline plan -- the same run `python -m components.plan`
does, after every resource has been registered.
"""

from __future__ import annotations

import ipaddress
import json
import re

import pulumi
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from components import bridge, cloud_init, config, firewall, mocks, plan, services
from components import deploy as deploy_script

from tests.conftest import REPO, stack_raw, third_region
from tests.infra import expected

WORLD = {"0.0.0.0/0", "::/0"}
CANARIES = {
    "ciris-bridge:stripe_secret_key": "sk_live_CANARY_stripe_7f3a",
    "ciris-bridge:ssh_private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nCANARY_ssh_91c2\n-----END OPENSSH PRIVATE KEY-----",
    "hcloud:token": "CANARY_hcloud_token_55de",
}


@pytest.fixture
def staging_monitor():
    raw, secret_keys = stack_raw("staging")
    return mocks.install("staging", raw, secret_keys)


def run(stack: str = "staging", raw=None, secret_keys=None) -> plan.Plan:
    if raw is None:
        raw, secret_keys = stack_raw(stack)
    return plan.run(stack, raw, secret_keys)


# --- component outputs, asserted inside apply ---------------------------------------------


@pulumi.runtime.test
def test_regions_expose_their_host_addresses_in_the_client_contract(staging_monitor):
    b = bridge.build(config.from_engine())
    outs = pulumi.Output.all(
        [r.ipv4 for r in b.regions], [r.ipv6 for r in b.regions], b.outputs["client_config"], b.outputs["glue_records"]
    )

    def check(args):
        ipv4s, ipv6s, client, glue = args
        assert len(ipv4s) == 2 and len(set(ipv4s)) == 2
        for a in ipv4s:
            assert ipaddress.ip_address(a) in ipaddress.ip_network("192.0.0.0/3")  # documentation ranges
        assert [r["ipv4"] for r in client["regions"]] == ipv4s
        assert [r["ipv6"] for r in client["regions"]] == ipv6s
        assert [n["ipv4"] for n in client["dns"]["nameservers"]] == ipv4s
        assert client["billing_urls"] == [
            "https://billing1.staging.ciris-services-1.ai",
            "https://billing1.staging.ciris-services-2.ai",
        ]
        assert [g["glue"][0]["ipv4"] for g in glue] == ipv4s
        assert glue[0]["nameservers"] == ["ns1.staging.ciris-services-1.ai", "ns2.staging.ciris-services-2.ai"]

    return outs.apply(check)


@pulumi.runtime.test
def test_the_database_output_describes_the_patroni_cluster(staging_monitor):
    b = bridge.build(config.from_engine())

    def check(db):
        assert db == {
            "engine": "patroni+etcd",
            "primary": "us-east",  # where the cluster is created; Patroni moves the role
            "replicas": ["eu-west"],
            "members": ["us_east", "eu_west"],  # Patroni's names: the regions with `_`
            "consensus": ["witness", "eu-west", "us-east"],  # one etcd member per provider
            "failover": "automatic",
            "mode": "synchronous",
            "port": 5432,
            "backup": None,  # staging keeps no backups
        }

    return pulumi.Output.from_input(b.outputs["database"]).apply(check)


# --- whole program ---------------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["staging", "production"])
def test_both_stacks_plan_with_the_client_contract(stack):
    p = run(stack)
    assert set(p.outputs) == {"client_config", "glue_records", "database", "monthly_cost_usd", "witness", "monitoring",
                                "release"}
    # ops status reaches each host's loopback-only Prometheus over SSH, pinning the key the deploy pins.
    pinned = {r.name[: -len("-deploy")]: mocks.unwrap(r.inputs)["connection"]["hostKey"] for r in p.registrations
              if r.type == "command:remote:Command" and r.name.endswith("-deploy")}
    monitored = {h["host"]: h for h in p.outputs["monitoring"]}
    assert set(monitored) == {"us-east", "eu-west", "witness"}
    for name, host in monitored.items():
        assert host["prometheus"] == "127.0.0.1:9090"
        assert host["ssh"] == {"user": "ciris", "port": 22, "host_key": pinned[name]}
        assert host["ssh"]["host_key"].startswith("ssh-ed25519 ")
    client = p.outputs["client_config"]
    assert client["schema_version"] == 1 and client["environment"] == stack
    assert [r["provider"] for r in client["regions"]] == ["vultr", "hetzner"]
    types = [r.type for r in p.registrations]
    assert types.count("vultr:index/instance:Instance") == 1
    assert types.count("hcloud:index/server:Server") == 1
    assert types.count("digitalocean:index/droplet:Droplet") == 1  # the witness
    assert types.count("hcloud:index/volume:Volume") == 1
    assert types.count("ciris:bridge:ReplicatedPostgres") == 1


def without_witness(stack: str) -> tuple[dict, set[str]]:
    raw, secret_keys = stack_raw(stack)
    del raw["ciris-bridge:witness"]
    return raw, secret_keys


@pytest.mark.parametrize("stack,witness", [("staging", True), ("production", True), ("production", False)])
def test_firewall_matrix_is_exactly_the_fsd_matrix(stack, witness):
    raw, secret_keys = stack_raw(stack) if witness else without_witness(stack)
    p = run(stack, raw, secret_keys)
    matrix = {host: set(rules) for host, rules in p.firewall_matrix().items()}
    assert matrix == expected.matrix(p, raw)
    # Spelled out, so the expectation cannot drift with the code: etcd's client port takes the
    # other database members, its peer port the other consensus hosts, nothing else reaches either.
    ips = expected.addresses(p)
    at = lambda host, port: {src for _, prt, src in matrix[host] if prt == port}  # noqa: E731
    v4 = lambda *hosts: {f"{ips[h][0]}/32" for h in hosts}  # noqa: E731
    assert {s for s in at("eu-west", 5432) if "." in s} == {s for s in at("eu-west", 8008) if "." in s} == v4("us-east")
    if witness:
        assert set(matrix) == {"us-east", "eu-west", "witness"}
        assert {port for _, port, _ in matrix["witness"]} == {22, 2379, 2380, 9094}
        assert {s for s in at("witness", 2379) if "." in s} == v4("us-east", "eu-west")
        assert {s for s in at("witness", 2380) if "." in s} == v4("us-east", "eu-west")
        assert {s for s in at("us-east", 2379) if "." in s} == v4("eu-west")  # not the witness: no Patroni there
        assert {s for s in at("us-east", 2380) if "." in s} == v4("eu-west", "witness")
    else:  # a single etcd beside the primary: nobody peers with it
        assert set(matrix) == {"us-east", "eu-west"}
        assert {s for s in at("us-east", 2379) if "." in s} == v4("eu-west") and not at("us-east", 2380)
        assert not at("eu-west", 2379) and not at("eu-west", 2380)


def test_provider_rule_inputs_have_the_provider_shapes():
    p = run("production")
    vultr_rules = [r.inputs for r in p.registrations if r.type == "vultr:index/firewallRule:FirewallRule"]
    assert {(r["protocol"], r["port"], r["ipType"], r["subnet"], r["subnetSize"]) for r in vultr_rules} >= {
        ("udp", "53", "v4", "0.0.0.0", 0),
        ("udp", "53", "v6", "::", 0),
        ("tcp", "443", "v4", "0.0.0.0", 0),
        ("tcp", "22", "v4", "203.0.113.10", 32),
    }
    hcloud_fws = [r.inputs for r in p.registrations if r.type == "hcloud:index/firewall:Firewall"]
    assert len(hcloud_fws) == 3  # the base firewall, the Postgres peer openings, Alertmanager's cluster
    for fw in hcloud_fws:
        assert all(rule["direction"] == "in" for rule in fw["rules"])
    server = next(r.inputs for r in p.registrations if r.type == "hcloud:index/server:Server")
    assert server["serverType"] == "cx23" and server["image"] == "debian-12"
    # hcloud IDs are strings; these inputs want numbers (the RPC layer carries numbers as floats).
    numeric = lambda v: isinstance(v, (int, float)) and v == int(v)  # noqa: E731
    assert server["firewallIds"] and all(numeric(i) for i in server["firewallIds"])
    attachment = next(r.inputs for r in p.registrations if r.type == "hcloud:index/firewallAttachment:FirewallAttachment")
    assert numeric(attachment["firewallId"]) and all(numeric(i) for i in attachment["serverIds"])
    volume = next(r.inputs for r in p.registrations if r.type == "hcloud:index/volume:Volume")
    assert numeric(volume["serverId"])


def test_ssh_is_never_open_to_the_world():
    p = run("production")
    for region, rules in p.firewall_matrix().items():
        ssh_sources = {src for proto, port, src in rules if port == 22}
        assert ssh_sources and not ssh_sources & WORLD, region
    for path, text in p.artifacts.items():
        if path.endswith("cloud-init.yaml"):
            assert "ufw allow proto tcp from 203.0.113.10/32 to any port 22" in text
            assert "ufw allow 22" not in text
            assert "PasswordAuthentication no" in text and "PermitRootLogin no" in text


def test_ufw_mirrors_the_provider_firewall():
    """cloud-init's UFW lines open the base rules, each host's `database` UFW command exactly the
    database's peer openings: together, what the provider firewall opens, on every host."""
    p = run("staging")
    matrix = p.firewall_matrix()
    assert set(matrix) == {"us-east", "eu-west", "witness"}
    for host, rules in matrix.items():
        ufw = p.artifacts[f"{host}/cloud-init.yaml"]
        base = [(proto, port, src) for proto, port, src in rules if port not in expected.PEER_PORTS]
        ufw_lines = {line for line in yaml.safe_load(ufw)["runcmd"] if line.startswith("ufw allow")}
        assert ufw_lines == {f"ufw allow {port}/{proto}" if src in WORLD else f"ufw allow proto {proto} from {src} to any port {port}"
                             for proto, port, src in base}
        opened = " ; ".join(r.inputs["create"] for r in p.registrations
                            if r.name in (f"{host}-database-ufw", f"{host}-monitoring-ufw"))
        allowed = {line.strip() for line in re.split("[;\n]", opened) if "ufw allow" in line}
        assert allowed == {f"sudo ufw allow proto {proto} from {src} to any port {port}"
                           for proto, port, src in rules if port in expected.PEER_PORTS}
    # nothing else is opened anywhere: no HTTP, no internal service port
    for host, rules in matrix.items():
        assert {port for _, port, _ in rules} == ({22, 2379, 2380, 9094} if host == "witness" else {22, 53, 443, 5432, 8008, 2379, 2380, 9094})


def test_three_regions_plan_by_config_alone():
    raw, secret_keys = stack_raw("production")
    p = run("production", third_region(raw), secret_keys)
    client = p.outputs["client_config"]
    assert [r["name"] for r in client["regions"]] == ["us-east", "eu-west", "eu-north"]
    assert len(client["proxy_urls"]) == 3
    assert p.outputs["database"]["replicas"] == ["eu-west", "eu-north"]
    assert p.outputs["database"]["members"] == ["us_east", "eu_west", "eu_north"]
    assert p.outputs["database"]["consensus"] == ["witness", "eu-north", "eu-west", "us-east"]
    matrix = {region: set(rules) for region, rules in p.firewall_matrix().items()}
    assert matrix == expected.matrix(p, raw)
    assert len([g for g in p.outputs["glue_records"] if g["delegated_at"] == "registrar"]) == 3


def test_secrets_stay_secret():
    raw, secret_keys = stack_raw("staging")
    raw.update(CANARIES)
    p = run("staging", raw, secret_keys | set(CANARIES))
    dumped = json.dumps(p.as_json())
    for canary in CANARIES.values():
        assert canary.splitlines()[1 if "\n" in canary else 0] not in dumped
    # The deploy command does get the key -- as a secret.
    deploy = next(r for r in p.registrations if r.name == "us-east-deploy")
    assert mocks.is_secret_value(deploy.inputs["connection"])  # secretness spreads to the whole object
    assert "CANARY_ssh_91c2" in mocks.unwrap(deploy.inputs)["connection"]["privateKey"]
    assert '"[secret]"' in dumped
    assert not p.secret_outputs  # no output carries a secret at all



def test_secrets_reach_containers_as_files_only_their_user_reads():
    """Not as their configured environment, which `docker inspect` shows: each container with secret
    settings mounts its env file (0600, owned by the uid it starts as) and is told where it is."""
    raw, secret_keys = stack_raw("production")
    secrets = {"ciris-bridge:stripe_secret_key": "sk_live_CANARY_f1", "ciris-bridge:backup_s3_secret_key": "CANARY_s3_f2"}
    raw.update(secrets)
    p = run("production", raw, secret_keys | set(secrets))
    readers = {"billing": services.SERVICE_UID, "billing-twin": services.SERVICE_UID, "proxy": services.SERVICE_UID,
               "proxy-twin": services.SERVICE_UID, "backup": 0}
    for host in ("us-east", "eu-west"):
        files = expected.bundle(p, host)
        compose = yaml.safe_load(files["compose.yaml"][0])["services"]
        with_secrets = set()
        for name, svc in compose.items():
            assert "env_file" not in svc and "CANARY" not in json.dumps(svc), name
            mounts = [v.split(":")[0].removeprefix("./") for v in svc.get("volumes", []) if v.split(":")[1] == services.SECRETS_FILE]
            if mounts:
                with_secrets.add(name)
                assert svc["environment"][services.SECRETS_FILE_VAR] == services.SECRETS_FILE
                text, mode, uid = files[mounts[0]]
                assert (mode, uid) == (0o600, readers[name]), name
        assert with_secrets == set(readers), with_secrets
        # The database server's secrets are files of its mounted config directory, root's, which
        # reload.sh copies for postgres (ADR 26): the bucket's keys among them, not its environment.
        assert "sk_live_CANARY_f1" in files["billing/env"][0]
        assert "CANARY_s3_f2" in files["postgres/etc/pgbackrest-keys.conf"][0] and "CANARY_s3_f2" in files["postgres/backup.env"][0]
        assert files["postgres/etc/pgbackrest-keys.conf"][1:] == (0o600, 0)

def test_production_costs_at_most_the_fsd_target():
    """The two regions stay within the FSD's target; the witness (ADR 13) takes the stack past it,
    never past the hard ceiling."""
    p = run("production")
    cost = p.outputs["monthly_cost_usd"]
    witness = [i["usd"] for i in cost["items"] if i["item"].startswith("witness:")]
    assert witness == [6.00] and p.estimate.witness_cents == 600
    assert cost["total"] - sum(witness) <= cost["target"] == 30
    assert cost["total"] <= cost["ceiling"] == 40
    assert round(sum(i["usd"] for i in cost["items"]), 2) == cost["total"]
    assert any("cx23" in i["item"] for i in cost["items"])
    # The backups' bucket at a fourth provider (ADR 23), priced per GB stored.
    assert [i for i in cost["items"] if i["item"].startswith("backups:")] == [{"item": "backups: ~20 GB at backblaze", "usd": 0.12}]


def test_cloud_init_hardens_the_host():
    p = run("production")
    doc = p.artifacts["eu-west/cloud-init.yaml"]
    assert doc.startswith("#cloud-config\n")
    for needle in ("unattended-upgrades", "docker-compose-plugin", "9DC858229FC7DD38854AE2D88D81803C0EBFCD88", "MaxRetentionSec=14day", "RequiresMountsFor=/srv/ciris/data", "ssh_pwauth: false", "disable_root: true", "ufw --force enable", "ufw default deny incoming"):
        assert needle in doc
    assert cloud_init.DEPLOY_USER in doc


def test_every_remote_command_pins_the_host_key_cloud_init_installs():
    p = run("production")
    vms = {r.name.removesuffix("-vm"): mocks.unwrap(r.inputs) for r in p.registrations if r.name.endswith("-vm")}
    assert set(vms) == {"us-east", "eu-west", "witness"}
    by_ipv4 = {ipv4: host for host, (ipv4, _) in expected.addresses(p).items()}
    # Each command's host is where it connects, whatever its name says.
    commands: dict[str, list[str]] = {host: [] for host in vms}
    for r in p.registrations:
        if r.type == "command:remote:Command":
            commands[by_ipv4[mocks.unwrap(r.inputs)["connection"]["host"]]].append(r.name)
    for host, names in commands.items():
        assert names and all(n.startswith(f"{host}-") for n in names if n != "postgres-declared-primary"), (host, names)
    assert "postgres-declared-primary" in commands["us-east"]  # on the declared primary's host
    assert {"witness-deploy", "witness-database-ufw", "us-east-database-ufw", "eu-west-database-ufw"} <= {n for ns in commands.values() for n in ns}
    for host, vm in vms.items():
        doc = yaml.safe_load(vm.get("userData") or vm.get("user_data"))
        private, public = doc["ssh_keys"]["ed25519_private"], doc["ssh_keys"]["ed25519_public"]
        assert doc["ssh_deletekeys"] is True and doc["ssh_genkeytypes"] == []
        key = serialization.load_ssh_private_key(private.encode(), password=None)
        assert key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() == public
        regs = {r.name: r for r in p.registrations}
        assert all(mocks.unwrap(regs[n].inputs)["connection"]["hostKey"] == public for n in commands[host])
        assert "[secret]" in p.artifacts[f"{host}/cloud-init.yaml"] and private not in p.artifacts[f"{host}/cloud-init.yaml"]


def test_volume_is_prepared_before_services_start():
    p = run("production")
    deploy = next(r for r in p.registrations if r.name == "eu-west-deploy")
    volume_id = next(r for r in p.registrations if r.name == "eu-west-volume")
    # The one deploy script (components/deploy.py), run as root with the bundle dir and the device.
    assert deploy.inputs["create"].startswith(deploy_script.remote(deploy_script.DEPLOY, "/srv/ciris", "/dev/disk/by-id/scsi-0HC_Volume_"))
    script = deploy_script.DEPLOY
    assert script.index("ciris-prepare-volume") < script.index("dc up -d")
    assert volume_id.inputs["size"] == 20
    vultr_deploy = next(r for r in p.registrations if r.name == "us-east-deploy")
    assert vultr_deploy.inputs["create"] == deploy_script.remote(deploy_script.DEPLOY, "/srv/ciris")  # no volume there


def test_a_grown_volume_redeploys_its_host():
    """volume_gb raised: the volume grows and its host's deploy runs again (which grows the
    filesystem: ciris-prepare-volume, tests/infra/test_prepare_volume.py). (The other hosts'
    bundles change only for the monthly cost monitoring shows.)"""
    before = {r.name: r for r in run("production").registrations}
    raw, secret_keys = stack_raw("production")
    next(r for r in raw["ciris-bridge:regions"] if r["name"] == "eu-west")["volume_gb"] = 40
    after = {r.name: r for r in run("production", raw, secret_keys).registrations}
    assert after["eu-west-volume"].inputs["size"] == 40
    triggers = lambda regs, host: list(mocks.unwrap(regs[f"{host}-deploy"].inputs)["triggers"])
    assert triggers(before, "eu-west")[1:] == ["volume_gb=20"] and triggers(after, "eu-west")[1:] == ["volume_gb=40"]
    assert triggers(after, "us-east")[1:] == []  # no volume there


def test_firewall_normalize_ignores_non_firewall_resources():
    assert firewall.normalize("hcloud:index/sshKey:SshKey", {"publicKey": "x"}) == []


@pytest.mark.parametrize("primary", ["us-east", "eu-west"])
def test_billing_runs_in_every_region_pointed_at_every_member_its_own_first(primary):
    raw, secret_keys = stack_raw("production")
    for r in raw["ciris-bridge:regions"]:  # a declared failover is this edit plus `pulumi up`
        r["postgres"] = "primary" if r["name"] == primary else "replica"
    secrets = {"ciris-bridge:stripe_secret_key": "sk_live_CANARY_b1", "ciris-bridge:stripe_webhook_secret": "whsec_CANARY_b2"}
    raw.update(secrets)
    p = run("production", raw, secret_keys | set(secrets))
    ips = {r["name"]: r for r in p.outputs["client_config"]["regions"]}
    for region in ("us-east", "eu-west"):
        assert "billing" in {c.name for c in p.containers[region]}
        compose = p.artifacts[f"{region}/compose.yaml"]
        assert "./billing/env" in compose and "ciris-billing:local" in compose
        assert p.artifacts[f"{region}/billing/Dockerfile"].startswith("# The billing service")
        assert "billing/billing/ledger.py" in "\n".join(p.artifacts) and f"{region}/billing/billing/migrations/0001_ledger.sql" in p.artifacts
        # Whichever member is primary: billing finds the writable one itself (no redeploy after a failover).
        peer = "eu-west" if region == "us-east" else "us-east"
        assert f"DATABASE_URL -> postgres:5432, {ips[peer]['ipv4']}:5432 (verify-full, the read-write one)" in p.artifacts[f"{region}/billing/env"]
        # Every member (whichever Patroni makes primary) accepts the other regions' billing over TLS
        # (ADR 0007), and its own billing by the container address.
        hba = yaml.safe_load(p.artifacts[f"{region}/postgres/etc/patroni.yml"])["postgresql"]["pg_hba"]
        assert [line for line in hba if " cirisbilling " in line] == [
            f"hostssl cirisbilling +billing 172.30.{0 if region == 'us-east' else 1}.10/32 scram-sha-256",
            f"hostssl cirisbilling +billing 172.30.{0 if region == 'us-east' else 1}.13/32 scram-sha-256",  # its twin
            f"hostssl cirisbilling +billing 172.30.{0 if region == 'us-east' else 1}.11/32 scram-sha-256",
            f"hostssl cirisbilling +billing {ips[peer]['ipv4']}/32 scram-sha-256",
            f"hostssl cirisbilling +billing {ips[peer]['ipv6']}/128 scram-sha-256",
        ]
    dumped = json.dumps(p.as_json()) + json.dumps(p.artifacts)
    assert "CANARY" not in dumped and "BEGIN PRIVATE KEY" not in dumped


def test_billing_database_url_lists_every_member_and_keeps_the_writable_one():
    from components.billing import database_url

    assert database_url(hosts=["postgres", "203.0.113.5", "198.51.100.7"], password="pw") == (
        "postgresql://billing:pw@postgres:5432,203.0.113.5:5432,198.51.100.7:5432/cirisbilling?sslmode=verify-full"
        "&sslrootcert=/etc/ciris-billing/ca.crt&target_session_attrs=read-write&connect_timeout=3"
    )


def test_billing_in_a_region_without_a_member_lists_the_members_in_config_order():
    raw, secret_keys = stack_raw("production")
    raw = third_region(raw)
    raw["ciris-bridge:regions"][-1]["postgres"] = "none"  # eu-north: billing and proxy, no database member
    p = run("production", raw, secret_keys)
    ips = {r["name"]: r["ipv4"] for r in p.outputs["client_config"]["regions"]}
    members = ["us-east", "eu-west"]
    for region in ips:
        hosts = [f"{ips[m]}:5432" for m in members if m != region]
        if region in members:
            hosts.insert(0, "postgres:5432")
        assert f"DATABASE_URL -> {', '.join(hosts)} (verify-full" in p.artifacts[f"{region}/billing/env"]


@pytest.mark.parametrize("primary,replica", [("us-east", "eu-west"), ("eu-west", "us-east")])
def test_deploys_run_witness_then_primary_then_replicas_then_the_declared_switchover(primary, replica):
    raw, secret_keys = stack_raw("production")
    for r in raw["ciris-bridge:regions"]:  # a declared switchover is this edit plus `pulumi up`
        r["postgres"] = "primary" if r["name"] == primary else "replica"
    p = run("production", raw, secret_keys)
    regs = {r.name: r for r in p.registrations}
    deps = lambda name: set(regs[name].dependencies)  # noqa: E731
    # etcd needs two of its three members before Patroni can create the cluster: the witness first;
    # then the declared primary (the cluster is created there), then the replicas (they clone from it).
    assert regs["witness-deploy"].urn in deps(f"{primary}-deploy")
    assert regs[f"{primary}-deploy"].urn in deps(f"{replica}-deploy")
    assert not {regs[f"{primary}-deploy"].urn, regs[f"{replica}-deploy"].urn} & deps("witness-deploy")
    assert regs[f"{replica}-deploy"].urn not in deps(f"{primary}-deploy")
    # Every host's deploy waits for its own database openings.
    for host in ("witness", primary, replica):
        assert regs[f"{host}-database-ufw"].urn in deps(f"{host}-deploy")
    # The switchover to the declared primary: after every region's deploy, on the primary's host.
    switch = regs["postgres-declared-primary"]
    assert {regs[f"{h}-deploy"].urn for h in (primary, replica)} <= set(switch.dependencies)
    assert switch.parent == regs["postgres"].urn
    member = primary.replace("-", "_")
    inputs = mocks.unwrap(switch.inputs)
    assert inputs["create"] == deploy_script.remote(deploy_script.SWITCHOVER, "/srv/ciris", member)
    assert inputs["triggers"] == [member]  # runs again only when the declared primary moves
    assert inputs["connection"]["host"] == expected.addresses(p)[primary][0]
    assert inputs["connection"]["hostKey"] == mocks.unwrap(regs[f"{primary}-deploy"].inputs)["connection"]["hostKey"]
    assert 'patronictl' in (REPO / "payloads/postgres/switchover.sh").read_text()


def test_a_single_member_has_no_switchover_to_declare():
    raw, secret_keys = without_witness("production")
    raw["ciris-bridge:regions"][1]["postgres"] = "none"  # eu-west keeps no database member
    p = run("production", raw, secret_keys)
    assert "postgres-declared-primary" not in {r.name for r in p.registrations}
    db = p.outputs["database"]
    assert (db["mode"], db["members"], db["consensus"], db["replicas"]) == ("standalone", ["us_east"], ["us-east"], [])
    assert {c.name for c in p.containers["us-east"]} >= {"etcd", "postgres", "backup"}
    assert not {"etcd", "postgres", "backup"} & {c.name for c in p.containers["eu-west"]}
    assert not [path for path in p.artifacts if path.startswith(("eu-west/postgres/", "eu-west/etcd/"))]


def test_hetzner_regions_share_one_ssh_key():
    raw, secret_keys = stack_raw("production")
    regs = run("production", third_region(raw), secret_keys).registrations
    keys = [r for r in regs if r.type == "hcloud:index/sshKey:SshKey"]
    assert len(keys) == 1
    servers = [mocks.unwrap(r.inputs) for r in regs if r.type == "hcloud:index/server:Server"]
    assert len(servers) == 2 and len({tuple(s["sshKeys"]) for s in servers}) == 1


def test_sign_in_reaches_billing_with_its_issuers_and_ca():
    """sign_in (config) -> billing's OIDC_* settings and the CA file it mounts; without it, none."""
    from components import billing

    raw, secret_keys = stack_raw("staging")
    assert billing.sign_in_env(config.parse(raw, secret_keys).sign_in) == {}
    ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    raw[f"{config.PROJECT}:sign_in"] = {
        "google": {"client_ids": ["app.apps.googleusercontent.com", "web.apps.googleusercontent.com"]},
        "apple": {"client_ids": ["ai.ciris.mobile"], "algorithm": "ES256", "issuer": "https://issuer.test/apple",
                  "jwks_url": "https://issuer.test/apple/jwks", "ca_cert": ca}}
    p = run("staging", raw, secret_keys)
    env = billing.sign_in_env(config.parse(raw, secret_keys).sign_in)
    assert env == {"OIDC_GOOGLE_CLIENT_IDS": "app.apps.googleusercontent.com,web.apps.googleusercontent.com",
                   "OIDC_APPLE_CLIENT_IDS": "ai.ciris.mobile", "OIDC_APPLE_ALGORITHM": "ES256",
                   "OIDC_APPLE_ISSUERS": "https://issuer.test/apple",
                   "OIDC_APPLE_JWKS_URL": "https://issuer.test/apple/jwks", "OIDC_CA_FILE": billing.OIDC_CA_PATH}
    for region in ("us-east", "eu-west"):
        assert p.artifacts[f"{region}/billing/oidc-ca.crt"] == ca
        compose = yaml.safe_load(p.artifacts[f"{region}/compose.yaml"].split("\n", 2)[-1])
        assert f"./billing/oidc-ca.crt:{billing.OIDC_CA_PATH}:ro" in compose["services"]["billing"]["volumes"]
    # A JWKS over plain HTTP, or a client id with spaces, is refused naming the key.
    for bad, key in (({"client_ids": ["x"], "jwks_url": "http://issuer.test/jwks"}, "sign_in.google.jwks_url"),
                     ({"client_ids": ["a b"]}, "sign_in.google.client_ids[0]")):
        raw[f"{config.PROJECT}:sign_in"] = {"google": bad}
        with pytest.raises(config.ConfigError, match=re.escape(key)):
            config.parse(raw, secret_keys)
