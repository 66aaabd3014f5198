"""The checks behind `ops status`: each is one row with a verdict. Run from the operator's machine,
so they see the bridge as a client does: every nameserver for every zone, every edge's health
endpoints and certificates, the declared database layout and the cost estimate."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from components.monitoring import READINESS  # the same readiness paths the monitoring probes

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
    """The zone's SOA serial from one nameserver, asked as resolvers do: UDP, then TCP, twice over
    (one lost datagram is not an outage)."""
    query = dns.message.make_query(zone, dns.rdatatype.SOA)
    for attempt, ask in enumerate((dns.query.udp, dns.query.tcp) * 2):
        try:
            answer = ask(query, server, port=port, timeout=timeout)
            break
        except (dns.exception.Timeout, OSError):
            if attempt == 3:
                raise
    for rrset in answer.answer:
        if rrset.rdtype == dns.rdatatype.SOA:
            return rrset[0].serial
    raise LookupError(f"no SOA in the answer (rcode {answer.rcode()})")


def dns_rows(client_config: dict, port: int = 53, timeout: float = 3.0) -> list[Row]:
    zones, servers = client_config["dns"]["zones"], client_config["dns"]["nameservers"]
    with ThreadPoolExecutor(max_workers=8) as pool:  # a dead nameserver costs its timeouts once
        asked = {(z, ns["name"]): pool.submit(soa_serial, z, ns["ipv4"], port, timeout) for z in zones for ns in servers}
    rows = []
    for zone in zones:
        serials = {}
        for ns in servers:
            target = f"{zone} @ {ns['name']} ({ns['ipv4']})"
            try:
                serials[ns["name"]] = asked[zone, ns["name"]].result()
                rows.append(Row("dns", target, OK, f"SOA serial {serials[ns['name']]}"))
            except (dns.exception.DNSException, OSError, LookupError) as e:
                rows.append(Row("dns", target, CRIT, f"no SOA answer ({type(e).__name__})"))
        if len(set(serials.values())) > 1:
            seen = ", ".join(f"{n} {s}" for n, s in serials.items())
            rows.append(Row("dns-serial", zone, WARN, f"nameservers disagree: {seen}"))
    return rows


def https_health(address: str, host: str, ca_file: str | None, timeout: float = 5.0,
                 path: str = "/health") -> tuple[int, str, float, float]:
    """(HTTP status, the body's start, seconds the certificate has left, its whole lifetime in
    seconds) of GET https://host<path>, sent to `address` with `host` as SNI and Host, verified."""
    tls = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection((address, 443), timeout=timeout) as raw, tls.wrap_socket(raw, server_hostname=host) as conn:
        cert = conn.getpeercert()
        not_before, not_after = (ssl.cert_time_to_seconds(cert[k]) for k in ("notBefore", "notAfter"))
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) < 8192 and (chunk := conn.recv(4096)):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    left = not_after - dt.datetime.now(dt.timezone.utc).timestamp()
    return status, body[:200].decode(errors="replace").strip(), left, not_after - not_before


def edge_rows(client_config: dict, ca_file: str | None) -> list[Row]:
    rows = []
    for region in client_config["regions"]:
        for service in ("billing", "proxy"):
            host = f"{service}1.{region['domain']}"
            target = f"{region['name']} {host}"
            try:
                status, body, left, lifetime = https_health(region["ipv4"], host, ca_file, path=READINESS[service])
            except (OSError, ssl.SSLError, ValueError, IndexError) as e:
                rows.append(Row("health", target, CRIT, f"no answer ({type(e).__name__}: {str(e)[:80]})"))
                continue
            # Readiness: billing's /health is "a write commits" (503 names the database's state), the
            # proxy's /ready "a paid call can be served" (200 "degraded: stand-in" while billing cannot write).
            verdict = CRIT if status != 200 else WARN if "degraded" in body else OK
            rows.append(Row("health", target, verdict, f"HTTP {status} {body}"))
            rows.append(Row("certificate", target, cert_verdict(left, lifetime), f"{_duration(left)} left"))
    return rows


def cert_verdict(left: float, lifetime: float) -> str:
    """Warn under 14 days, critical under 3 — or, for short-lived certificates (the local stack's
    internal CA issues 12-hour ones, renewed at two thirds), under a third / a tenth of the lifetime."""
    day = 86400
    if left < min(CERT_CRIT_DAYS * day, lifetime / 10):
        return CRIT
    return WARN if left < min(CERT_WARN_DAYS * day, lifetime / 3) else OK


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:.0f} days" if seconds >= 2 * 86400 else f"{seconds / 3600:.1f} hours"


def database_rows(outputs: dict) -> list[Row]:
    db = outputs.get("database")
    if not db:
        return []
    replicas = ", ".join(db.get("replicas") or []) or "none"
    return [Row("database", "declared", INFO, f"primary {db.get('primary')}, replicas {replicas}, "
                f"{db.get('mode', '?')}")]


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
