"""The witness (ADR 13): a third host at a third provider, hardened and deployed like the regions,
serving no one, deployed first; and what a stack without one says about itself."""

from __future__ import annotations

import pulumi
import pytest
import yaml

from components import bridge, config, cost, firewall, local, mocks, plan
from components import deploy as deploy_script
from components.node import Node
from components.region import Region
from components.witness import NETWORK, NO_WITNESS, Witness
from tests.conftest import REPO, stack_raw, without_witness
from tests.infra.expected import MONITORING
from tests.conftest import run_plan as run

P = "ciris-bridge"
DROPLET = "digitalocean:index/droplet:Droplet"
DO_FIREWALL = "digitalocean:index/firewall:Firewall"


def by_name(p: plan.Plan) -> dict[str, mocks.Registration]:
    return {r.name: r for r in p.registrations}


# --- the host -------------------------------------------------------------------------------


@pytest.mark.parametrize("stack,size", [("production", "s-1vcpu-1gb"), ("staging", "s-1vcpu-512mb-10gb")])
def test_the_witness_is_a_droplet_at_the_third_provider(stack, size):
    p = run(stack)
    regs = by_name(p)
    witness = regs["witness"]
    assert witness.type == "ciris:bridge:Witness"
    vm = mocks.unwrap(regs["witness-vm"].inputs)
    assert regs["witness-vm"].type == DROPLET and regs["witness-vm"].parent == witness.urn
    assert (vm["size"], vm["region"], vm["image"]) == (size, "lon1", "debian-12-x64")
    assert vm["ipv6"] is True and vm["dropletAgent"] is False and vm["backups"] is False
    assert vm["name"] == f"ciris-{stack}-witness"
    assert len(vm["sshKeys"]) == 1 and vm["sshKeys"][0].count(":") == 15  # the deploy key's fingerprint
    assert mocks.unwrap(regs["witness-ssh-key"].inputs)["publicKey"] == stack_raw(stack)[0][f"{P}:ssh_public_key"]
    # Its providers differ from both regions'.
    providers = {r["provider"] for r in p.outputs["client_config"]["regions"]}
    assert p.outputs["witness"]["provider"] == "digitalocean" not in providers
    # Operators find it in the stack outputs; clients never see it.
    assert p.outputs["witness"]["ipv4"] and p.outputs["witness"]["ipv6"]
    assert p.outputs["witness"]["ipv4"] not in str(p.outputs["client_config"])
    assert "witness" not in str(p.outputs["client_config"]) and "witness" not in str(p.outputs["glue_records"])


def test_the_witness_is_hardened_like_the_regions():
    p = run()
    doc = p.artifacts["witness/cloud-init.yaml"]
    region_doc = p.artifacts["us-east/cloud-init.yaml"]
    parsed, region_parsed = yaml.safe_load(doc), yaml.safe_load(region_doc)
    for key in ("disable_root", "ssh_pwauth", "users", "packages", "write_files"):
        assert parsed[key] == region_parsed[key], key
    assert parsed["hostname"] == "ciris-production-witness"
    # UFW: SSH from the admins and nothing else, default deny.
    ufw = [c for c in parsed["runcmd"] if c.startswith("ufw ")]
    assert ufw == ["ufw default deny incoming", "ufw default allow outgoing",
                   "ufw allow proto tcp from 203.0.113.10/32 to any port 22", "ufw --force enable"]
    assert [c for c in parsed["runcmd"] if not c.startswith("ufw ")] == [
        c for c in region_parsed["runcmd"] if not c.startswith("ufw ")]
    # The host key cloud-init installs is the one every remote command pins.
    vm = yaml.safe_load(mocks.unwrap(by_name(p)["witness-vm"].inputs)["userData"])
    deploy = mocks.unwrap(by_name(p)["witness-deploy"].inputs)
    assert deploy["connection"]["hostKey"] == vm["ssh_keys"]["ed25519_public"]
    assert deploy["connection"]["user"] == "ciris"
    assert "[secret]" in doc and vm["ssh_keys"]["ed25519_private"] not in doc


