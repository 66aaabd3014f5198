"""Signed tokens (FSD §7: JWT issued by billing): EdDSA (Ed25519) only, issuer, audience and expiry
enforced with 60 s leeway. Each token names its key (`kid`, jwks.py); billing and the proxy verify
it with that key of the published set, so a new key can sign while the old one still verifies (ADR 21).

The proxy's own role, `proxy`, is scoped and revocable (ADR 25): it is accepted only on the routes the
proxy calls (PROXY_ROUTES), and only while the generation its token names (`gen`) is one billing is
configured to accept (PROXY_TOKEN_GENERATIONS), so an operator revokes it without a new signing key."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Collection, Literal, Mapping

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from billing import jwks

ISSUER = "ciris-billing"
AUDIENCE = "ciris-bridge"
LEEWAY_SECONDS = 60
ROLES = ("user", "service", "admin", "proxy")
Role = Literal["user", "service", "admin", "proxy"]
GENERATION_MAX_CHARS = 32

# Everything the proxy calls (payloads/proxy: the credit gate, credential resolution, reconcile), as
# (method, route template). An allow-list: a route added later is refused to the proxy until named here.
PROXY_ROUTES = frozenset({
    ("POST", "/v1/auth/resolve"),
    ("POST", "/v1/credits/holds"),
    ("POST", "/v1/credits/holds/{hold_id}/capture"),
    ("POST", "/v1/credits/holds/{hold_id}/release"),
    ("POST", "/v1/credits/holds/void"),
    ("POST", "/v1/credits/forced-debits"),
    ("POST", "/v1/credits/lookup"),
})


class AuthError(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    sub: str
    role: Role
    exp: int = 0

    def may_act_for(self, user_id: str) -> bool:
        return self.role in ("service", "admin") or self.sub == user_id


def mint(key: Ed25519PrivateKey, sub: str, role: Role, ttl_seconds: int, now: float | None = None,
         generation: str | None = None) -> tuple[str, int]:
    """`generation`: required for (and only for) the proxy role, the handle it is revoked by."""
    if (role == "proxy") != (generation is not None):
        raise ValueError("a proxy token needs a generation, and only a proxy token has one")
    iat = int(now if now is not None else time.time())
    exp = iat + ttl_seconds
    claims = {"sub": sub, "role": role, "iss": ISSUER, "aud": AUDIENCE, "iat": iat, "exp": exp}
    if generation is not None:
        claims["gen"] = generation
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


def verify(keys: Mapping[str, Ed25519PublicKey], token: str, proxy_generations: Collection[str] = ()) -> Principal:
    """`keys`: kid -> public key (jwks.parse); `proxy_generations`: the proxy tokens' generations
    accepted (none: every proxy token is refused)."""
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
        gen = claims.get("gen")
        if role == "proxy" and not (isinstance(gen, str) and gen in proxy_generations):  # revoked, or none
            raise AuthError("proxy token of a generation not accepted")
        return Principal(sub=sub, role=role, exp=int(claims["exp"]))
    raise AuthError(problem)


class TokenCache:
    """Remembers tokens that verified, until they expire: the proxy sends the same service token on
    every call, and an Ed25519 verification per request is a large share of a consume's CPU."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], size: int = 4096, proxy_generations: Collection[str] = ()):
        self.keys, self.size, self.proxy_generations = keys, size, frozenset(proxy_generations)
        self._seen: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        hit = self._seen.get(token)
        if hit and time.time() < hit.exp + LEEWAY_SECONDS:
            return hit
        principal = verify(self.keys, token, self.proxy_generations)
        if len(self._seen) >= self.size:
            self._seen.clear()
        self._seen[token] = principal
        return principal


def public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
