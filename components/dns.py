"""Authoritative DNS: records/zones.yaml validated, rendered into full zones, and PowerDNS's config.

Pure functions only (zones file + region addresses in, zones out): the Pulumi program, the offline
plan and the tests all use them, and `payloads/dns/pdns_sync.py` pushes the result to a server.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Iterable, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

RECORD_TYPES = ("A", "AAAA", "CNAME", "TXT", "CAA", "MX", "NS")  # NS: delegating a subzone
DEFAULT_TTL = 300
TTL_RANGE = (30, 604_800)
# FSD §5.4
SOA_TIMERS = {"refresh": 3600, "retry": 600, "expire": 604_800, "minimum": 300}
SOA_TTL = 3600
CAA = ('0 issue "letsencrypt.org"', '0 issuewild ";"')
# Each service's default host name in its region's zone: billing1.<domain>, proxy1.<domain>.
SERVICE_LABELS = {"billing": "billing1", "proxy": "proxy1"}

_LABEL = r"(\*|[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)"
_NAME_RE = re.compile(rf"^(@|{_LABEL}(\.[a-z0-9_]([a-z0-9_-]{{0,61}}[a-z0-9])?)*)$")
_HOST_RE = re.compile(r"^([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\.?$")
_MX_RE = re.compile(r"^(\d{1,5}) (\S+)$")
_CAA_RE = re.compile(r'^(\d{1,3}) (issue|issuewild|iodef) "([^"]*)"$')


class ZonesError(ValueError):
    """One mistake in zones.yaml, naming the zone and the record."""


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: str
    value: str | None = None
    region: str | None = Field(default=None, description="A/AAAA: the address of this region")
    health_check: str | None = Field(default=None, description="URL; answers every live region's address")
    regions: list[str] | None = Field(default=None, description="with health_check: the candidates (default all)")
    ttl: int = DEFAULT_TTL

    def label(self) -> str:
        return f"record {self.name!r} {self.type}"


class Zone(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dnssec: bool = False
    # The signing keys' names (components/dnssec.py): a rollover lists the old and the new key,
    # then only the new one once the registrar's DS names it (docs/runbook-dns.md).
    dnssec_keys: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]] = Field(
        default=["1"], min_length=1, max_length=2)
    records: list[Record] = []

    @model_validator(mode="before")
    @classmethod
    def _fsd_list_form(cls, data: Any) -> Any:
        # FSD §4.1 lists records directly under the zone; the extended form has `records:`.
        return {"records": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _keys_need_signing(self) -> "Zone":
        if "dnssec_keys" in self.model_fields_set and not self.dnssec:
            raise ValueError("dnssec_keys: the zone is not signed (dnssec: false)")
        if len(set(self.dnssec_keys)) != len(self.dnssec_keys):
            raise ValueError(f"dnssec_keys: a key is listed twice ({', '.join(self.dnssec_keys)})")
        return self


class ZonesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    zones: dict[str, Zone] = {}


@dataclass(frozen=True)
class RegionAddress:
    name: str
    domain: str
    nameserver: str  # FQDN without the trailing dot
    ipv4: str
    ipv6: str
    extra_names: tuple[str, ...] = ()  # host names its edge serves besides the defaults (config `names`)


@dataclass(frozen=True)
class RRset:
    name: str  # FQDN with trailing dot
    type: str
    ttl: int
    records: tuple[str, ...]


@dataclass(frozen=True)
class RenderedZone:
    name: str  # FQDN with trailing dot
    dnssec: bool
    rrsets: tuple[RRset, ...]

    def rrset(self, name: str, rtype: str) -> RRset | None:
        return next((r for r in self.rrsets if r.name == name and r.type == rtype), None)

    def as_dict(self) -> dict:
        """The form pdns_sync.py takes."""
        return {
            "name": self.name,
            "dnssec": self.dnssec,
            "rrsets": [{"name": r.name, "type": r.type, "ttl": r.ttl, "records": list(r.records)} for r in self.rrsets],
        }


# --- loading and validation --------------------------------------------------------------------


def load(source: str | Path, regions: Sequence[RegionAddress] | Sequence[Any], *, label: str | None = None) -> ZonesFile:
    """Parse and validate zones.yaml (a path or its text) against the stack's regions."""
    if isinstance(source, Path):
        label = label or str(source)
        try:
            text = source.read_text()
        except FileNotFoundError:
            raise ZonesError(f"{label}: file not found") from None
    else:
        text, label = source, label or "zones.yaml"
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ZonesError(f"{label}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise ZonesError(f"{label}: expected a mapping with `zones:`")
    zones_raw = doc.get("zones") or {}
    for zone_name, zone_raw in (zones_raw.items() if isinstance(zones_raw, dict) else []):
        try:
            Zone.model_validate(zone_raw if zone_raw is not None else [])
        except ValidationError as e:
            raise ZonesError(f"{label}: {_where(zone_name, zone_raw, e)}") from None
    try:
        zones = ZonesFile.model_validate({"zones": {k: (v if v is not None else []) for k, v in zones_raw.items()}})
    except (ValidationError, AttributeError) as e:
        raise ZonesError(f"{label}: `zones` must map each domain to its records ({e.__class__.__name__})") from None
    _check(zones, regions, label)
    return zones


def _where(zone_name: str, zone_raw: Any, e: ValidationError) -> str:
    err = e.errors()[0]
    loc = list(err["loc"])
    where = f"zone {zone_name}"
    if len(loc) >= 2 and loc[0] == "records" and isinstance(loc[1], int):
        records = zone_raw.get("records") if isinstance(zone_raw, dict) else zone_raw
        rec = records[loc[1]] if isinstance(records, list) and loc[1] < len(records) else {}
        name = rec.get("name", f"#{loc[1] + 1}") if isinstance(rec, dict) else f"#{loc[1] + 1}"
        where += f", record {name!r}"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc)
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    return f"{where}: {field + ': ' if field else ''}{msg}"


