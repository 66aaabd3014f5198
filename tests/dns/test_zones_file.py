"""records/zones.yaml: each mistake is one message naming the zone and the record."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from components import config, dns, dnssec, mocks, plan
from tests.conftest import REPO, stack_raw, third_region

PROD = config.load_stack_file(REPO / "Pulumi.production.yaml")
Z = "ciris-services-1.ai"


def zones(records: str, zone: str = Z) -> str:
    return f"zones:\n  {zone}:\n" + "".join(f"    - {line}\n" for line in records.strip().splitlines())


CASES = [
    ("{name: www, type: SRV, value: x}", "record 'www' SRV: unknown type; expected one of A, AAAA, CNAME, TXT, CAA, MX, NS"),
    ("{name: '@', type: NS, value: ns9.example.org}", "record '@' NS: the apex NS set is generated"),
    ("{name: 'Bad Name', type: A, value: 192.0.2.1}", "record 'Bad Name' A: bad name"),
    ("{name: '@', type: CNAME, value: other.example.org}", "record '@' CNAME: CNAME is not allowed at the zone apex"),
    ("{name: www, type: CNAME, value: other.example.org}\n{name: www, type: TXT, value: hello}", "record 'www' CNAME: CNAME beside other data at 'www'"),
    ("{name: billing1, type: CNAME, value: other.example.org}", "record 'billing1' CNAME: CNAME beside other data"),
    ("{name: www, type: A, value: 192.0.2.1, ttl: 5}", "record 'www' A: ttl 5 out of range 30-604800"),
    ("{name: www, type: A, value: 192.0.2.1, ttl: 9999999}", "record 'www' A: ttl 9999999 out of range"),
    ("{name: www, type: A, region: mars}", "record 'www' A: unknown region 'mars'; regions are eu-west, us-east"),
    ("{name: www, type: A, health_check: 'https://x.example/health', regions: [us-east, moon]}", "unknown region 'moon'"),
    ("{name: www, type: A, value: 192.0.2.1}\n{name: www, type: A, value: 192.0.2.1}", "record 'www' A: duplicate record"),
    ("{name: www, type: A, value: 999.1.1.1}", "record 'www' A: value '999.1.1.1' is not an IPv4 address"),
    ("{name: www, type: AAAA, value: 192.0.2.1}", "is not an IPv6 address"),
    ("{name: '@', type: MX, value: mail.example.org}", "record '@' MX: value 'mail.example.org' is not 'preference host'"),
    ("{name: '@', type: CAA, value: 'issue letsencrypt.org'}", "is not 'flags tag \"value\"'"),
    ("{name: www, type: A}", "record 'www' A: give exactly one of value, region or health_check"),
    ("{name: www, type: TXT, region: us-east}", "region and health_check are for A/AAAA records"),
    ("{name: www, type: A, health_check: 'ftp://x/'}", "is not an http(s) URL"),
    ("{name: www, type: A, value: 192.0.2.1, colour: blue}", "zone ciris-services-1.ai, record 'www': colour: unknown field"),
    ("{name: www, type: A, value: 192.0.2.1, ttl: 60}\n{name: www, type: A, value: 192.0.2.2, ttl: 300}", "ttl differs"),
]


@pytest.mark.parametrize("records,message", CASES)
def test_bad_zones_file_names_zone_and_record(records, message):
    with pytest.raises(dns.ZonesError) as info:
        dns.load(zones(records), PROD.regions)
    text = str(info.value)
    assert text.startswith(f"zones.yaml: zone {Z}"), text
    assert message in text
    assert "\n" not in text


def test_zone_that_no_region_serves():
    with pytest.raises(dns.ZonesError, match="zone example.org: not the domain of any region"):
        dns.load(zones("{name: www, type: A, value: 192.0.2.1}", zone="example.org"), PROD.regions)


def test_bad_zones_file_stops_the_plan_with_exit_2(tmp_path):
    bad_zones = tmp_path / "zones.yaml"
    bad_zones.write_text(zones("{name: '@', type: CNAME, value: x.example.org}"))
    stack = tmp_path / "Pulumi.production.yaml"
    stack.write_text((REPO / "Pulumi.production.yaml").read_text() + f"  ciris-bridge:zones_file: {bad_zones}\n")
    result = subprocess.run([sys.executable, "-m", "components.plan", "production", "--stack-file", str(stack)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert f"ciris-bridge:zones_file: {bad_zones}: zone {Z}, record '@' CNAME: CNAME is not allowed at the zone apex" in result.stderr


def test_committed_zone_files_are_valid():
    assert set(PROD.zones.zones) == {"ciris-services-1.ai", "ciris-services-2.ai"}
    staging = config.load_stack_file(REPO / "Pulumi.staging.yaml")
    assert set(staging.zones.zones) == {"staging.ciris-services-1.ai", "staging.ciris-services-2.ai"}


def addresses(cfg) -> list[dns.RegionAddress]:
    return [dns.RegionAddress(r.name, r.domain, r.nameserver_fqdn, f"192.0.2.{i + 1}", f"2001:db8::{i + 1}") for i, r in enumerate(cfg.regions)]


def test_fsd_zone_layout_and_fsd_list_form():
    """FSD §5.4 for ciris-services-2.ai, with the FSD's own list-under-zone form of zones.yaml."""
    regions = addresses(PROD)
    rendered = {z.name: z for z in dns.render(dns.load("zones:\n  ciris-services-2.ai:\n    - {name: www, type: CNAME, value: proxy1.ciris-services-2.ai}\n", regions), regions)}
    z2 = rendered["ciris-services-2.ai."]
    soa = z2.rrset("ciris-services-2.ai.", "SOA").records[0].split()
    assert soa[:2] == ["ns2.ciris-services-2.ai.", "admin.ciris.ai."] and soa[3:] == ["3600", "600", "604800", "300"]
    assert z2.rrset("ciris-services-2.ai.", "NS").records == ("ns1.ciris-services-1.ai.", "ns2.ciris-services-2.ai.")
    assert z2.rrset("ns2.ciris-services-2.ai.", "A").records == ("192.0.2.2",)
    assert z2.rrset("ns1.ciris-services-1.ai.", "A") is None  # that glue lives in zone 1
    assert z2.rrset("billing1.ciris-services-2.ai.", "A").records == ("192.0.2.2",)
    assert z2.rrset("www.ciris-services-2.ai.", "CNAME").records == ("proxy1.ciris-services-2.ai.",)
    text = dns.to_rfc1035(z2)
    assert text.startswith("$ORIGIN ciris-services-2.ai.") and "IN SOA   ns2.ciris-services-2.ai." in text


