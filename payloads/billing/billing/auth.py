"""Signed tokens (FSD §7: JWT issued by billing): EdDSA (Ed25519) only, issuer, audience and expiry
enforced with 60 s leeway. Each token names its key (`kid`, jwks.py); billing and the proxy verify
it with that key of the published set, so a new key can sign while the old one still verifies (ADR 21)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Mapping

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from billing import jwks

ISSUER = "ciris-billing"
AUDIENCE = "ciris-bridge"
LEEWAY_SECONDS = 60
ROLES = ("user", "service", "admin")
Role = Literal["user", "service", "admin"]


class AuthError(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    sub: str
    role: Role
    exp: int = 0

    def may_act_for(self, user_id: str) -> bool:
        return self.role in ("service", "admin") or self.sub == user_id


def mint(key: Ed25519PrivateKey, sub: str, role: Role, ttl_seconds: int, now: float | None = None) -> tuple[str, int]:
    iat = int(now if now is not None else time.time())
    exp = iat + ttl_seconds
    claims = {"sub": sub, "role": role, "iss": ISSUER, "aud": AUDIENCE, "iat": iat, "exp": exp}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": jwks.thumbprint(key.public_key())}), exp


def candidates(keys: Mapping[str, Ed25519PublicKey], token: str) -> list[Ed25519PublicKey]:
    """The key the token's kid names; every key for a token without one (minted before kids)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as e:
        raise AuthError(str(e)) from None
    if kid is None:
        return list(keys.values())
    if not isinstance(kid, str) or kid not in keys:
        raise AuthError("unknown key id")
    return [keys[kid]]


def verify(keys: Mapping[str, Ed25519PublicKey], token: str) -> Principal:
    """`keys`: kid -> public key (jwks.parse)."""
    problem = "no key to verify with"
    for key in candidates(keys, token):
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["EdDSA"],  # never the token's own choice: no none, no HS256 with a public key
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.InvalidSignatureError as e:  # checked before the claims: a kid-less token tries the next key
            problem = str(e)
            continue
        except jwt.PyJWTError as e:
            raise AuthError(str(e)) from None
        role, sub = claims.get("role"), claims.get("sub")
        if role not in ROLES or not isinstance(sub, str) or not sub:
            raise AuthError("token has no valid role or subject")
        return Principal(sub=sub, role=role, exp=int(claims["exp"]))
    raise AuthError(problem)


class TokenCache:
    """Remembers tokens that verified, until they expire: the proxy sends the same service token on
    every call, and an Ed25519 verification per request is a large share of a consume's CPU."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], size: int = 4096):
        self.keys, self.size = keys, size
        self._seen: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        hit = self._seen.get(token)
        if hit and time.time() < hit.exp + LEEWAY_SECONDS:
            return hit
        principal = verify(self.keys, token)
        if len(self._seen) >= self.size:
            self._seen.clear()
        self._seen[token] = principal
        return principal


def public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