def _check(zones: ZonesFile, regions: Sequence[Any], label: str) -> None:
    region_names = {r.name for r in regions}
    domains = {r.domain for r in regions}
    generated = {"@", *SERVICE_LABELS.values()} | {r.nameserver.removesuffix("." + r.domain) for r in regions}
    for zone_name, zone in zones.zones.items():
        if zone_name not in domains:
            raise ZonesError(f"{label}: zone {zone_name}: not the domain of any region ({', '.join(sorted(domains))})")
        served = {name: r.name for r in regions for name in r.extra_names if zone_of(name, domains) == zone_name}
        here = generated | {_relative(name, zone_name) for name in served}
        seen: dict[tuple, Record] = {}
        ttls: dict[tuple[str, str], int] = {}
        types_by_name: dict[str, set[str]] = {}
        for rec in zone.records:
            def fail(message: str) -> None:
                raise ZonesError(f"{label}: zone {zone_name}, {rec.label()}: {message}")

            if rec.type not in RECORD_TYPES:
                fail(f"unknown type; expected one of {', '.join(RECORD_TYPES)}")
            if not _NAME_RE.match(rec.name) or len(rec.name) > 200:
                fail("bad name: use '@' for the apex or lower-case labels relative to the zone")
            if not TTL_RANGE[0] <= rec.ttl <= TTL_RANGE[1]:
                fail(f"ttl {rec.ttl} out of range {TTL_RANGE[0]}-{TTL_RANGE[1]}")
            sources = [x for x in (rec.value, rec.region, rec.health_check) if x is not None]
            if len(sources) != 1:
                fail("give exactly one of value, region or health_check")
            if rec.regions is not None and rec.health_check is None:
                fail("`regions` only goes with health_check")
            if rec.region is not None or rec.health_check is not None:
                if rec.type not in ("A", "AAAA"):
                    fail("region and health_check are for A/AAAA records")
                for ref in ([rec.region] if rec.region else []) + list(rec.regions or []):
                    if ref not in region_names:
                        fail(f"unknown region {ref!r}; regions are {', '.join(sorted(region_names))}")
            if rec.health_check is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", rec.health_check):
                fail(f"health_check {rec.health_check!r} is not an http(s) URL")
            if rec.value is not None:
                problem = _value_problem(rec.type, rec.value)
                if problem:
                    fail(problem)
            if rec.type == "CNAME" and rec.name == "@":
                fail("CNAME is not allowed at the zone apex")
            if rec.type == "NS" and rec.name == "@":
                fail("the apex NS set is generated from the regions; NS records here delegate subzones")
            if rec.type == "NS":  # below a delegation the other zone's servers answer, not our record
                delegated = _fqdn(rec.name, zone_name).rstrip(".")
                for name in served:
                    if zone_of(name, [delegated]):
                        fail(f"delegates {name}, which {served[name]} serves (its `names`): our record for it would never be answered")
            key = (rec.name, rec.type, rec.value, rec.region, rec.health_check)
            if key in seen:
                fail("duplicate record")
            seen[key] = rec
            if ttls.setdefault((rec.name, rec.type), rec.ttl) != rec.ttl:
                fail(f"ttl differs from the other {rec.type} records of {rec.name!r}")
            types_by_name.setdefault(rec.name, set()).add(rec.type)
        for rec in zone.records:
            others = types_by_name[rec.name] - {"CNAME"}
            if rec.type == "CNAME" and (others or rec.name in here or sum(1 for r in zone.records if r.name == rec.name) > 1):
                raise ZonesError(f"{label}: zone {zone_name}, {rec.label()}: CNAME beside other data at {rec.name!r}")
            if rec.health_check and sum(1 for r in zone.records if (r.name, r.type) == (rec.name, rec.type)) > 1:
                raise ZonesError(f"{label}: zone {zone_name}, {rec.label()}: a health-checked record must be alone in its RRset")


