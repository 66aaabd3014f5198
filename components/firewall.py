"""The firewall matrix (FSD §5.2, §7.3) as data: one list of rules feeds the provider firewall,
the host's UFW and the offline plan, so the three cannot drift apart.

Public (regions only): 53/udp, 53/tcp, 443/tcp. SSH: 22/tcp from the admin CIDRs only, on every
host. The witness serves nothing public: SSH is all its base rules open. Postgres: 5432/tcp from
the peer regions' addresses only (added by ReplicatedPostgres). Nothing else is ever opened: port
80 stays closed because the edge uses TLS-ALPN-01, and internal ports (6379, 8000, 8081, 4000,
9090...) are bound to the host or its container network.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import pulumi

WORLD: tuple[tuple[int, str], ...] = ((4, "0.0.0.0/0"), (6, "::/0"))


@dataclass(frozen=True)
class Rule:
    name: str
    protocol: Literal["tcp", "udp"]
    port: int
    # (IP family, CIDR); the CIDR may be an Output (a peer's address) but its family is known.
    sources: tuple[tuple[int, pulumi.Input[str]], ...]
    description: str


def family(cidr: str) -> int:
    return ipaddress.ip_network(cidr, strict=False).version


def base_rules(admin_cidrs: Sequence[str], *, public: bool) -> list[Rule]:
    """What a host opens from its first boot. `public`: it serves DNS and the edge to the world (a
    region); a host that serves no one (the witness) opens SSH from the admins and nothing else.
    Every caller says which it is: a new kind of host never inherits 53/443 by default."""
    admins = tuple((family(c), c) for c in admin_cidrs)
    served = [
        Rule("dns-udp", "udp", 53, WORLD, "authoritative DNS"),
        Rule("dns-tcp", "tcp", 53, WORLD, "authoritative DNS"),
        Rule("https", "tcp", 443, WORLD, "edge: billing and proxy over TLS"),
    ]
    return [*(served if public else []), Rule("ssh", "tcp", 22, admins, "SSH from admin CIDRs only")]


def peer_rule(name: str, port: int, peers: Sequence[tuple[pulumi.Input[str], pulumi.Input[str]]], description: str) -> Rule:
    """Open `port`/tcp to each peer's (IPv4, IPv6) host address and nothing wider."""
    sources: list[tuple[int, pulumi.Input[str]]] = []
    for ipv4, ipv6 in peers:
        sources.append((4, pulumi.Output.from_input(ipv4).apply(lambda a: f"{a}/32")))
        sources.append((6, pulumi.Output.from_input(ipv6).apply(lambda a: f"{a}/128")))
    return Rule(name, "tcp", port, tuple(sources), description)


def ufw_commands(protocol: str, port: int, cidrs: Sequence[str]) -> list[str]:
    """The UFW lines mirroring one rule whose sources are resolved."""
    if any(ipaddress.ip_network(c, strict=False).prefixlen == 0 for c in cidrs):
        return [f"ufw allow {port}/{protocol}"]
    return [f"ufw allow proto {protocol} from {c} to any port {port}" for c in cidrs]


def normalize(resource_type: str, inputs: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(protocol, port, source CIDR) triples from one provider firewall resource's inputs:
    the view the plan prints and the tests check, whichever provider declared the rule."""
    if resource_type == "vultr:index/firewallRule:FirewallRule":
        return [(inputs["protocol"], int(inputs["port"]), f"{inputs['subnet']}/{int(inputs['subnetSize'])}")]
    if resource_type == "hcloud:index/firewall:Firewall":
        return [
            (rule["protocol"], int(rule["port"]), src)
            for rule in inputs.get("rules", [])
            if rule["direction"] == "in"
            for src in rule.get("sourceIps", [])
        ]
    if resource_type == "digitalocean:index/firewall:Firewall":
        return [
            (rule["protocol"], int(rule["portRange"]), src)
            for rule in inputs.get("inboundRules", [])
            for src in rule.get("sourceAddresses", [])
        ]
    return []
