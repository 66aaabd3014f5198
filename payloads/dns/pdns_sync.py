#!/usr/bin/env python3
"""Push rendered zones to a PowerDNS Authoritative server through its HTTP API.

    python3 pdns_sync.py < request.json      # {"api_url", "api_key", "zones": [...]}

Creates missing zones, replaces RRsets whose records or TTL differ, deletes RRsets no longer
rendered, and leaves everything else alone: an unchanged input changes nothing, and the SOA serial
moves only when something changed (PowerDNS bumps it, SOA-EDIT-API=DEFAULT: YYYYMMDDnn).
Signed zones carry their keys (components/dnssec.py): the server's key set becomes exactly those.
Prints a JSON summary per zone (changes, serial, DS records when DNSSEC is on); never a key.
Standard library only: it runs with the host's python3.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SERVER = "/api/v1/servers/localhost"


class ApiError(RuntimeError):
    pass


class Api:
    def __init__(self, url: str, key: str, timeout: float = 10):
        self.base, self.key, self.timeout = url.rstrip("/") + SERVER, key, timeout

    def call(self, method: str, path: str, body: object = None) -> object:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("X-API-Key", self.key)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404 and method == "GET":
                return None
            detail = e.read().decode(errors="replace")[:300]
            raise ApiError(f"{method} {path}: HTTP {e.code} {detail}") from None
        return json.loads(raw) if raw else None

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.call("GET", "")
                return
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                if time.monotonic() > deadline:
                    raise ApiError(f"PowerDNS API at {self.base} not reachable: {e}") from None
                time.sleep(0.5)


def zone_path(name: str) -> str:
    return "/zones/" + urllib.parse.quote(name, safe="")


def _soa_without_serial(content: str) -> list[str]:
    parts = content.split()
    return parts[:2] + parts[3:]


def sync_zone(api: Api, desired: dict) -> dict:
    name = desired["name"]
    want = {(r["name"], r["type"]): (r["ttl"], sorted(r["records"])) for r in desired["rrsets"]}
    current = api.call("GET", zone_path(name))
    created = current is None
    if created:
        api.call(
            "POST",
            "/zones",
            {
                "name": name,
                "kind": "Native",
                "soa_edit_api": "DEFAULT",
                "nameservers": [],
                "rrsets": [
                    {"name": n, "type": t, "ttl": ttl, "records": [{"content": c, "disabled": False} for c in recs]}
                    for (n, t), (ttl, recs) in want.items()
                ],
            },
        )
        changed = sorted(f"{n} {t}" for n, t in want)
    else:
        have = {
            (r["name"], r["type"]): (r["ttl"], sorted(x["content"] for x in r["records"]))
            for r in current["rrsets"]  # type: ignore[index]
        }
        patch = []
        for (n, t), (ttl, recs) in want.items():
            if t == "SOA" and (n, t) in have:
                old_ttl, old = have[(n, t)]
                if old_ttl == ttl and _soa_without_serial(old[0]) == _soa_without_serial(recs[0]):
                    continue
                serial = old[0].split()[2]  # keep the server's serial; SOA-EDIT-API bumps it
                parts = recs[0].split()
                recs = [" ".join(parts[:2] + [serial] + parts[3:])]
            elif have.get((n, t)) == (ttl, recs):
                continue
            patch.append({"name": n, "type": t, "ttl": ttl, "changetype": "REPLACE",
                          "records": [{"content": c, "disabled": False} for c in recs]})
        for n, t in have:
            if (n, t) not in want:
                patch.append({"name": n, "type": t, "changetype": "DELETE"})
        if patch:
            api.call("PATCH", zone_path(name), {"rrsets": patch})
        changed = sorted(f"{p['name']} {p['type']}" for p in patch)

    ds = _dnssec(api, name, bool(desired.get("dnssec")), desired.get("keys", []))
    soa = api.call("GET", zone_path(name))
    serial = next(int(r["records"][0]["content"].split()[2]) for r in soa["rrsets"] if r["type"] == "SOA")  # type: ignore[index]
    return {"created": created, "changed": changed, "serial": serial, "dnssec": bool(desired.get("dnssec")), "ds": ds}


def _dnssec(api: Api, name: str, on: bool, want: list[dict]) -> list[str]:
    """The zone's keys become exactly `want` (each {name, dnskey, private}: the same in every
    region, so every server's signatures match the registrar's DS), all published and signing;
    a key no longer wanted is removed. Returns the SHA-256 DS records of the keys it signs with.
    Turning signing off removes every key: take the DS records away at the registrar first (README)."""
    if on and not want:
        raise ApiError(f"{name}: dnssec is on but no signing key was sent")
    keys = api.call("GET", zone_path(name) + "/cryptokeys") or []
    have = {k["dnskey"]: k for k in keys}  # type: ignore[union-attr]
    wanted = {key["dnskey"] for key in want} if on else set()
    changed = False
    for key in want if on else []:
        k = have.get(key["dnskey"])
        if k is None:
            api.call("POST", zone_path(name) + "/cryptokeys",
                     {"keytype": "csk", "active": True, "published": True, "privatekey": key["private"]})
            changed = True
        elif not k.get("active") or not k.get("published", True):
            api.call("PUT", f"{zone_path(name)}/cryptokeys/{k['id']}", {"active": True, "published": True})
            changed = True
    for dnskey, k in have.items():
        if dnskey not in wanted:
            api.call("DELETE", f"{zone_path(name)}/cryptokeys/{k['id']}")
            changed = True
    if changed:
        api.call("PUT", zone_path(name) + "/rectify")
        # Answers cached with the old key set's signatures are not served on.
        api.call("PUT", "/cache/flush?domain=" + urllib.parse.quote(name, safe=""))
        keys = api.call("GET", zone_path(name) + "/cryptokeys") or []
    return sorted(ds for k in keys if k.get("active") for ds in k.get("ds", []) if ds.split()[2] == "2")  # type: ignore[union-attr]


def sync(api_url: str, api_key: str, zones: list[dict], wait: float = 60) -> dict:
    api = Api(api_url, api_key)
    api.wait_ready(wait)
    return {z["name"]: sync_zone(api, z) for z in zones}


def main() -> int:
    try:
        request = json.load(sys.stdin)
        summary = sync(request["api_url"], request["api_key"], request["zones"], request.get("wait", 60))
    except (ApiError, KeyError, ValueError) as e:
        print(f"pdns_sync: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