def _value_problem(rtype: str, value: str) -> str | None:
    try:
        if rtype == "A":
            ipaddress.IPv4Address(value)
        elif rtype == "AAAA":
            ipaddress.IPv6Address(value)
    except ValueError:
        return f"value {value!r} is not an IPv{4 if rtype == 'A' else 6} address"
    if rtype in ("CNAME", "NS") and not _HOST_RE.match(value):
        return f"value {value!r} is not a host name"
    if rtype == "MX" and not (_MX_RE.match(value) and _HOST_RE.match(value.split(" ", 1)[1]) and int(value.split(" ")[0]) < 65536):
        return f"value {value!r} is not 'preference host' (e.g. '10 mail.example.org')"
    if rtype == "CAA" and not _CAA_RE.match(value):
        return f"value {value!r} is not 'flags tag \"value\"' (e.g. '0 issue \"letsencrypt.org\"')"
    if rtype == "TXT" and (not value or len(value) > 2000 or '"' in value or "\\" in value):
        return "TXT value must be 1-2000 characters without quotes or backslashes"
    return None


# --- rendering -----------------------------------------------------------------------------------


def initial_serial(today: date | None = None) -> int:
    """YYYYMMDD01. The server keeps its own serial afterwards and bumps it only on change
    (PowerDNS SOA-EDIT-API=DEFAULT, driven by pdns_sync)."""
    return int((today or date.today()).strftime("%Y%m%d")) * 100 + 1


def _fqdn(name: str, zone: str) -> str:
    return f"{zone}." if name == "@" else f"{name}.{zone}."


def _relative(name: str, zone: str) -> str:
    return "@" if name == zone else name.removesuffix("." + zone)


def zone_of(name: str, zones: Iterable[str]) -> str | None:
    """The most specific of `zones` that holds `name`; None when it is in none of them."""
    return max((z for z in zones if name == z or name.endswith("." + z)), key=len, default=None)


