"""Google Play in-app purchases (ADR 17): a purchase token is checked with the Google Play
Developer API, its credits granted once ever (by the token's hash, in the purchases table through
ledger.credit_purchase), and the purchase consumed with Google (which also acknowledges it, so
Google does not refund it, and the user can buy the product again).

Access to the API is a service account's OAuth token (an RS256-signed JWT exchanged at its
token_uri, cached until shortly before it expires). GOOGLE_PLAY_API_BASE points elsewhere in tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from urllib.parse import quote

import httpx
import jwt

from billing.errors import Problem

log = logging.getLogger("billing.google_play")
# httpx logs every request's URL at INFO, and a Play API URL carries the purchase token.
logging.getLogger("httpx").setLevel(logging.WARNING)
SCOPE = "https://www.googleapis.com/auth/androidpublisher"
PURCHASED = 0  # purchaseState
NOT_CONSUMED = 0  # consumptionState


def token_id(purchase_token: str) -> str:
    """What the ledger keeps of a purchase token: its hash (the token itself is a credential)."""
    return "gp_" + hashlib.sha256(purchase_token.encode()).hexdigest()


def unavailable() -> Problem:
    return Problem(503, "payments_unavailable", "Google Play is not configured on this server (GOOGLE_PLAY_SERVICE_ACCOUNT_FILE is not set)")


class PlayApi:
    def __init__(self, service_account_file: str, api_base: str):
        with open(service_account_file) as f:
            account = json.load(f)
        self.email, self.key, self.token_uri = account["client_email"], account["private_key"], account["token_uri"]
        self.base = api_base.rstrip("/")
        self.client = httpx.AsyncClient(timeout=10.0, follow_redirects=False)
        self.access: tuple[str, float] | None = None  # token, when it expires (monotonic)
        self.lock = asyncio.Lock()

    async def close(self) -> None:
        await self.client.aclose()

    async def _authorization(self) -> dict[str, str]:
        async with self.lock:
            if self.access is None or time.monotonic() > self.access[1] - 60:
                now = int(time.time())
                assertion = jwt.encode({"iss": self.email, "scope": SCOPE, "aud": self.token_uri, "iat": now, "exp": now + 3600},
                                       self.key, algorithm="RS256")
                r = await self.client.post(self.token_uri, data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})
                r.raise_for_status()
                doc = r.json()
                self.access = (doc["access_token"], time.monotonic() + int(doc.get("expires_in", 3600)))
            return {"Authorization": f"Bearer {self.access[0]}"}

    def _url(self, package: str, product: str, purchase_token: str) -> str:
        return (f"{self.base}/androidpublisher/v3/applications/{quote(package, safe='')}/purchases/products/"
                f"{quote(product, safe='')}/tokens/{quote(purchase_token, safe='')}")

    async def verify(self, package: str, product: str, purchase_token: str) -> None:
        """The purchase, if Google says it was paid for this package and product and never consumed."""
        try:
            r = await self.client.get(self._url(package, product, purchase_token), headers=await self._authorization())
        except httpx.HTTPError as e:
            log.warning("google play verify failed: %s", type(e).__name__)
            raise Problem(502, "payment_provider_error", "could not reach Google Play; try again") from None
        if r.status_code in (400, 404, 410):
            raise Problem(422, "invalid_purchase", "purchase_token: Google Play knows no such purchase of this product")
        if r.status_code != 200:
            log.warning("google play verify answered %d", r.status_code)
            raise Problem(502, "payment_provider_error", "Google Play did not answer; try again")
        doc = r.json()
        if int(doc.get("purchaseState", -1)) != PURCHASED:
            raise Problem(422, "invalid_purchase", "purchase_token: the purchase is not paid (pending or cancelled)")
        if int(doc.get("consumptionState", NOT_CONSUMED)) != NOT_CONSUMED:
            raise Problem(409, "conflict", "purchase_token: the purchase was already consumed")

    async def consume(self, package: str, product: str, purchase_token: str) -> bool:
        """Consume (and so acknowledge) a granted purchase; False if Google did not take it (logged:
        the credits stand, and a verify of the same token answers already_processed)."""
        try:
            r = await self.client.post(self._url(package, product, purchase_token) + ":consume", headers=await self._authorization())
            ok = r.status_code in (200, 204)
        except httpx.HTTPError:
            ok = False
        if not ok:
            log.warning("google play consume failed for a granted purchase (%s)", token_id(purchase_token)[:11])
        return ok
