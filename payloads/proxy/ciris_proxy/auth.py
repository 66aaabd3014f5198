"""Who is calling (ADR 8, Auth). Three credentials, as the released CIRIS agent sends them:

- billing's user tokens (EdDSA), verified in-process with the key of billing's published set their
  kid names (iss, aud, exp, role=user; ADR 21): no round trip;
- a Google or Apple ID token as the bearer (the agent's mobile mode), and
- a server API key (`cbk_live_…`) as the bearer or in X-API-Key (server mode).

The last two are not verified here: billing resolves each once (POST /v1/auth/resolve, with the
proxy's own token) to the user it names, and the answer is remembered by the credential's sha256 — an ID
token until its expiry, an API key for `api_key_ttl_seconds` (config) so a revoked key stops within it.
While billing cannot answer, a credential it resolved before keeps working (a key for at most
API_KEY_STALE_SECONDS, an ID token never past its expiry); one it never saw is a 503, not a 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ciris_proxy.errors import ApiError

log = logging.getLogger("ciris_proxy")
ISSUER, AUDIENCE, LEEWAY_SECONDS = "ciris-billing", "ciris-bridge", 60  # billing's token contract
SEND = "send Authorization: Bearer <a token issued by billing, a Google or Apple ID token, or a server API key>"
MISSING = f"missing credential: {SEND}"
API_KEY_PREFIX = "cbk_live_"  # billing's keys (payloads/billing/billing/api_keys.py)
MAX_CHARS = {"id_token": 8192, "api_key": 128}  # billing's own bounds (identity.py, api_keys.py)
JWT = re.compile(r"[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*")  # billing takes an ID token only in this form
API_KEY_STALE_SECONDS = 900.0  # while billing is away, a key it accepted this recently still works
RESOLVE_TIMEOUT_SECONDS = 3.0
MAX_REMEMBERED = 10_000
REFUSED = {"id_token": "Google or Apple ID token refused", "api_key": "API key refused"}
RETRY = {"id_token": "sign in again and send Authorization: Bearer <the new Google or Apple ID token>",
         "api_key": "send Authorization: Bearer <a current server API key> (or X-API-Key)"}


class Tokens:
    def __init__(self, keys: dict[str, Ed25519PublicKey]):
        self.keys = keys  # kid -> billing's public key
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (user id, exp)

    def user(self, authorization: bytes | None) -> str:
        """The user id of `Authorization: Bearer <token>`, or a 401."""
        token = bearer(authorization)
        if not token:
            raise ApiError(401, MISSING)
        return self.verify(token)

    def verify(self, token: str) -> str:
        hit = self._verified.get(token)
        if hit and time.time() < hit[1] + LEEWAY_SECONDS:
            return hit[0]
        claims = self.claims(token)
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

    def candidates(self, token: str) -> list[Ed25519PublicKey]:
        """The key the token's kid names (none for a kid not in the set); every key for a token
        without a kid (minted before kids)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return []
        if kid is None:
            return list(self.keys.values())
        return [self.keys[kid]] if isinstance(kid, str) and kid in self.keys else []

    def claims(self, token: str) -> dict:
        for key in self.candidates(token):
            try:
                return jwt.decode(token, key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER,  # never the token's alg
                                  leeway=LEEWAY_SECONDS, options={"require": ["exp", "iat", "sub", "iss", "aud"]})
            except jwt.InvalidSignatureError:  # checked before the claims: a kid-less token tries the next key
                continue
            except jwt.ExpiredSignatureError:
                raise ApiError(401, "token expired: ask billing for a new one (POST /v1/auth/token)") from None
            except jwt.PyJWTError:
                break
        raise ApiError(401, f"invalid token: {SEND}")


def bearer(authorization: bytes | None) -> str:
    """The token of `Authorization: Bearer <token>`, or "" when there is none."""
    scheme, _, token = (authorization or b"").decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def kind_of(token: str) -> str:
    """"ours" (EdDSA, billing's), "id_token" (any other JWT) or "api_key"; else a 401."""
    if token.startswith(API_KEY_PREFIX):
        return "api_key"
    try:
        alg = jwt.get_unverified_header(token).get("alg") if JWT.fullmatch(token) else None
    except jwt.PyJWTError:
        alg = None
    if alg is None:
        raise ApiError(401, f"invalid token: {SEND}")
    return "ours" if alg == "EdDSA" else "id_token"