def test_health_check_with_geo_picks_closest():
    regions = addresses(PROD)
    zf = dns.load(zones("{name: api, type: A, health_check: 'https://api.ciris-services-1.ai/health'}"), regions)
    plain = dns.render(zf, regions)[0].rrset(f"api.{Z}.", "LUA").records[0]
    geo = dns.render(zf, regions, geo=True)[0].rrset(f"api.{Z}.", "LUA").records[0]
    assert plain == "A \"ifurlup('https://api.ciris-services-1.ai/health', {'192.0.2.1', '192.0.2.2'}, {selector='all', backupSelector='all'})\""
    assert "selector='pickclosest'" in geo
    assert "launch=lmdb,geoip" in dns.pdns_conf(api_key="k", geoip_database="/geo/City.mmdb")


def test_any_number_of_regions():
    raw, secret_keys = stack_raw("production")
    cfg = config.parse(third_region(raw), secret_keys)
    rendered = dns.render(cfg.zones, addresses(cfg))
    assert len(rendered) == 3
    for z in rendered:
        assert len(z.rrset(z.name, "NS").records) == 3


def test_api_key_never_in_plan_output():
    result = subprocess.run([sys.executable, "-m", "components.plan", "staging", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert "dns-api-key-xxxx" not in result.stdout + result.stderr  # the mock's generated key
    sync = next(r for r in doc["resources"] if r["name"] == "us-east-dns-sync")
    assert sync["inputs"]["stdin"] == "[secret]"
    key = next(r for r in doc["resources"] if r["name"] == "us-east-dns-api-key")
    assert key["inputs"]["length"] == 40


# --- extra host names (regions[].names, ADR 19) ---------------------------------------------------


def with_names(regions: list[dns.RegionAddress], names: dict[str, tuple[str, ...]]) -> list[dns.RegionAddress]:
    """`regions` with these extra names, by region name."""
    return [dataclasses.replace(r, extra_names=names.get(r.name, ())) for r in regions]


def test_an_extra_name_in_our_zones_gets_the_serving_regions_records():
    regions = with_names(addresses(PROD), {"us-east": ("llm01.ciris-services-1.ai", "api.ciris-services-2.ai", "ciris-services-1.ai"),
                                           "eu-west": ("llm01.ciris-services-eu-1.com",)})
    z1, z2 = dns.render(PROD.zones, regions)
    assert z1.rrset("llm01.ciris-services-1.ai.", "A").records == ("192.0.2.1",)
    assert z1.rrset("llm01.ciris-services-1.ai.", "AAAA").records == ("2001:db8::1",)
    assert z1.rrset("ciris-services-1.ai.", "A").records == ("192.0.2.1",)  # the apex too
    # In the other region's zone, it still points at the region that serves it.
    assert z2.rrset("api.ciris-services-2.ai.", "A").records == ("192.0.2.1",)
    assert z1.rrset("api.ciris-services-2.ai.", "A") is None
    # Outside our zones: no record anywhere; the plan warns, with the addresses to point it at.
    assert not any("eu-1.com" in r.name for z in (z1, z2) for r in z.rrsets)
    warning = dns.foreign_names_warning(regions[1], [r.domain for r in regions])
    assert warning.startswith("dns: eu-west serves llm01.ciris-services-eu-1.com, outside the bridge's zones "
                              "(ciris-services-1.ai, ciris-services-2.ai)")
    assert "(A 192.0.2.2, AAAA 2001:db8::2)" in warning
    assert dns.foreign_names_warning(regions[0], [r.domain for r in regions]) is None


def test_a_listed_record_replaces_an_extra_names_as_it_does_a_default_names():
    regions = with_names(addresses(PROD), {"us-east": ("llm01.ciris-services-1.ai",)})
    zf = dns.load(zones("{name: llm01, type: A, health_check: 'https://llm01.ciris-services-1.ai/health'}"), regions)
    z1 = dns.render(zf, regions)[0]
    assert z1.rrset("llm01.ciris-services-1.ai.", "A") is None and z1.rrset("llm01.ciris-services-1.ai.", "LUA")
    assert z1.rrset("llm01.ciris-services-1.ai.", "AAAA").records == ("2001:db8::1",)


@pytest.mark.parametrize("records,message", [
    ("{name: llm01, type: CNAME, value: other.example.org}", "record 'llm01' CNAME: CNAME beside other data at 'llm01'"),
    ("{name: eu, type: NS, value: ns.example.org}",
     "record 'eu' NS: delegates llm01.eu.ciris-services-1.ai, which eu-west serves (its `names`)"),
])
def test_zones_file_cannot_hide_an_extra_name(records, message):
    regions = with_names(addresses(PROD), {"us-east": ("llm01.ciris-services-1.ai",),
                                           "eu-west": ("llm01.eu.ciris-services-1.ai",)})
    with pytest.raises(dns.ZonesError, match=re.escape(message)):
        dns.load(zones(records), regions)


def test_the_most_specific_zone_holds_a_name():
    assert dns.zone_of("a.staging.x.ai", ["x.ai", "staging.x.ai"]) == "staging.x.ai"
    assert dns.zone_of("x.ai", ["x.ai"]) == "x.ai"
    assert dns.zone_of("notx.ai", ["x.ai"]) is None


# --- DNSSEC: one key set per zone (ADR 20) ---------------------------------------------------------


@pytest.mark.parametrize("options,message", [
    ("dnssec_keys: ['1']", "dnssec_keys: the zone is not signed (dnssec: false)"),
    ("dnssec: true\n    dnssec_keys: [a, a]", "dnssec_keys: a key is listed twice (a, a)"),
    ("dnssec: true\n    dnssec_keys: [a, b, c]", "dnssec_keys: List should have at most 2 items"),
    ("dnssec: true\n    dnssec_keys: []", "dnssec_keys: List should have at least 1 item"),
    ("dnssec: true\n    dnssec_keys: ['Key 1']", "dnssec_keys.0: String should match pattern"),
])
def test_bad_dnssec_keys_name_the_zone_and_the_key(options, message):
    with pytest.raises(dns.ZonesError) as info:
        dns.load(f"zones:\n  {Z}:\n    {options}\n    records: []\n", PROD.regions)
    assert str(info.value).startswith(f"zones.yaml: zone {Z}: {message}"), str(info.value)


def test_a_signed_zone_sends_every_region_the_same_keys_and_the_registrar_their_ds(tmp_path):
    raw, secret_keys = stack_raw("production")
    signed = tmp_path / "zones.yaml"
    signed.write_text(f"zones:\n  {Z}:\n    dnssec: true\n    dnssec_keys: ['2026', '2027']\n    records: []\n"
                      "  ciris-services-2.ai: []\n")
    raw["ciris-bridge:zones_file"] = str(signed)
    p = plan.run("production", raw, secret_keys)
    sent = {}
    for region in ("us-east", "eu-west"):
        sync = next(r for r in p.registrations if r.name == f"{region}-dns-sync")
        zones = {z["name"]: z for z in json.loads(mocks.unwrap(sync.inputs)["stdin"])["zones"]}
        assert "keys" not in zones["ciris-services-2.ai."]
        sent[region] = zones[f"{Z}."]["keys"]
        # The trigger moves with the keys' public halves, never their private ones.
        assert all(k["private"].split()[-1] not in json.dumps(mocks.unwrap(sync.inputs)["triggers"]) for k in sent[region])
    assert sent["us-east"] == sent["eu-west"] and [k["name"] for k in sent["us-east"]] == ["2026", "2027"]
    assert "dnssec_ds" not in p.secret_outputs
    assert p.outputs["dnssec_ds"] == {Z: [dnssec.ds_record(Z, k["dnskey"]) for k in sent["us-east"]]}
    assert all(re.fullmatch(r"\d+ 13 2 [0-9a-f]{64}", ds) for ds in p.outputs["dnssec_ds"][Z])