def foreign_names_warning(region: RegionAddress, zones: Iterable[str]) -> str | None:
    """The region's extra names outside every zone we serve: no record of ours points them at the
    region, so whoever serves their zone must, or neither clients nor Let's Encrypt reach them."""
    zones = sorted(zones)
    names = [n for n in region.extra_names if zone_of(n, zones) is None]
    if not names:
        return None
    return (f"dns: {region.name} serves {', '.join(names)}, outside the bridge's zones ({', '.join(zones)}), so we make no "
            f"record for it: point each such name at {region.name} (A {region.ipv4}, AAAA {region.ipv6}) in its own zone, or "
            f"clients miss it and Let's Encrypt cannot issue its certificate (TLS-ALPN-01 on {region.name}'s 443; ADR 2, ADR 19)")


def _dot(host: str) -> str:
    return host if host.endswith(".") else host + "."


def _content(rtype: str, value: str) -> str:
    """The canonical text PowerDNS stores, so a re-sync finds nothing to change."""
    if rtype == "AAAA":
        return str(ipaddress.IPv6Address(value))
    if rtype in ("CNAME", "NS"):
        return _dot(value)
    if rtype == "MX":
        pref, host = value.split(" ", 1)
        return f"{int(pref)} {_dot(host)}"
    if rtype == "TXT":
        return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return value


def lua_health_check(rtype: str, url: str, addresses: Iterable[str], geo: bool) -> str:
    """A LUA record answering the live addresses (the closest one when a GeoIP database is set)."""
    addrs = ", ".join(f"'{a}'" for a in addresses)
    selector = "pickclosest" if geo else "all"
    return f"{rtype} \"ifurlup('{url}', {{{addrs}}}, {{selector='{selector}', backupSelector='all'}})\""


def render(
    zones: ZonesFile,
    regions: Sequence[RegionAddress],
    *,
    hostmaster: str = "admin.ciris.ai",
    geo: bool = False,
    serial: int | None = None,
) -> list[RenderedZone]:
    """Every region's domain as a full zone (FSD §5.4): SOA at that region's nameserver, NS for all
    nameservers, in-zone glue, billing1/proxy1 at that region, each region's extra names that fall in
    this zone at that region, CAA for Let's Encrypt only, then the zones.yaml records (which replace
    a generated RRset of the same name and type)."""
    serial = serial or initial_serial()
    by_name = {r.name: r for r in regions}
    domains = [r.domain for r in regions]
    out = []
    for region in regions:
        zone = region.domain
        rrsets: dict[tuple[str, str], RRset] = {}

        def put(name: str, rtype: str, ttl: int, records: Iterable[str]) -> None:
            rrsets[(name, rtype)] = RRset(name, rtype, ttl, tuple(sorted(set(records))))

        soa = (
            f"{_dot(region.nameserver)} {_dot(hostmaster)} {serial} "
            f"{SOA_TIMERS['refresh']} {SOA_TIMERS['retry']} {SOA_TIMERS['expire']} {SOA_TIMERS['minimum']}"
        )
        put(f"{zone}.", "SOA", SOA_TTL, [soa])
        put(f"{zone}.", "NS", SOA_TTL, [_dot(r.nameserver) for r in regions])
        put(f"{zone}.", "CAA", DEFAULT_TTL, CAA)
        for r in regions:  # glue for nameservers inside this zone
            if r.nameserver.endswith("." + zone):
                put(_dot(r.nameserver), "A", DEFAULT_TTL, [r.ipv4])
                put(_dot(r.nameserver), "AAAA", DEFAULT_TTL, [_content("AAAA", r.ipv6)])
        for label in SERVICE_LABELS.values():
            put(f"{label}.{zone}.", "A", DEFAULT_TTL, [region.ipv4])
            put(f"{label}.{zone}.", "AAAA", DEFAULT_TTL, [_content("AAAA", region.ipv6)])
        # An extra name is a default name's twin: the same records, at the region that serves it.
        for r in regions:
            for name in r.extra_names:
                if zone_of(name, domains) == zone:
                    put(f"{name}.", "A", DEFAULT_TTL, [r.ipv4])
                    put(f"{name}.", "AAAA", DEFAULT_TTL, [_content("AAAA", r.ipv6)])

        spec = zones.zones.get(zone, Zone())
        user: dict[tuple[str, str], list[Record]] = {}
        for rec in spec.records:
            user.setdefault((_fqdn(rec.name, zone), rec.type), []).append(rec)
        for (name, rtype), recs in user.items():
            first = recs[0]
            if first.health_check:
                candidates = [by_name[n] for n in (first.regions or by_name)]
                addrs = [c.ipv4 if rtype == "A" else _content("AAAA", c.ipv6) for c in candidates]
                rrsets.pop((name, rtype), None)
                put(name, "LUA", first.ttl, [lua_health_check(rtype, first.health_check, addrs, geo)])
            else:
                values = [by_name[r.region].ipv4 if rtype == "A" else by_name[r.region].ipv6 if r.region else r.value for r in recs]
                put(name, rtype, first.ttl, [_content(rtype, v) for v in values])  # type: ignore[arg-type]
        out.append(RenderedZone(f"{zone}.", spec.dnssec, tuple(sorted(rrsets.values(), key=lambda r: (r.name, r.type)))))
    return out


