"""Sign-in with Google and Apple (ADR 17): their OpenID Connect ID tokens, verified here.

A token is checked against its issuer's published keys (JWKS, fetched over HTTPS and cached), with
the algorithm, issuers and audiences (our client ids) all from configuration — never from the
token. The JWKS is fetched again when a token names a key we do not have (at most once a minute,
so forged `kid`s cannot make us hammer the issuer) or when the cached set is an hour old; a failed
fetch keeps the keys we had, so an issuer outage does not sign everyone out.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass

import httpx
import jwt

from billing.settings import Issuer

log = logging.getLogger("billing.identity")

LEEWAY_SECONDS = 60
REFETCH_INTERVAL = 60.0  # an unknown kid refetches a JWKS at most this often
MAX_KEY_AGE = 3600.0  # a JWKS older than this is fetched again (and kept if that fails)
MAX_TOKEN_CHARS = 8192


class IdentityError(Exception):
    """`reason`: one word for the answer and the logs; never the token or its claims."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    provider: str  # "google", "apple"
    subject: str  # the issuer's stable user id (`sub`)
    exp: int


def is_id_token(token: str) -> bool:
    """Ours are EdDSA (auth.py); anything else that parses as a JWT is taken for an ID token and
    must then pass this module's checks."""
    try:
        return jwt.get_unverified_header(token).get("alg") != "EdDSA"
    except jwt.PyJWTError:
        return False


class Keys:
    """One issuer's JWKS, by key id."""

    def __init__(self, url: str, client: httpx.AsyncClient):
        self.url, self.client = url, client
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched = float("-inf")  # when the cached set was fetched
        self.attempted = float("-inf")  # when a fetch was last tried
        self.lock = asyncio.Lock()

    async def get(self, kid: str) -> jwt.PyJWK:
        if kid not in self.keys or time.monotonic() - self.fetched > MAX_KEY_AGE:
            await self.refresh()
        try:
            return self.keys[kid]
        except KeyError:
            raise IdentityError("unknown_key") from None

    async def refresh(self) -> None:
        async with self.lock:  # concurrent misses share one fetch
            now = time.monotonic()
            if now - self.attempted < REFETCH_INTERVAL:
                return
            self.attempted = now
            try:
                r = await self.client.get(self.url)
                r.raise_for_status()
                found = jwt.PyJWKSet.from_dict(r.json())
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as e:
                log.warning("JWKS %s not fetched (%s); keeping %d cached keys", self.url, type(e).__name__, len(self.keys))
                return
            self.keys = {k.key_id: k for k in found.keys if k.key_id}
            self.fetched = now


class Verifier:
    def __init__(self, issuers: tuple[Issuer, ...], ca_file: str | None = None):
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self.client = httpx.AsyncClient(verify=verify, timeout=5.0, follow_redirects=False)
        keys = {i.jwks_url: Keys(i.jwks_url, self.client) for i in issuers}
        self.by_iss = {iss: (i, keys[i.jwks_url]) for i in issuers for iss in i.issuers}

    async def close(self) -> None:
        await self.client.aclose()

    async def verify(self, token: str) -> Identity:
        if len(token) > MAX_TOKEN_CHARS:
            raise IdentityError("too_long")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise IdentityError("malformed") from None
        iss = unverified.get("iss")
        issuer, keys = self.by_iss.get(iss, (None, None)) if isinstance(iss, str) else (None, None)
        if issuer is None:
            raise IdentityError("issuer")
        if header.get("alg") != issuer.algorithm:  # decode refuses it too; this spares a JWKS fetch
            raise IdentityError("algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise IdentityError("unknown_key")
        key = await keys.get(kid)
        try:
            claims = jwt.decode(token, key.key, algorithms=[issuer.algorithm], audience=list(issuer.client_ids),
                                issuer=list(issuer.issuers), leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise IdentityError("expired") from None
        except jwt.InvalidAudienceError:
            raise IdentityError("audience") from None
        except jwt.PyJWTError:
            raise IdentityError("invalid") from None
        sub = claims["sub"]
        if not isinstance(sub, str) or not 1 <= len(sub) <= 255:
            raise IdentityError("invalid")
        return Identity(issuer.provider, sub, int(claims["exp"]))
