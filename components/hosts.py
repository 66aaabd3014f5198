"""One small host interface over the clouds: nothing above this module branches on provider.

A `Host` is a VM with an SSH key, a provider firewall, optionally a block volume, and its public
IPv4/IPv6. `open()` adds firewall openings later (e.g. Postgres to the peers), which is how
regions can refer to each other's addresses without a dependency cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import ediri_vultr as vultr
import pulumi
import pulumi_digitalocean as digitalocean
import pulumi_hcloud as hcloud

from components.config import Region, Witness
from components.firewall import WORLD, Rule

VULTR_DEBIAN_12 = 2136  # Vultr os_id of "Debian 12 x64 (bookworm)"
HETZNER_IMAGE = "debian-12"
DIGITALOCEAN_IMAGE = "debian-12-x64"


@dataclass
class Host:
    ipv4: pulumi.Output[str]
    ipv6: pulumi.Output[str]
    # Block device of the data volume as the VM sees it (None without a volume).
    data_device: pulumi.Output[str] | None
    # Ready-made resources later steps depend on (the VM, and the volume's attachment).
    ready: list[pulumi.Resource]
    open: Callable[[str, Sequence[Rule]], None]
    # Where the containers publish their ports: the host's own public addresses, never the wildcard.
    public_addresses: list[pulumi.Output[str]] = None  # type: ignore[assignment]
    # The container engine's log driver: journald keeps 14 days by time (cloud-init's journald.conf).
    logging: dict = None  # type: ignore[assignment]
    # Where internal ports an operator may tunnel to are published (services.loopback_ports).
    loopback: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.public_addresses is None:
            self.public_addresses = [self.ipv4, self.ipv6]
        if self.logging is None:
            self.logging = {"driver": "journald", "options": {"tag": "{{.Name}}"}}


def create(
    name: str,
    label: str,
    region: Region | Witness,
    ssh_public_key: str,
    user_data: str,
    rules: Sequence[Rule],
    labels: dict[str, str],
    parent: pulumi.Resource,
    shared: dict | None = None,
) -> Host:
    """`name` prefixes the Pulumi resource names; `label` is the name the cloud shows (unique per
    account, so it carries the environment). `region` is any host's spec: a region's or the
    witness's (provider, location, plan, volume_gb)."""
    opts = pulumi.ResourceOptions(parent=parent)
    return _PROVIDERS[region.provider](name, label, region, ssh_public_key, user_data, rules, labels, opts,
                                       {} if shared is None else shared)


def _keep(opts: pulumi.ResourceOptions, labels: dict[str, str], *ignore: str) -> pulumi.ResourceOptions:
    """VMs and volumes: never replaced for a changed first-boot setting (user data, SSH key: those
    are managed on the running host), and in production protected from deletion."""
    return pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(
        ignore_changes=list(ignore), protect=labels.get("environment") == "production"))



def _vultr(name, label, region, ssh_public_key, user_data, rules, labels, opts, shared) -> Host:
    key = vultr.SSHKey(f"{name}-ssh-key", name=f"{label}-deploy", ssh_key=ssh_public_key, opts=opts)
    group = vultr.FirewallGroup(f"{name}-firewall", description=label, opts=opts)

    def add_rules(purpose: str, extra: Sequence[Rule]) -> None:
        for rule in extra:
            for i, (fam, cidr) in enumerate(rule.sources):
                cidr_out = pulumi.Output.from_input(cidr)
                vultr.FirewallRule(
                    f"{name}-{purpose}-{rule.name}-{i}",
                    firewall_group_id=group.id,
                    protocol=rule.protocol,
                    port=str(rule.port),
                    ip_type=f"v{fam}",
                    subnet=cidr_out.apply(lambda c: c.split("/")[0]),
                    subnet_size=cidr_out.apply(lambda c: int(c.split("/")[1])),
                    notes=rule.description,
                    opts=opts,
                )

    add_rules("fw", rules)
    vm = vultr.Instance(
        f"{name}-vm",
        plan=region.plan,
        region=region.location,
        os_id=VULTR_DEBIAN_12,
        label=label,
        hostname=label,
        enable_ipv6=True,
        backups="disabled",
        ssh_key_ids=[key.id],
        firewall_group_id=group.id,
        user_data=user_data,
        tags=[f"{k}={v}" for k, v in sorted(labels.items())],
        opts=_keep(opts, labels, "userData", "sshKeyIds"),
    )
    ready: list[pulumi.Resource] = [vm]
    device = None
    if region.volume_gb:
        volume = vultr.BlockStorage(
            f"{name}-volume",
            region=region.location,
            size_gb=region.volume_gb,
            label=f"{label}-data",
            block_type="high_perf",
            attached_to_instance=vm.id,
            live=True,
            opts=_keep(opts, labels),
        )
        device = volume.mount_id.apply(lambda m: f"/dev/disk/by-id/virtio-{m}")
        ready.append(volume)
    return Host(vm.main_ip, vm.v6_main_ip, device, ready, add_rules)