def to_rfc1035(zone: RenderedZone) -> str:
    """The zone as a master file (LUA records appear as PowerDNS writes them)."""
    lines = [f"$ORIGIN {zone.name}", f"; rendered by ciris-bridge from records/zones.yaml"]
    for r in zone.rrsets:
        for content in r.records:
            lines.append(f"{r.name:<40} {r.ttl:>6} IN {r.type:<5} {content}")
    return "\n".join(lines) + "\n"


# --- the server --------------------------------------------------------------------------------


def pdns_conf(
    *,
    api_key: str,
    data_dir: str = "/var/lib/powerdns",
    listen: Sequence[str] = ("0.0.0.0", "::"),
    port: int = 53,
    api_address: str = "127.0.0.1",
    api_port: int = 8081,
    health_interval: int = 5,
    geoip_database: str | None = None,
    run_as: str | None = "pdns",
    metrics_from: Sequence[str] = (),
) -> str:
    """PowerDNS Authoritative config: embedded LMDB, no recursion (the auth server has none, so
    foreign zones are REFUSED), no zone transfers (each server is loaded through its own API),
    the HTTP API on the host's loopback only. `metrics_from`: addresses also let in (Prometheus
    scraping /metrics from its container; the API itself still needs the key)."""
    allow = ["127.0.0.1", "::1"] if api_address in ("127.0.0.1", "::1") else [api_address]
    if metrics_from:
        api_address, allow = "0.0.0.0", ["127.0.0.1", "::1", *metrics_from]
    lines = [
        f"launch=lmdb{',geoip' if geoip_database else ''}",
        f"lmdb-filename={data_dir}/pdns.lmdb",
        "lmdb-shards=1",
        f"local-address={', '.join(listen)}",
        f"local-port={port}",
        "disable-axfr=yes",
        "version-string=anonymous",
        "security-poll-suffix=",  # no phoning home
        "api=yes",
        f"api-key={api_key}",
        "webserver=yes",
        f"webserver-address={api_address}",
        f"webserver-port={api_port}",
        f"webserver-allow-from={','.join(allow)}",
        "enable-lua-records=yes",
        f"lua-health-checks-interval={health_interval}",
        "log-dns-queries=no",
        # A synced key set (a rollover's step, ADR 20) is signed with at once, not after the key
        # cache's 30 s: both regions change within one deploy. Our query rates make the lookup free.
        "dnssec-key-cache-ttl=0",
        "loglevel=4",
    ]
    if geoip_database:
        lines += [f"geoip-database-files={geoip_database}", "edns-subnet-processing=yes"]
    if run_as:
        lines += [f"setuid={run_as}", f"setgid={run_as}"]
    return "\n".join(lines) + "\n"
