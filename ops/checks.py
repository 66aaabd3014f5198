"""The checks behind `ops status`: each is one row with a verdict. Run from the operator's machine,
so they see the bridge as a client does: every nameserver for every zone, every edge's health
endpoints and certificates, the declared database layout and the cost estimate."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import asdict, dataclass

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

OK, INFO, WARN, CRIT = "ok", "info", "warn", "crit"
SEVERITY = {OK: 0, INFO: 0, WARN: 1, CRIT: 2}  # the exit code is the worst row's
CERT_WARN_DAYS, CERT_CRIT_DAYS = 14, 3


@dataclass
class Row:
    check: str
    target: str
    verdict: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def soa_serial(zone: str, server: str, port: int = 53, timeout: float = 3.0) -> int:
    """The zone's SOA serial from one nameserver: UDP, then TCP (as resolvers fall back)."""
    query = dns.message.make_query(zone, dns.rdatatype.SOA)
    try:
        answer = dns.query.udp(query, server, port=port, timeout=timeout)
    except (dns.exception.Timeout, OSError):
        answer = dns.query.tcp(query, server, port=port, timeout=timeout)
    for rrset in answer.answer:
        if rrset.rdtype == dns.rdatatype.SOA:
            return rrset[0].serial
    raise LookupError(f"no SOA in the answer (rcode {answer.rcode()})")


def dns_rows(client_config: dict, port: int = 53, timeout: float = 3.0) -> list[Row]:
    rows = []
    for zone in client_config["dns"]["zones"]:
        serials = {}
        for ns in client_config["dns"]["nameservers"]:
            target = f"{zone} @ {ns['name']} ({ns['ipv4']})"
            try:
                serials[ns["name"]] = soa_serial(zone, ns["ipv4"], port, timeout)
                rows.append(Row("dns", target, OK, f"SOA serial {serials[ns['name']]}"))
            except (dns.exception.DNSException, OSError, LookupError) as e:
                rows.append(Row("dns", target, CRIT, f"no SOA answer ({type(e).__name__})"))
        if len(set(serials.values())) > 1:
            seen = ", ".join(f"{n} {s}" for n, s in serials.items())
            rows.append(Row("dns-serial", zone, WARN, f"nameservers disagree: {seen}"))
    return rows


def https_health(address: str, host: str, ca_file: str | None, timeout: float = 5.0) -> tuple[int, str, float]:
    """(HTTP status, the body's start, days the certificate has left) of GET https://host/health,
    sent to `address` with `host` as SNI and Host, the certificate verified."""
    tls = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection((address, 443), timeout=timeout) as raw, tls.wrap_socket(raw, server_hostname=host) as conn:
        not_after = ssl.cert_time_to_seconds(conn.getpeercert()["notAfter"])
        conn.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) < 8192 and (chunk := conn.recv(4096)):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    days = (not_after - dt.datetime.now(dt.timezone.utc).timestamp()) / 86400
    return status, body[:200].decode(errors="replace").strip(), days


def edge_rows(client_config: dict, ca_file: str | None) -> list[Row]:
    rows = []
    for region in client_config["regions"]:
        for service in ("billing", "proxy"):
            host = f"{service}1.{region['domain']}"
            target = f"{region['name']} {host}"
            try:
                status, body, days = https_health(region["ipv4"], host, ca_file)
            except (OSError, ssl.SSLError, ValueError, IndexError) as e:
                rows.append(Row("health", target, CRIT, f"no answer ({type(e).__name__}: {str(e)[:80]})"))
                continue
            # billing's /health is readiness ("a write commits"); 503 names the database's state
            rows.append(Row("health", target, OK if status == 200 else CRIT, f"HTTP {status} {body}"))
            verdict = CRIT if days < CERT_CRIT_DAYS else WARN if days < CERT_WARN_DAYS else OK
            rows.append(Row("certificate", target, verdict, f"{days:.0f} days left"))
    return rows


def database_rows(outputs: dict) -> list[Row]:
    db = outputs.get("database")
    if not db:
        return []
    replicas = ", ".join(db.get("replicas") or []) or "none"
    return [Row("database", "declared", INFO, f"primary {db.get('primary')}, replicas {replicas}, "
                f"{db.get('mode', '?')}; the live leader and lag come from each region's monitoring")]


def cost_rows(outputs: dict) -> list[Row]:
    cost = outputs.get("monthly_cost_usd")
    if not cost:
        return []
    verdict = WARN if cost["total"] > cost["ceiling"] else OK
    return [Row("cost", "monthly estimate", verdict,
                f"${cost['total']:.2f} (target ${cost['target']:.2f}, ceiling ${cost['ceiling']:.2f}; prices as of {cost['prices_as_of']})")]


def worst(rows: list[Row]) -> str:
    """crit, warn or ok (info rows say something but never change the verdict)."""
    return max((r.verdict for r in rows if r.verdict != INFO), key=SEVERITY.__getitem__, default=OK)