def _hetzner(name, label, region, ssh_public_key, user_data, rules, labels, opts, shared) -> Host:
    def firewall_rules(extra: Sequence[Rule]) -> list[hcloud.FirewallRuleArgs]:
        return [
            hcloud.FirewallRuleArgs(
                direction="in",
                protocol=rule.protocol,
                port=str(rule.port),
                source_ips=[cidr for _, cidr in rule.sources],
                description=rule.description,
            )
            for rule in extra
        ]

    # Hetzner refuses a second key with the same fingerprint in a project: one per stack, shared by
    # its Hetzner hosts (`shared` is the stack's; stacks sharing a project need different keys).
    key = shared.get(("hcloud-ssh-key", ssh_public_key))
    if key is None:
        key = shared[("hcloud-ssh-key", ssh_public_key)] = hcloud.SshKey(
            f"{name}-ssh-key", name=f"{label}-deploy", public_key=ssh_public_key, labels=labels, opts=opts)
    firewall = hcloud.Firewall(f"{name}-firewall", name=label, rules=firewall_rules(rules), labels=labels, opts=opts)
    vm = hcloud.Server(
        f"{name}-vm",
        name=label,
        server_type=region.plan,
        image=HETZNER_IMAGE,
        location=region.location,
        ssh_keys=[key.id],
        firewall_ids=[firewall.id.apply(int)],
        # Further firewalls are attached by open(); don't fight over the list.
        ignore_remote_firewall_ids=True,
        public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=True, ipv6_enabled=True)],
        user_data=user_data,
        labels=labels,
        opts=_keep(opts, labels, "userData", "sshKeys"),
    )

    def add_rules(purpose: str, extra: Sequence[Rule]) -> None:
        fw = hcloud.Firewall(
            f"{name}-{purpose}-firewall", name=f"{label}-{purpose}", rules=firewall_rules(extra), labels=labels, opts=opts
        )
        hcloud.FirewallAttachment(
            f"{name}-{purpose}-firewall-attachment", firewall_id=fw.id.apply(int), server_ids=[vm.id.apply(int)], opts=opts
        )

    ready: list[pulumi.Resource] = [vm]
    device = None
    if region.volume_gb:
        volume = hcloud.Volume(
            f"{name}-volume",
            name=f"{label}-data",
            size=region.volume_gb,
            server_id=vm.id.apply(int),
            automount=False,  # ciris-prepare-volume formats (only if blank) and mounts it
            labels=labels,
            opts=_keep(opts, labels),
        )
        device = volume.linux_device
        ready.append(volume)
    return Host(vm.ipv4_address, vm.ipv6_address, device, ready, add_rules)



