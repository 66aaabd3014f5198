"""Nameservers: every region's PowerDNS serves every zone, loaded from records/zones.yaml.

The zones are rendered once from the regions' addresses and pushed to each region's server with
payloads/dns/pdns_sync.py, run over SSH inside the DNS container against its API. The command's trigger is the rendered
zones' digest: an unchanged zones.yaml changes nothing; a changed record changes only its RRset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pulumi
import pulumi_command as command

from components import cloud_init, deploy, dns
from components.region import Region

API_URL = "http://127.0.0.1:8081"
SYNC_SERIAL = 1  # a new zone starts here; PowerDNS moves it to YYYYMMDDnn on its first change


@dataclass(frozen=True)
class NameserversArgs:
    regions: list[Region]
    zones: dns.ZonesFile
    hostmaster: str
    geo: bool = False


class Nameservers(pulumi.ComponentResource):
    """Outputs: `zone_files` (zone name -> RFC 1035 text), `dnssec_ds` (zone -> DS records, for
    the zones with DNSSEC on)."""

    def __init__(self, name: str, args: NameserversArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:Nameservers", name, None, opts)
        addresses = pulumi.Output.all(*[pulumi.Output.all(r.ipv4, r.ipv6) for r in args.regions])

        def region_addresses(addrs: list) -> list[dns.RegionAddress]:
            return [dns.RegionAddress(r.spec.name, r.domain, r.nameserver, ipv4, ipv6, r.spec.extra_names)
                    for r, (ipv4, ipv6) in zip(args.regions, addrs)]

        def render(addrs: list, serial: int | None = None) -> list[dns.RenderedZone]:
            return dns.render(args.zones, region_addresses(addrs), hostmaster=args.hostmaster, geo=args.geo, serial=serial)

        def warn_foreign_names(addrs: list) -> None:
            for region in region_addresses(addrs):
                warning = dns.foreign_names_warning(region, [r.domain for r in args.regions])
                if warning:
                    pulumi.log.warn(warning, self)

        addresses.apply(warn_foreign_names)  # needs the addresses: a first preview, before the hosts exist, cannot say it

        self.zone_files = addresses.apply(render).apply(lambda zs: {z.name.rstrip("."): dns.to_rfc1035(z) for z in zs})
        # The server keeps its own serial (pdns_sync): what it is sent carries a fixed one, so the
        # command's input, like its trigger, changes only when a record does -- not every day.
        zones = addresses.apply(lambda a: [z.as_dict() for z in render(a, serial=SYNC_SERIAL)])
        digest = zones.apply(lambda zs: hashlib.sha256(json.dumps(zs, sort_keys=True).encode()).hexdigest())

        syncs = []
        for region in args.regions:
            request = pulumi.Output.all(region.dns_api_key, zones).apply(
                lambda a: json.dumps({"api_url": API_URL, "api_key": a[0], "zones": a[1]})
            )
            syncs.append(
                command.remote.Command(
                    f"{region.spec.name}-dns-sync",
                    connection=region.connection,
                    create=deploy.remote(deploy.DNS_SYNC, cloud_init.BUNDLE_DIR),
                    stdin=pulumi.Output.secret(request),
                    triggers=[digest],
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[region.deploy]),
                )
            )
        wants_ds = [z for z, spec in args.zones.zones.items() if spec.dnssec]
        self.dnssec_ds = (
            syncs[0].stdout.apply(lambda out: {z.rstrip("."): s["ds"] for z, s in json.loads(out or "{}").items() if s["dnssec"]})
            if wants_ds
            else {}
        )
        self.register_outputs({"zone_files": self.zone_files, "dnssec_ds": self.dnssec_ds})
