"""The rendered zones on a real PowerDNS server, loaded by the production sync script, queried with
dnspython over UDP and TCP."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from components import config, dns as zones_mod, dnssec
from tests.conftest import REPO, require_binary
from tests.dns.conftest import API_KEY, SYNC, Server, free_port

Z1, Z2 = "staging.ciris-services-1.ai", "staging.ciris-services-2.ai"
STAGING = config.load_stack_file(REPO / "Pulumi.staging.yaml")
ADDRS = {
    "us-east": ("192.0.2.10", "2001:db8:1::10"),
    "eu-west": ("198.51.100.10", "2001:db8:2::10"),
}


def region_addresses(addrs=ADDRS, cfg=STAGING) -> list[zones_mod.RegionAddress]:
    return [zones_mod.RegionAddress(r.name, r.domain, r.nameserver_fqdn, *addrs[r.name]) for r in cfg.regions]


def render(zones_yaml: str | None = None, addrs=ADDRS) -> list[zones_mod.RenderedZone]:
    regions = region_addresses(addrs)
    zones = STAGING.zones if zones_yaml is None else zones_mod.load(zones_yaml, regions)
    return zones_mod.render(zones, regions, hostmaster=STAGING.services.hostmaster)


def ask(server: Server, name: str, rtype: str, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, "127.0.0.1", port=server.port, timeout=5)


def answers(resp: dns.message.Message, rtype: str) -> set[str]:
    return {rd.to_text() for rrset in resp.answer if rrset.rdtype == dns.rdatatype.from_text(rtype) for rd in rrset}


def serial(server: Server, zone: str) -> int:
    return next(iter(ask(server, zone, "SOA").answer[0])).serial


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_serves_the_rendered_staging_zones(pdns, tcp):
    summary = pdns.sync(render())
    assert set(summary) == {f"{Z1}.", f"{Z2}."} and all(s["created"] for s in summary.values())

    soa_resp = ask(pdns, Z1, "SOA", tcp)
    assert soa_resp.flags & dns.flags.AA
    soa = next(iter(soa_resp.answer[0]))
    assert soa.mname.to_text() == f"ns1.{Z1}." and soa.rname.to_text() == "admin.ciris.ai."
    assert (soa.refresh, soa.retry, soa.expire, soa.minimum) == (3600, 600, 604800, 300)
    assert re.fullmatch(r"20\d{6}\d{2}", str(soa.serial))
    soa2 = next(iter(ask(pdns, Z2, "SOA", tcp).answer[0]))
    assert soa2.mname.to_text() == f"ns2.{Z2}."  # each zone's SOA at its own region

    for zone in (Z1, Z2):
        assert answers(ask(pdns, zone, "NS", tcp), "NS") == {f"ns1.{Z1}.", f"ns2.{Z2}."}
        assert answers(ask(pdns, zone, "CAA", tcp), "CAA") == {'0 issue "letsencrypt.org"', '0 issuewild ";"'}
    assert answers(ask(pdns, f"ns1.{Z1}", "A", tcp), "A") == {"192.0.2.10"}
    assert answers(ask(pdns, f"ns1.{Z1}", "AAAA", tcp), "AAAA") == {"2001:db8:1::10"}
    assert answers(ask(pdns, f"ns2.{Z2}", "A", tcp), "A") == {"198.51.100.10"}
    for label in ("billing1", "proxy1"):
        assert answers(ask(pdns, f"{label}.{Z1}", "A", tcp), "A") == {"192.0.2.10"}
        assert answers(ask(pdns, f"{label}.{Z2}", "A", tcp), "A") == {"198.51.100.10"}
        assert answers(ask(pdns, f"{label}.{Z2}", "AAAA", tcp), "AAAA") == {"2001:db8:2::10"}
    assert answers(ask(pdns, Z1, "TXT", tcp), "TXT") == {'"v=spf1 -all"'}

    missing = ask(pdns, f"nope.{Z1}", "A", tcp)
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.flags & dns.flags.AA
    assert [r.rdtype for r in missing.authority] == [dns.rdatatype.SOA]

    foreign = ask(pdns, "example.com", "A", tcp)
    assert foreign.rcode() == dns.rcode.REFUSED and not foreign.answer


def test_one_changed_record_changes_only_its_rrset(pdns):
    pdns.sync(render())
    before = serial(pdns, Z1), serial(pdns, Z2)

    again = pdns.sync(render())
    assert all(s["changed"] == [] for s in again.values())
    assert (serial(pdns, Z1), serial(pdns, Z2)) == before

    changed_yaml = (REPO / "records" / "zones.staging.yaml").read_text().replace("v=spf1 -all", "v=spf1 include:ciris.ai -all")
    summary = pdns.sync(render(changed_yaml))
    assert summary[f"{Z1}."]["changed"] == [f"{Z1}. TXT"]
    assert summary[f"{Z2}."]["changed"] == []
    assert answers(ask(pdns, Z1, "TXT"), "TXT") == {'"v=spf1 include:ciris.ai -all"'}
    assert serial(pdns, Z1) > before[0]
    assert serial(pdns, Z2) == before[1]
    assert answers(ask(pdns, f"billing1.{Z1}", "A"), "A") == {"192.0.2.10"}


def test_removed_records_are_deleted(pdns):
    pdns.sync(render())
    without = f"zones:\n  {Z1}: []\n  {Z2}: []\n"
    summary = pdns.sync(render(without))
    assert summary[f"{Z1}."]["changed"] == [f"{Z1}. TXT"]
    assert ask(pdns, Z1, "TXT").answer == []


def test_a_region_address_change_moves_its_records(pdns):
    pdns.sync(render())
    moved = {**ADDRS, "eu-west": ("203.0.113.99", "2001:db8:2::99")}
    summary = pdns.sync(render(addrs=moved))
    assert f"billing1.{Z2}. A" in summary[f"{Z2}."]["changed"]
    assert f"ns2.{Z2}. A" in summary[f"{Z2}."]["changed"]
    assert answers(ask(pdns, f"proxy1.{Z2}", "A"), "A") == {"203.0.113.99"}
    assert summary[f"{Z1}."]["changed"] == []  # zone 1 only names ns2, whose glue lives in zone 2


def test_extra_names_are_answered_with_the_serving_regions_addresses(pdns):
    """regions[].names (ADR 19): in our zones, at the region that serves the name; outside, nothing."""
    extra = {"us-east": (f"llm01.{Z1}", f"api.{Z2}"), "eu-west": ("llm01.ciris-services-eu-1.com",)}
    regions = [dataclasses.replace(r, extra_names=extra[r.name]) for r in region_addresses()]
    pdns.sync(zones_mod.render(STAGING.zones, regions, hostmaster=STAGING.services.hostmaster))
    assert answers(ask(pdns, f"llm01.{Z1}", "A"), "A") == {"192.0.2.10"}
    assert answers(ask(pdns, f"llm01.{Z1}", "AAAA", tcp=True), "AAAA") == {"2001:db8:1::10"}
    assert answers(ask(pdns, f"api.{Z2}", "A"), "A") == {"192.0.2.10"}  # eu-west's zone, us-east's name
    assert ask(pdns, "llm01.ciris-services-eu-1.com", "A").rcode() == dns.rcode.REFUSED


class Health:
    """An HTTP /health endpoint on one loopback address that can be stopped and started."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.server = host, port, None

    def start(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b'{"status": "healthy"}')

            def log_message(self, *a):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def wait_for(server: Server, name: str, want: set[str], seconds: float = 20) -> float:
    start = time.monotonic()
    last = None
    while time.monotonic() - start < seconds:
        last = answers(ask(server, name, "A"), "A")
        if last == want:
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"{name} answered {last}, wanted {want} within {seconds}s")


