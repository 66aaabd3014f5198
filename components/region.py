"""Region: one hardened host (a Node) with its DNS zone, its edge and the service containers."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_random as random

from components import dns, edge, services
from components.config import BridgeConfig, Region as RegionConfig
from components.node import Node, bundle, digest  # noqa: F401  (bundle, digest: where callers found them)


def dns_container() -> services.ContainerSpec:
    """PowerDNS on the region network, :53 published on the host's public addresses; its API
    listens inside the container only (the zone sync runs there too)."""
    return services.ContainerSpec(
        name="dns",
        image="ciris-dns:local",
        build="./dns",
        ports=("53:53/udp", "53:53/tcp"),
        volumes=("./dns/pdns.conf:/etc/powerdns/ciris/pdns.conf:ro", "pdns-data:/var/lib/powerdns"),
    )


@dataclass(frozen=True)
class RegionArgs:
    region: RegionConfig
    config: BridgeConfig
    index: int = 0  # position in config: gives the region network its own subnet
    # `make local` only: the stack's own CA (cert PEM, key PEM) that signs the edges' certificates.
    # (root cert, root key, intermediate cert, intermediate key): bridge.local_edge_ca().
    edge_ca: tuple[pulumi.Input[str], ...] | None = None
    shared: dict | None = None  # per-stack resources the regions' hosts share (hosts.create)


class Region(Node):
    """A Node that serves the world: DNS (53) and the edge (443). Outputs: `ipv4`, `ipv6`,
    `nameserver` (FQDN), `domain`, `dns_api_key` (secret); `artifacts` maps file names to the
    rendered text deployed on the host (the offline plan writes them)."""

    def __init__(self, name: str, args: RegionArgs, opts: pulumi.ResourceOptions | None = None):
        r, cfg = args.region, args.config
        super().__init__("ciris:bridge:Region", name, r, cfg, services.Network.for_region(r.name, args.index),
                         public=True, labels={"region": r.name}, shared=args.shared, opts=opts)
        self.domain = r.domain
        self.nameserver = r.nameserver_fqdn

        # PowerDNS: its API key is a random secret; the API listens inside its container only.
        self.dns_api_key = random.RandomPassword(
            f"{name}-dns-api-key", length=40, special=False, opts=pulumi.ResourceOptions(parent=self)
        ).result
        geoip = cfg.services.dns_geoip_database
        # Inside the container IPv4 only: Docker forwards the host's IPv6 :53 to it. Its webserver
        # lets in this host's Prometheus too (/metrics; the API needs the key).
        scraper = (self.network.address(services.PROMETHEUS_ADDRESS_SUFFIX),)
        pdns_conf = self.dns_api_key.apply(lambda key: dns.pdns_conf(api_key=key, listen=("0.0.0.0",), geoip_database=geoip,
                                                                      metrics_from=scraper))

        # Edge and DNS here; postgres, billing and proxy add theirs (add_service).
        caddyfile = edge.render_caddyfile(
            edge.sites(r.domain, names=r.names.model_dump()), acme_email=cfg.services.acme_email, hsts_max_age=cfg.services.hsts_max_age,
            **({"tls": "internal", "ca_dir": edge.CA_DIR} if args.edge_ca else {}),
        )
        ca_files = dict(zip(["edge/ca/root.crt", "edge/ca/root.key", "edge/ca/intermediate.crt", "edge/ca/intermediate.key"],
                            args.edge_ca)) if args.edge_ca else {}
        local = bool(args.edge_ca)  # `make local`: the stack's own CA, Podman's name server
        self.add_service(edge.container(local_ca=local, podman_dns=self.network.gateway if local else None),
                         {"Caddyfile": caddyfile, **ca_files, **services.payload_files("edge")},
                         private={"edge/ca/root.key": 0, "edge/ca/intermediate.key": 0},
                         shown={"edge/ca/root.key": "[secret]\n", "edge/ca/intermediate.key": "[secret]\n"} if args.edge_ca else None)
        self.add_service(dns_container(), {"dns/pdns.conf": pdns_conf, **services.payload_files("dns")},
                         private={"dns/pdns.conf": 0})
        # The plan's copy shows where the key goes, not the key.
        shown_conf = dns.pdns_conf(api_key="[secret]", listen=("0.0.0.0",), geoip_database=geoip, metrics_from=scraper)
        self.artifacts.update({"dns/pdns.conf": shown_conf})
        self.register_outputs({"ipv4": self.ipv4, "ipv6": self.ipv6, "nameserver": self.nameserver})
