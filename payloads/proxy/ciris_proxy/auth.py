"""Billing's user tokens, verified in-process with billing's public key (EdDSA, iss, aud, exp,
role=user): no round trip. A verified token is remembered until it expires."""

from __future__ import annotations

import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ciris_proxy.errors import ApiError

ISSUER, AUDIENCE, LEEWAY_SECONDS = "ciris-billing", "ciris-bridge", 60  # billing's token contract
MISSING = "missing token: send Authorization: Bearer <token issued by billing>"


class Tokens:
    def __init__(self, public_key: Ed25519PublicKey):
        self.public_key = public_key
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (user id, exp)

    def user(self, authorization: bytes | None) -> str:
        """The user id of `Authorization: Bearer <token>`, or a 401."""
        scheme, _, token = (authorization or b"").decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, MISSING)
        hit = self._verified.get(token)
        if hit and time.time() < hit[1] + LEEWAY_SECONDS:
            return hit[0]
        try:
            claims = jwt.decode(token, self.public_key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER,
                                leeway=LEEWAY_SECONDS, options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "token expired: ask billing for a new one (POST /v1/auth/token)") from None
        except jwt.PyJWTError:
            raise ApiError(401, "invalid token: send Authorization: Bearer <token issued by billing>") from None
        if claims.get("role") != "user":
            raise ApiError(401, "only user tokens may call the proxy")
        try:
            user_id = str(uuid.UUID(str(claims.get("sub"))))
        except ValueError:
            raise ApiError(401, "token subject is not a user id") from None
        if len(self._verified) >= 4096:
            self._verified.clear()
        self._verified[token] = (user_id, float(claims["exp"]))
        return user_id