def test_health_checked_record_drops_a_dead_region_and_takes_it_back(pdns):
    port = free_port()
    live = {"us-east": Health("127.0.0.2", port), "eu-west": Health("127.0.0.3", port)}
    for h in live.values():
        h.start()
    addrs = {"us-east": ("127.0.0.2", "::1"), "eu-west": ("127.0.0.3", "::1")}
    zones_yaml = f"""
zones:
  {Z1}:
    - name: api
      type: A
      health_check: http://api.{Z1}:{port}/health
  {Z2}: []
"""
    rendered = render(zones_yaml, addrs)
    lua = rendered[0].rrset(f"api.{Z1}.", "LUA")
    assert lua and "ifurlup(" in lua.records[0] and "'127.0.0.2', '127.0.0.3'" in lua.records[0]
    pdns.sync(rendered)
    try:
        wait_for(pdns, f"api.{Z1}", {"127.0.0.2", "127.0.0.3"})
        live["eu-west"].stop()
        took = wait_for(pdns, f"api.{Z1}", {"127.0.0.2"})
        assert took < 15  # check interval 1 s in the test server
        live["eu-west"].start()
        wait_for(pdns, f"api.{Z1}", {"127.0.0.2", "127.0.0.3"})
    finally:
        for h in live.values():
            if h.server:
                h.server.shutdown()
                h.server.server_close()