def test_the_witness_firewall_opens_ssh_from_the_admins_only():
    p = run()
    assert [r for r in p.firewall_matrix()["witness"] if r[1] not in (2379, 2380, 9094)] == [("tcp", 22, "203.0.113.10/32")]
    fws = {r.name: mocks.unwrap(r.inputs) for r in p.registrations if r.type == DO_FIREWALL}
    # the base rules; etcd's and Alertmanager's cluster from the bridge's hosts (test_program)
    assert set(fws) == {"witness-firewall", "witness-database-firewall", "witness-monitoring-firewall"}
    fw = fws["witness-firewall"]
    assert fw["inboundRules"] == [{"protocol": "tcp", "portRange": "22", "sourceAddresses": ["203.0.113.10/32"]}]
    # A DigitalOcean firewall without outbound rules would cut the host off (apt, Docker's repository).
    assert {(r["protocol"], r.get("portRange")) for r in fw["outboundRules"]} == {("tcp", "1-65535"), ("udp", "1-65535"), ("icmp", None)}
    assert all(r["destinationAddresses"] == ["0.0.0.0/0", "::/0"] for r in fw["outboundRules"])
    assert fw["dropletIds"] and all(isinstance(i, (int, float)) for i in fw["dropletIds"])
    assert "tags" not in fw  # a firewall's tags would apply it to every droplet carrying them


def test_base_rules_say_whether_a_host_serves_the_world():
    public = {(r.protocol, r.port) for r in firewall.base_rules(["203.0.113.10/32"], public=True)}
    private = {(r.protocol, r.port) for r in firewall.base_rules(["203.0.113.10/32"], public=False)}
    assert public == {("udp", 53), ("tcp", 53), ("tcp", 443), ("tcp", 22)}
    assert private == {("tcp", 22)}
    with pytest.raises(TypeError):
        firewall.base_rules(["203.0.113.10/32"])  # every caller says which it is


def test_open_on_the_witness_adds_a_provider_firewall_and_ufw_before_its_deploy():
    """What ReplicatedPostgres will do for etcd: the same open() as on a region."""
    raw, secret_keys = stack_raw("production")
    monitor = mocks.install("production", raw, secret_keys)
    built = {}

    @pulumi.runtime.test
    def program():
        cfg = config.from_engine()
        original = Witness.build

        def open_then_build(self, after=None):
            peers = [(built["ipv4"], built["ipv6"])]
            self.open("etcd", [firewall.peer_rule("etcd-peer", 2380, peers, "etcd peers")])
            return original(self, after)

        Witness.build = open_then_build
        try:
            built.update(ipv4="192.0.2.77", ipv6="2001:db8::77")
            b = bridge.build(cfg)
        finally:
            Witness.build = original
        return pulumi.Output.from_input(b.outputs["witness"]).apply(lambda w: w)

    program()
    regs = {r.name: r for r in monitor.registrations}
    fw = mocks.unwrap(regs["witness-etcd-firewall"].inputs)
    assert fw["inboundRules"] == [{"protocol": "tcp", "portRange": "2380", "sourceAddresses": ["192.0.2.77/32", "2001:db8::77/128"]}]
    assert fw["dropletIds"] == mocks.unwrap(regs["witness-firewall"].inputs)["dropletIds"]
    assert "outboundRules" not in fw  # the base firewall's outbound rules apply (DigitalOcean adds them up)
    assert "tags" not in fw
    ufw = mocks.unwrap(regs["witness-etcd-ufw"].inputs)["create"]
    assert "sudo ufw allow proto tcp from 192.0.2.77/32 to any port 2380" in ufw
    assert regs["witness-etcd-ufw"].urn in regs["witness-deploy"].dependencies


def test_witness_and_region_share_the_node_interface():
    raw, secret_keys = stack_raw("production")
    mocks.install("production", raw, secret_keys)
    seen = {}

    @pulumi.runtime.test
    def program():
        b = bridge.build(config.from_engine())
        seen["b"] = b
        return pulumi.Output.all(b.witness.ipv4, b.regions[0].ipv4).apply(lambda a: a)

    program()
    b = seen["b"]
    assert isinstance(b.witness, Node) and isinstance(b.regions[0], Region) and isinstance(b.regions[0], Node)
    assert not isinstance(b.witness, Region)
    assert b.witness.spec.name == "witness" and b.witness.spec.provider == "digitalocean"
    assert b.database.witness is b.witness  # ReplicatedPostgres gets it
    assert b.nodes == [b.witness, *b.regions]
    for attr in ("ipv4", "ipv6", "network", "connection", "artifacts", "deploy", "open", "add_service", "build"):
        assert hasattr(b.witness, attr), attr
    assert b.witness.deploy is not None
    assert not hasattr(b.witness, "domain") and not hasattr(b.witness, "dns_api_key")
    # Its own network, clear of every region's.
    assert b.witness.network == NETWORK and NETWORK.name == "ciris-witness"
    subnets = {n.network.subnet for n in b.nodes}
    assert len(subnets) == 3 and all(s.startswith("172.30.") for s in subnets - {NETWORK.subnet})


