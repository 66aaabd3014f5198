"""What the design says a plan must contain, worked out from the stack's config alone (never from the
program's own outputs), for the tests of the firewall matrix and the database cluster."""

from __future__ import annotations

import base64
import io
import ipaddress
import tarfile

from components import mocks, plan

WORLD = {"0.0.0.0/0", "::/0"}
MONITORING = ["prometheus", "alertmanager", "blackbox", "node-exporter"]  # on every host (components/monitors.py)
PEER_PORTS = {5432, 8008, 2379, 2380, 9094}  # Postgres, Patroni's API, etcd client, etcd peer, Alertmanager's cluster: peer-only


def topology(raw: dict) -> tuple[list[str], list[str]]:
    """(database members, consensus hosts) from config: the members are the regions with a Postgres
    role; etcd runs on the witness and every member, or without a witness beside the declared
    primary only."""
    regions = raw["ciris-bridge:regions"]
    members = [r["name"] for r in regions if r.get("postgres", "none") != "none"]
    primary = next(r["name"] for r in regions if r.get("postgres") == "primary")
    consensus = ["witness", *members] if raw.get("ciris-bridge:witness") else [primary]
    return members, consensus


def addresses(p: plan.Plan) -> dict[str, tuple[str, str]]:
    """Host name -> (IPv4, IPv6), every host (the regions and the witness)."""
    out = {r["name"]: (r["ipv4"], r["ipv6"]) for r in p.outputs["client_config"]["regions"]}
    if p.outputs["witness"]:
        out["witness"] = (p.outputs["witness"]["ipv4"], p.outputs["witness"]["ipv6"])
    return out


def cidrs(p: plan.Plan, hosts) -> set[str]:
    ips = addresses(p)
    return {f"{ips[h][0]}/32" for h in hosts} | {f"{ips[h][1]}/128" for h in hosts}


def peer_openings(p: plan.Plan, raw: dict, host: str) -> set[tuple[str, int, str]]:
    """The database's openings on one host: 5432 and 8008 from the other members (on a member);
    2379 from the other members and 2380 from the other consensus hosts (on a consensus host)."""
    members, consensus = topology(raw)
    others = [m for m in members if m != host]
    rules: set[tuple[str, int, str]] = set()
    if host in members:
        rules |= {("tcp", port, c) for port in (5432, 8008) for c in cidrs(p, others)}
    if host in consensus:
        rules |= {("tcp", 2379, c) for c in cidrs(p, others)}
        rules |= {("tcp", 2380, c) for c in cidrs(p, [h for h in consensus if h != host])}
    return rules


def matrix(p: plan.Plan, raw: dict) -> dict[str, set[tuple[str, int, str]]]:
    """Every host's exact inbound openings: the regions serve DNS and HTTPS to the world; every host
    takes SSH from the admin CIDRs; the witness serves no one; plus the database's peer openings,
    and Alertmanager's cluster port (tcp and udp) from every other host."""
    admin = set(raw["ciris-bridge:admin_ssh_cidrs"])
    out = {}
    hosts = addresses(p)
    for host in hosts:
        rules = {("tcp", 22, s) for s in admin} | peer_openings(p, raw, host)
        rules |= {(proto, 9094, c) for proto in ("tcp", "udp") for c in cidrs(p, [h for h in hosts if h != host])}
        if host != "witness":
            rules |= {(proto, 53, s) for proto in ("udp", "tcp") for s in WORLD} | {("tcp", 443, s) for s in WORLD}
        out[host] = rules
    return out


def bundle(p: plan.Plan, host: str) -> dict[str, tuple[str, int, int]]:
    """What the host's deploy really ships (secrets included): path -> (text, mode, uid)."""
    deploy = next(r for r in p.registrations if r.name == f"{host}-deploy")
    data = base64.b64decode(mocks.unwrap(deploy.inputs)["stdin"])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: (tar.extractfile(m).read().decode(), m.mode, m.uid) for m in tar.getmembers()}


DEFAULT_LABELS = {"billing": "billing1", "proxy": "proxy1"}  # each service's default name in its region's domain


def host_names(raw: dict) -> dict[str, dict[str, list[str]]]:
    """Region -> service -> the names its edge answers: the default name, then the region's `names`."""
    return {r["name"]: {service: [f"{label}.{r['domain']}", *r.get("names", {}).get(service, [])]
                        for service, label in DEFAULT_LABELS.items()}
            for r in raw["ciris-bridge:regions"]}


def name_records(p: plan.Plan, raw: dict) -> tuple[dict[str, set[tuple[str, str, str]]], list[str]]:
    """(zone -> the A/AAAA records of the extra names in it, the extra names in no zone of ours).
    A name is in the most specific region domain it ends with; its records are the serving region's."""
    ips = addresses(p)
    domains = [r["domain"] for r in raw["ciris-bridge:regions"]]
    zones: dict[str, set[tuple[str, str, str]]] = {d: set() for d in domains}
    outside = []
    for r in raw["ciris-bridge:regions"]:
        for name in (n for names in r.get("names", {}).values() for n in names):
            holders = [d for d in domains if name == d or name.endswith(f".{d}")]
            if not holders:
                outside.append(name)
                continue
            ipv4, ipv6 = ips[r["name"]]
            zones[max(holders, key=len)] |= {(f"{name}.", "A", ipv4), (f"{name}.", "AAAA", ipaddress.IPv6Address(ipv6).compressed)}
    return zones, outside