def new_key(name: str) -> dnssec.SigningKey:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return dnssec.signing_key(name, pem.decode())


def validated(server: Server, zone: str, ds_records: list[str], tmp_path) -> str:
    """delv, a validating resolver, asking `server` for a signed name with the registrar's DS
    records as its trust anchor: '; fully validated' when the chain from the DS holds."""
    anchors = tmp_path / "anchors.conf"
    anchors.write_text("trust-anchors {\n" + "".join(
        '  "{}." static-ds {} {} {} "{}";\n'.format(zone, *ds.split()) for ds in ds_records) + "};\n")
    out = subprocess.run([require_binary("delv"), f"@{server.address}", "-p", str(server.port), "-a", str(anchors),
                          f"+root={zone}.", f"billing1.{zone}", "A"], capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


def test_one_key_set_validates_from_every_server_before_during_and_after_a_rollover(pdns, tmp_path):
    """Both regions' servers hold the zone's one key set (ADR 20): a validating resolver trusting the
    registrar's DS gets secure answers from each, through a double-signature rollover (old and new
    key signing, then only the new), and an answer signed by a key the DS does not name fails."""
    (tmp_path / "eu-west").mkdir()
    other = Server(tmp_path / "eu-west")
    try:
        zones_yaml = f"zones:\n  {Z1}:\n    dnssec: true\n    records: []\n  {Z2}: []\n"
        old, new = new_key("1"), new_key("2")
        for keys, trusted in (([old], [old]), ([old, new], [old]), ([old, new], [new]), ([new], [new])):
            ds = [dnssec.ds_record(Z1, k.dnskey) for k in trusted]
            for server in (pdns, other):
                summary = server.sync(render(zones_yaml), {Z1: keys})
                assert summary[f"{Z1}."]["ds"] == sorted(dnssec.ds_record(Z1, k.dnskey) for k in keys)
                assert summary[f"{Z2}."]["ds"] == []
                out = validated(server, Z1, ds, tmp_path)
                assert "; fully validated" in out and "192.0.2.10" in out, (server.address, [k.name for k in keys], out)
        again = pdns.sync(render(zones_yaml), {Z1: [new]})
        assert again[f"{Z1}."]["changed"] == []
        # The retired key's DS left at the registrar: nothing validates (the check can fail).
        out = validated(pdns, Z1, [dnssec.ds_record(Z1, old.dnskey)], tmp_path)
        assert "; fully validated" not in out and "resolution failed" in out, out
    finally:
        other.stop()


def test_signing_switched_off_removes_the_keys(pdns):
    zones_yaml = f"zones:\n  {Z1}:\n    dnssec: true\n    records: []\n"
    pdns.sync(render(zones_yaml), {Z1: [new_key("1")]})
    assert answers(ask(pdns, Z1, "DNSKEY"), "DNSKEY")
    summary = pdns.sync(render(f"zones:\n  {Z1}:\n    dnssec: false\n    records: []\n"))
    assert summary[f"{Z1}."]["ds"] == [] and not answers(ask(pdns, Z1, "DNSKEY"), "DNSKEY")


def test_sync_fails_clearly_when_the_api_is_down():
    request = {"api_url": f"http://127.0.0.1:{free_port()}", "api_key": API_KEY, "zones": [], "wait": 1}
    result = subprocess.run([sys.executable, str(SYNC)], input=json.dumps(request), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("pdns_sync: PowerDNS API at http://127.0.0.1:") and "not reachable" in result.stderr
    assert API_KEY not in result.stderr