# --- order, containers, cost ------------------------------------------------------------------


def test_the_witness_deploys_first_then_the_primary_then_the_replicas():
    regs = by_name(run())
    witness, primary, replica = regs["witness-deploy"], regs["us-east-deploy"], regs["eu-west-deploy"]
    assert witness.urn in primary.dependencies
    assert primary.urn in replica.dependencies
    assert primary.urn not in witness.dependencies and replica.urn not in witness.dependencies
    # The same deploy script as every host, without a volume.
    assert mocks.unwrap(witness.inputs)["create"] == deploy_script.remote(deploy_script.DEPLOY, "/srv/ciris")
    assert regs["witness-vm"].urn in witness.dependencies


def test_the_witness_runs_nothing_of_the_regions():
    p = run()
    # the consensus member, and the monitoring every host runs (the third vantage point)
    assert [c.name for c in p.containers["witness"]] == ["etcd", *MONITORING]
    compose = yaml.safe_load(p.artifacts["witness/compose.yaml"])
    assert compose["name"] == "ciris-witness" and set(compose["services"]) == {"etcd", *MONITORING}
    assert compose["networks"]["ciris-witness"]["ipam"]["config"][0]["subnet"] == "172.31.0.0/24"
    assert {path for path in p.artifacts if path.startswith("witness/") and "/monitoring/" not in path} == {
        "witness/cloud-init.yaml", "witness/compose.yaml", "witness/etcd/Dockerfile", "witness/etcd/start.sh", "witness/etcd/join.sh",
        "witness/etcd/etc/etcd.conf.yml", "witness/etcd/etc/server.crt", "witness/etcd/etc/server.key", "witness/etcd/etc/ca.crt"}
    # It probes the regions and scrapes only its own host (no billing, proxy or database of its own).
    jobs = {j["job_name"] for j in yaml.safe_load(p.artifacts["witness/monitoring/etc/prometheus.yml"])["scrape_configs"]}
    assert not jobs & {"billing", "proxy", "powerdns", "patroni"} and {"health", "node"} <= jobs


def test_cost_includes_the_witness_and_stays_under_the_ceiling():
    p = run()
    est = p.estimate
    assert [i for i in est.items if i.item.startswith("witness:")] == [cost.CostItem("witness: digitalocean s-1vcpu-1gb in lon1", 600)]
    assert est.total_cents <= est.ceiling_cents
    text = plan.render_text(p)
    assert "witness: digitalocean s-1vcpu-1gb in lon1" in text
    without = next(line for line in text.splitlines() if "total without the witness" in line)
    assert without.replace(" ", "") == f"totalwithoutthewitness${cost.usd(est.total_cents - 600):.2f}"
    assert "losing any one provider leaves a majority" in text and NO_WITNESS not in text


def test_a_stack_without_a_witness_says_what_it_cannot_do():
    raw, secret_keys = without_witness()
    p = run("production", raw, secret_keys)
    assert p.outputs["witness"] is None
    assert not [r for r in p.registrations if r.type.startswith("digitalocean:") or r.name.startswith("witness")]
    assert not [path for path in p.artifacts if path.startswith("witness/")]
    assert p.estimate.witness_cents == 0
    text = plan.render_text(p)
    assert NO_WITNESS in text
    assert NO_WITNESS == ("no witness: losing the primary's region needs a manual promotion (runbook); "
                          "losing a replica's region degrades by itself")
    assert "total without the witness" not in text
    # Deploy order as before: the primary first, then the replicas.
    regs = by_name(p)
    assert regs["us-east-deploy"].urn in regs["eu-west-deploy"].dependencies


# --- make local ---------------------------------------------------------------------------------