@dataclass
class Resolved:
    user: str
    fresh_until: float  # asked again after this
    usable_until: float  # while billing is away, still used until this


class Credentials:
    """The user of a request, by whichever credential it carries. `billing()` is the aiohttp
    session that carries the proxy's billing token (the credit gate's; role `proxy`, ADR 25)."""

    def __init__(self, tokens: Tokens, billing, api_key_ttl_seconds: float):
        self.tokens, self.billing, self.api_key_ttl = tokens, billing, api_key_ttl_seconds
        self._resolved: OrderedDict[bytes, Resolved] = OrderedDict()  # sha256(credential) -> answer
        self._asking: dict[bytes, asyncio.Future] = {}  # concurrent first calls share one question

    async def user(self, headers: dict) -> str:
        token, key = bearer(headers.get(b"authorization")), headers.get(b"x-api-key")
        if key is not None:
            if token:  # which one would pay is ambiguous: neither does
                raise ApiError(401, "send one credential: Authorization: Bearer … or X-API-Key, not both")
            return await self.resolve("api_key", key.decode("latin-1").strip())
        if not token:
            raise ApiError(401, MISSING)
        kind = kind_of(token)
        return self.tokens.verify(token) if kind == "ours" else await self.resolve(kind, token)

    async def resolve(self, kind: str, credential: str) -> str:
        if not credential or len(credential) > MAX_CHARS[kind]:
            raise ApiError(401, f"{REFUSED[kind]}: empty or too long; {RETRY[kind]}")
        digest = hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest()
        hit = self._resolved.get(digest)
        if hit and time.time() < hit.fresh_until:
            return hit.user
        asking = self._asking.get(digest)
        if asking is None:
            asking = self._asking[digest] = asyncio.ensure_future(self._ask(kind, credential, digest))
            asking.add_done_callback(lambda _: self._asking.pop(digest, None))
        return await asyncio.shield(asking)

    async def _ask(self, kind: str, credential: str, digest: bytes) -> str:
        status, body = None, None
        try:
            async with self.billing().post("v1/auth/resolve", json={kind: credential},
                                           timeout=aiohttp.ClientTimeout(total=RESOLVE_TIMEOUT_SECONDS)) as r:
                status = r.status
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = None
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        now = time.time()
        if status == 200 and isinstance(body, dict):
            user = str(uuid.UUID(str(body.get("user_id"))))
            if kind == "id_token":
                fresh = usable = float(body["expires_at"])
            else:
                fresh, usable = now + self.api_key_ttl, now + API_KEY_STALE_SECONDS
            self._remember(digest, Resolved(user, fresh, usable))
            return user
        # 422: billing's bounds on the credential's form (the request carries nothing else).
        if (status == 401 and error.get("code") == "credential_refused") or status == 422:
            self._resolved.pop(digest, None)
            # Billing's reason names the check that failed (e.g. "id_token: expired"), never the credential.
            raise ApiError(401, f"{REFUSED[kind]} ({str(error.get('message', 'invalid'))[:120]}): {RETRY[kind]}",
                           param="Authorization", code="invalid_credential")
        hit = self._resolved.get(digest)
        if hit and now < hit.usable_until:
            log.warning("billing did not resolve a known %s (status %s): using its last answer", kind, status)
            return hit.user
        if status in (401, 403):
            log.error("billing refused the proxy's request to resolve a %s (status %s): check its billing token (BILLING_SERVICE_TOKEN: its generation still accepted?)", kind, status)
        else:
            log.warning("billing could not resolve a %s (status %s)", kind, status)
        raise ApiError(503, f"billing cannot check this {kind.replace('_', ' ')} right now, so nothing was sent "
                            "upstream and nothing charged; retry shortly or use the other region",
                       code="billing_unavailable")

    def _remember(self, digest: bytes, answer: Resolved) -> None:
        self._resolved.pop(digest, None)
        self._resolved[digest] = answer
        while len(self._resolved) > MAX_REMEMBERED:
            self._resolved.popitem(last=False)  # the least recently resolved
