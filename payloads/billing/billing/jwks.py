"""Billing's token keys as a JWK Set (RFC 7517): Ed25519 public keys, each with its kid, the key's
RFC 7638 thumbprint (ADR 21). The Pulumi program renders the set with this module, so the kids
billing signs with and the kids every region's billing and proxy verify with cannot disagree."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def thumbprint(key: Ed25519PublicKey) -> str:
    """RFC 7638: SHA-256 of the required members in lexicographic order, no whitespace."""
    x = _b64(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    return _b64(hashlib.sha256(json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":")).encode()).digest())


def jwk(key: Ed25519PublicKey) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64(key.public_bytes(Encoding.Raw, PublicFormat.Raw)),
            "kid": thumbprint(key), "alg": "EdDSA", "use": "sig"}


def render(keys: Iterable[Ed25519PublicKey]) -> str:
    return json.dumps({"keys": [jwk(k) for k in keys]}, indent=2) + "\n"


def parse(text: str) -> dict[str, Ed25519PublicKey]:
    """kid -> key, in the set's order; a ValueError says what is wrong (never a private key here)."""
    try:
        entries = json.loads(text)["keys"]
    except (ValueError, TypeError, KeyError):
        raise ValueError('is not a JWK Set ({"keys": [...]})') from None
    if not isinstance(entries, list) or not entries:
        raise ValueError("holds no keys")
    keys: dict[str, Ed25519PublicKey] = {}
    for i, entry in enumerate(entries):
        if (not isinstance(entry, dict) or (entry.get("kty"), entry.get("crv"), entry.get("alg", "EdDSA")) != ("OKP", "Ed25519", "EdDSA")
                or "d" in entry):
            raise ValueError(f"key {i + 1} is not an Ed25519 public key (kty OKP, crv Ed25519, no d)")
        try:
            key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(str(entry.get("x", "")) + "=="))
        except ValueError:
            raise ValueError(f"key {i + 1} has no valid x") from None
        if entry.get("kid") != thumbprint(key):
            raise ValueError(f"key {i + 1}: kid must be the key's RFC 7638 thumbprint, {thumbprint(key)}")
        keys[entry["kid"]] = key
    return keys
