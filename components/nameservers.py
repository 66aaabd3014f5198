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
import pulumi_tls as tls

from components import cloud_init, deploy, dns, dnssec
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
        # One key set per signed zone, the same for every region (ADR 20); a key's resource is
        # named for the zone and its `dnssec_keys` entry, so a rollover adds one and removes one.
        child = pulumi.ResourceOptions(parent=self)
        signed = {z: spec.dnssec_keys for z, spec in args.zones.zones.items() if spec.dnssec}
        pems = {z: pulumi.Output.all(*[tls.PrivateKey(f"dnssec-{z}-{n}", algorithm="ECDSA", ecdsa_curve="P256",
                                                      opts=child).private_key_pem for n in names])
                for z, names in signed.items()}
        keys = pulumi.Output.all(**pems).apply(
            lambda got: {z: [dnssec.signing_key(n, pem) for n, pem in zip(signed[z], got[z])] for z in signed})
        public = pulumi.Output.unsecret(keys.apply(lambda ks: {z: [k.public() for k in v] for z, v in ks.items()}))
        digest = pulumi.Output.all(zones, public).apply(
            lambda a: hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest())

        for region in args.regions:
            request = pulumi.Output.all(region.dns_api_key, zones, keys).apply(
                lambda a: json.dumps({"api_url": API_URL, "api_key": a[0], "zones": dnssec.with_keys(a[1], a[2])})
            )
            command.remote.Command(
                f"{region.spec.name}-dns-sync",
                connection=region.connection,
                create=deploy.remote(deploy.DNS_SYNC, cloud_init.BUNDLE_DIR),
                stdin=pulumi.Output.secret(request),
                triggers=[digest],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[region.deploy]),
            )
        # For the registrar: computed from the keys every server holds, not read back from one.
        self.dnssec_ds = public.apply(
            lambda ks: {z: [dnssec.ds_record(z, k["dnskey"]) for k in v] for z, v in ks.items()})
        self.register_outputs({"zone_files": self.zone_files, "dnssec_ds": self.dnssec_ds})
