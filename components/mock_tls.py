"""What the `tls` provider computes, computed for real under the mock runtime.

The tls provider makes keys and certificates on the operator's machine; it is not a cloud. Under
the mock runtime the same resources get real PEMs, so `make local` runs Postgres, the edge and the
token signing with real keys. Keys derive from the resource's name and signatures are
deterministic, so two runs render the same bundle (nothing is redeployed for nothing). Such keys
are predictable: they are for this machine only, never for a stack in a cloud.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding, NoEncryption, PrivateFormat, PublicFormat, load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOT_BEFORE = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def private_key(name: str, inputs: dict[str, Any]) -> dict[str, str]:
    seed = hashlib.sha256(name.encode()).digest()
    algorithm = inputs.get("algorithm")
    if algorithm == "ED25519":
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    elif algorithm == "ECDSA":
        curve = {"P256": ec.SECP256R1(), "P384": ec.SECP384R1()}[inputs.get("ecdsaCurve", "P224")]
        key = ec.derive_private_key(int.from_bytes(seed, "big") % (2**255), curve)
    else:
        raise NotImplementedError(f"mock tls: no {algorithm} keys (the program uses ED25519 and ECDSA)")
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    return {"privateKeyPem": pem, "privateKeyPemPkcs8": pem, "publicKeyPem": public,
            "privateKeyOpenssh": key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode(),
            "publicKeyOpenssh": key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + "\n"}


def _name(subject: dict | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (subject or {}).get("commonName", "ciris"))])


def _sans(inputs: dict) -> list[x509.GeneralName]:
    return [x509.IPAddress(ipaddress.ip_address(a)) for a in inputs.get("ipAddresses") or []] + [
        x509.DNSName(d) for d in inputs.get("dnsNames") or []
    ]


def _sign(name: str, inputs: dict, subject: x509.Name, public_key, issuer: x509.Name, issuer_key, sans) -> str:
    uses = set(inputs.get("allowedUses") or [])
    is_ca = bool(inputs.get("isCaCertificate"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(int.from_bytes(hashlib.sha256(name.encode()).digest()[:16], "big") >> 1)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_BEFORE + datetime.timedelta(hours=int(inputs.get("validityPeriodHours", 24))))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    ekus = [oid for use, oid in (("server_auth", ExtendedKeyUsageOID.SERVER_AUTH),
                                 ("client_auth", ExtendedKeyUsageOID.CLIENT_AUTH)) if use in uses]
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    extra = {"ecdsa_deterministic": True} if isinstance(issuer_key, ec.EllipticCurvePrivateKey) else {}
    return builder.sign(issuer_key, algorithm, **extra).public_bytes(Encoding.PEM).decode()


def self_signed_cert(name: str, inputs: dict) -> dict[str, str]:
    key = load_pem_private_key(inputs["privateKeyPem"].encode(), None)
    subject = _name(inputs.get("subject"))
    return {"certPem": _sign(name, inputs, subject, key.public_key(), subject, key, _sans(inputs))}


def cert_request(inputs: dict) -> dict[str, str]:
    key = load_pem_private_key(inputs["privateKeyPem"].encode(), None)
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(inputs.get("subject")))
    if sans := _sans(inputs):
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    extra = {"ecdsa_deterministic": True} if isinstance(key, ec.EllipticCurvePrivateKey) else {}
    return {"certRequestPem": builder.sign(key, algorithm, **extra).public_bytes(Encoding.PEM).decode()}


def locally_signed_cert(name: str, inputs: dict) -> dict[str, str]:
    csr = x509.load_pem_x509_csr(inputs["certRequestPem"].encode())
    ca = x509.load_pem_x509_certificate(inputs["caCertPem"].encode())
    ca_key = load_pem_private_key(inputs["caPrivateKeyPem"].encode(), None)
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    return {"certPem": _sign(name, inputs, csr.subject, csr.public_key(), ca.subject, ca_key, sans)}