def _digitalocean(name, label, region, ssh_public_key, user_data, rules, labels, opts, shared) -> Host:
    """A droplet (the witness's provider). DigitalOcean's firewalls add up: the base one allows
    all outbound traffic (a droplet with any firewall and no outbound rule can send nothing), and
    each open() adds one more with inbound rules only."""
    tags = [f"{k}:{v}" for k, v in sorted(labels.items())]

    def inbound(extra: Sequence[Rule]) -> list[digitalocean.FirewallInboundRuleArgs]:
        return [
            digitalocean.FirewallInboundRuleArgs(
                protocol=rule.protocol, port_range=str(rule.port), source_addresses=[cidr for _, cidr in rule.sources])
            for rule in extra
        ]

    everywhere = [cidr for _, cidr in WORLD]
    outbound = [digitalocean.FirewallOutboundRuleArgs(protocol=p, port_range="1-65535", destination_addresses=everywhere)
                for p in ("tcp", "udp")]
    outbound.append(digitalocean.FirewallOutboundRuleArgs(protocol="icmp", destination_addresses=everywhere))
    # Like Hetzner, one key per fingerprint in an account: shared by the stack's droplets.
    key = shared.get(("digitalocean-ssh-key", ssh_public_key))
    if key is None:
        key = shared[("digitalocean-ssh-key", ssh_public_key)] = digitalocean.SshKey(
            f"{name}-ssh-key", name=f"{label}-deploy", public_key=ssh_public_key, opts=opts)
    vm = digitalocean.Droplet(
        f"{name}-vm",
        name=label,
        size=region.plan,
        image=DIGITALOCEAN_IMAGE,
        region=region.location,
        ipv6=True,
        backups=False,
        monitoring=False,
        droplet_agent=False,  # no provider agent on the host: SSH from the admins is the only way in
        ssh_keys=[key.fingerprint],
        user_data=user_data,
        tags=tags,
        opts=_keep(opts, labels, "userData", "sshKeys"),
    )
    # By droplet ID only, never `tags`: a firewall's tags select the droplets it applies to.
    droplet_ids = [vm.id.apply(int)]
    digitalocean.Firewall(f"{name}-firewall", name=label, droplet_ids=droplet_ids, inbound_rules=inbound(rules),
                          outbound_rules=outbound, opts=opts)

    def add_rules(purpose: str, extra: Sequence[Rule]) -> None:
        digitalocean.Firewall(f"{name}-{purpose}-firewall", name=f"{label}-{purpose}", droplet_ids=droplet_ids,
                              inbound_rules=inbound(extra), opts=opts)

    ready: list[pulumi.Resource] = [vm]
    device = None
    if region.volume_gb:  # a region at DigitalOcean; the witness keeps no data worth a volume
        volume = digitalocean.Volume(f"{name}-volume", name=f"{label}-data", region=region.location,
                                     size=region.volume_gb, tags=tags, opts=_keep(opts, labels))
        ready.append(digitalocean.VolumeAttachment(f"{name}-volume-attachment", droplet_id=vm.id.apply(int),
                                                   volume_id=volume.id, opts=opts))
        device = volume.name.apply(lambda n: f"/dev/disk/by-id/scsi-0DO_Volume_{n}")
    return Host(vm.ipv4_address, vm.ipv6_address, device, ready, add_rules)


def _local(name, label, region, ssh_public_key, user_data, rules, labels, opts, shared) -> Host:
    """`make local`: this machine is every host. The region's address (its `location`) is an extra
    address of this machine's loopback that scripts/local-up adds; nothing is created in a cloud,
    there is no firewall to open, and ports are published on the IPv4 address only."""
    ipv4 = region.location
    ipv6 = "fd00:c1a5::" + ipv4.rsplit(".", 1)[1]  # a unique-local address, for records only
    return Host(pulumi.Output.from_input(ipv4), pulumi.Output.from_input(ipv6), None, [], lambda purpose, extra: None,
                public_addresses=[pulumi.Output.from_input(ipv4)], logging={"driver": "k8s-file"}, loopback=ipv4)


_PROVIDERS = {"local": _local, "vultr": _vultr, "hetzner": _hetzner, "digitalocean": _digitalocean}