def test_the_local_stack_has_a_local_witness_deployed_first():
    raw, secret_keys = config.read_stack_file(REPO / "Pulumi.local.yaml")
    p = plan.run("local", raw, secret_keys)
    assert p.outputs["witness"]["ipv4"] == "10.77.3.1"
    hosts = local.hosts(p)
    assert [(h["name"], h["ipv4"], h["network"].subnet) for h in hosts] == [
        ("witness", "10.77.3.1", "172.31.0.0/24"),
        ("us-east", "10.77.1.1", "172.30.0.0/24"),
        ("eu-west", "10.77.2.1", "172.30.1.0/24"),
    ]
    for h in hosts:  # make local makes each network itself (no isolation): exactly as compose declares it
        declared = yaml.safe_load(p.artifacts[f"{h['name']}/compose.yaml"])["networks"]
        assert {name: (n["name"], n["ipam"]["config"][0]["subnet"], n["ipam"]["config"][0]["ip_range"])
                for name, n in declared.items()} == \
            {h["network"].name: (h["network"].name, h["network"].subnet, h["network"].dynamic_range)}
    deploys = local.commands(p, "deploy")
    assert set(deploys) == {"witness", "us-east", "eu-west"}
    assert deploys["witness"]["stdin"]  # the bundle the deploy script unpacks
    assert not [r for r in p.registrations if r.type.startswith("digitalocean:")]  # this machine, no cloud
    compose = yaml.safe_load(p.artifacts["witness/compose.yaml"])
    assert set(compose["services"]) == {"etcd", *MONITORING} and compose["name"] == "ciris-witness"


# --- config -------------------------------------------------------------------------------------


LOCAL_CASES = [
    ({"provider": "digitalocean", "location": "lon1", "plan": "s-1vcpu-1gb"}, f"{P}:witness.provider",
     "environment local runs every region on this machine, and the witness"),
    ({"provider": "local", "location": "lon1", "plan": "local"}, f"{P}:witness.location", "IPv4 address on this machine, not 'lon1'"),
    ({"provider": "local", "location": "10.77.3.1", "plan": "s-1vcpu-1gb"}, f"{P}:witness.plan", "a local host has plan: local"),
    ({"provider": "local", "location": "10.77.1.1", "plan": "local"}, f"{P}:witness.location", "10.77.1.1 is already a region's address"),
]


@pytest.mark.parametrize("witness,key,text", LOCAL_CASES, ids=["cloud", "not-an-address", "plan", "clash"])
def test_bad_local_witness_gives_one_clear_message(witness, key, text):
    """(The witness's other config errors are in test_config's CASES.)"""
    raw, secret_keys = config.read_stack_file(REPO / "Pulumi.local.yaml")
    raw[f"{P}:witness"] = witness
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys)
    assert info.value.key == key
    assert text in info.value.message


def test_the_witness_is_optional_and_its_token_a_secret():
    raw, secret_keys = without_witness("staging")
    assert config.parse(raw, secret_keys).witness is None
    raw, secret_keys = stack_raw("production")
    raw["digitalocean:token"] = "plaintext-token"
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys)
    assert info.value.key == "digitalocean:token" and "plaintext-token" not in str(info.value)


def test_a_region_can_live_at_the_witness_provider_behind_the_same_interface():
    """Nothing above hosts.py branches on the provider: a DigitalOcean region (with a volume) plans
    like the others -- in a stack whose witness is elsewhere or absent."""
    raw, secret_keys = without_witness()
    raw[f"{P}:regions"].append({"name": "ca-east", "provider": "digitalocean", "location": "tor1", "plan": "s-1vcpu-1gb",
                                "domain": "ciris-services-3.ai", "nameserver": "ns3", "volume_gb": 10, "postgres": "replica"})
    raw[f"{P}:budget"]["ceiling_usd"] = 45  # a third region and its domain
    p = run("production", raw, secret_keys)
    regs = by_name(p)
    assert regs["ca-east"].type == "ciris:bridge:Region" and regs["ca-east-vm"].type == DROPLET
    deploy = mocks.unwrap(regs["ca-east-deploy"].inputs)
    assert deploy["create"] == deploy_script.remote(deploy_script.DEPLOY, "/srv/ciris",
                                                    "/dev/disk/by-id/scsi-0DO_Volume_ciris-production-ca-east-data")
    assert regs["ca-east-volume-attachment"].urn in regs["ca-east-deploy"].dependencies
    # A database member without the witness: Postgres and Patroni's API from the other members,
    # no etcd (the single etcd member is beside the primary).
    assert {port for _, port, _ in p.firewall_matrix()["ca-east"]} == {22, 53, 443, 5432, 8008, 9094}
