"""DNSSEC signing keys: one key set per zone, made by the program and imported into every region's
PowerDNS, so every server signs with the keys whose DS the registrar holds (ADR 20).

A key is a CSK (flags 257: it signs the zone and is the one the DS names), ECDSA P-256 (algorithm
13). A rollover is a double-signature one: the zone's `dnssec_keys` lists the old and the new key,
both published and signing, until the registrar's DS names only the new; then the old is removed.
Pure: the program and the tests turn the same PEM into the same key.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

ALGORITHM = 13  # ECDSAP256SHA256
FLAGS = 257  # zone key + secure entry point: a combined signing key


@dataclass(frozen=True)
class SigningKey:
    name: str  # the zone's `dnssec_keys` entry
    dnskey: str  # the DNSKEY record's text, as PowerDNS lists it: "257 3 13 <base64>"
    private: str  # BIND's private-key format, which PowerDNS's API imports

    def public(self) -> dict:
        return {"name": self.name, "dnskey": self.dnskey}

    def request(self) -> dict:
        """What pdns_sync is sent (on stdin, a secret)."""
        return self.public() | {"private": self.private}


def signing_key(name: str, pem: str) -> SigningKey:
    key = load_pem_private_key(pem.encode(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"DNSSEC key {name!r}: expected an ECDSA P-256 key")
    numbers = key.private_numbers()
    point = numbers.public_numbers.x.to_bytes(32, "big") + numbers.public_numbers.y.to_bytes(32, "big")
    private = base64.b64encode(numbers.private_value.to_bytes(32, "big")).decode()
    return SigningKey(
        name=name,
        dnskey=f"{FLAGS} 3 {ALGORITHM} {base64.b64encode(point).decode()}",
        private=f"Private-key-format: v1.2\nAlgorithm: {ALGORITHM} (ECDSAP256SHA256)\nPrivateKey: {private}\n",
    )


def ds_record(zone: str, dnskey: str) -> str:
    """The SHA-256 DS record the registrar is given for this key: "<key tag> 13 2 <hex>"."""
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.DNSKEY, dnskey)
    return dns.dnssec.make_ds(dns.name.from_text(zone), rdata, "SHA256").to_text()


def with_keys(zones: list[dict], keys: dict[str, list[SigningKey]]) -> list[dict]:
    """pdns_sync's zones (RenderedZone.as_dict) with each signed zone's keys added."""
    return [z | {"keys": [k.request() for k in keys[z["name"].rstrip(".")]]} if z["dnssec"] else z for z in zones]
