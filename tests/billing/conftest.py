"""A real billing process (`python -m billing`) on a real PostgreSQL cluster (TLS, the `billing`
role, the project's rendered configs), with Stripe's HTTP API faked at STRIPE_API_BASE."""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from components import postgres_config as pgc
from tests.conftest import REPO, wait_until_healthy
from tests.json_server import JsonHandler, serve
from tests.oidc_issuer import LocalIssuer
from tests.postgres.conftest import PASSWORDS, PRIMARY_ADDR, free_port, init_primary, workspace

PAYLOAD = REPO / "payloads" / "billing"
sys.path.insert(0, str(PAYLOAD))  # the payload's own modules (settings, chain) for unit checks
WEBHOOK_SECRET = "whsec_test_secret"
OTHER_REGION_WEBHOOK_SECRET = "whsec_test_other_region"  # Stripe signs each region's endpoint with its own
KEY = Ed25519PrivateKey.generate()  # the signing key
KEY_PEM = KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
# The key KEY replaced as the signer, still published while its tokens may be in use (ADR 21).
PREVIOUS_KEY = Ed25519PrivateKey.generate()
# The proxy's token generations billing accepts (ADR 25), as mid-rotation: the proxies carry the
# second; "0" was revoked.
PROXY_GENERATIONS = ("1", "2")
PROXY_GENERATION = "2"


class FakeStripe:
    """Stripe's API as far as billing uses it: POST /v1/checkout/sessions, POST and GET
    /v1/payment_intents. Records each request's form parameters; `fail = True` answers 500.
    PaymentIntents are kept in `intents` by id: a test sets one's "status" to "succeeded"."""

    def __init__(self):
        self.requests: list[dict] = []
        self.intents: dict[str, dict] = {}
        self.fail = False
        outer = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                params = dict(urllib.parse.parse_qsl(body))
                outer.requests.append({"path": self.path, "params": params, "auth": self.headers.get("authorization")})
                if outer.fail:
                    return self.reply(500, {"error": {"type": "api_error", "message": "boom"}})
                if self.path == "/v1/checkout/sessions":
                    sid = f"cs_test_{uuid.uuid4().hex}"
                    return self.reply(200, {"id": sid, "object": "checkout.session", "url": f"https://checkout.stripe.test/c/pay/{sid}",
                                             "mode": "payment", "client_reference_id": params.get("client_reference_id")})
                if self.path == "/v1/payment_intents":
                    pid = f"pi_test_{uuid.uuid4().hex}"
                    metadata = {k[len("metadata["):-1]: v for k, v in params.items() if k.startswith("metadata[")}
                    outer.intents[pid] = {"id": pid, "object": "payment_intent", "amount": int(params["amount"]),
                                          "amount_received": 0, "currency": params["currency"], "metadata": metadata,
                                          "client_secret": f"{pid}_secret_{uuid.uuid4().hex}", "status": "requires_payment_method"}
                    return self.reply(200, outer.intents[pid])
                self.reply(500, {"error": {"type": "api_error", "message": "boom"}})

            def do_GET(self):
                outer.requests.append({"path": self.path, "params": {}, "auth": self.headers.get("authorization")})
                found = outer.intents.get(self.path.removeprefix("/v1/payment_intents/"))
                if outer.fail:
                    return self.reply(500, {"error": {"type": "api_error", "message": "boom"}})
                if found is None:
                    return self.reply(404, {"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such payment_intent"}})
                self.reply(200, found)

        self.server, self.url = serve(Handler)

    def pay(self, payment_id: str) -> dict:
        """The customer paid: the PaymentIntent succeeds (as Stripe then reports it)."""
        pi = self.intents[payment_id]
        pi.update(status="succeeded", amount_received=pi["amount"])
        return pi


class FakePlay:
    """The Google Play Developer API as far as billing uses it: a service account's token at
    /token (its JWT assertion verified with the account's key), a product purchase by token, and
    :consume. `sell()` makes a purchase; `purchases` holds each by (package, product, token)."""

    PATH = "/androidpublisher/v3/applications/"

    def __init__(self, directory: Path):
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = key.public_key()
        self.access_token = f"ya29.{uuid.uuid4().hex}"
        self.purchases: dict[tuple[str, str, str], dict] = {}
        outer = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                if self.path == "/token":
                    assertion = dict(urllib.parse.parse_qsl(body)).get("assertion", "")
                    try:
                        jwt.decode(assertion, outer.public_key, algorithms=["RS256"], audience=f"{outer.url}/token")
                    except jwt.PyJWTError:
                        return self.reply(400, {"error": "invalid_grant"})
                    return self.reply(200, {"access_token": outer.access_token, "expires_in": 3600, "token_type": "Bearer"})
                found = self._purchase(self.path.removesuffix(":consume"))
                if found is None or not self.path.endswith(":consume"):
                    return self.reply(404 if found is None else 400, {"error": {"code": 404}})
                found["consumptionState"] = 1
                self.reply(200, {})

            def do_GET(self):
                found = self._purchase(self.path)
                self.reply(404, {"error": {"code": 404, "message": "not found"}}) if found is None else self.reply(200, found)

            def _purchase(self, path):
                if self.headers.get("authorization") != f"Bearer {outer.access_token}" or not path.startswith(FakePlay.PATH):
                    return None
                parts = [urllib.parse.unquote(p) for p in path[len(FakePlay.PATH):].split("/")]
                if len(parts) != 6 or parts[1:3] != ["purchases", "products"] or parts[4] != "tokens":
                    return None
                return outer.purchases.get((parts[0], parts[3], parts[5]))

        self.server, self.url = serve(Handler)
        self.account_file = directory / "play-service-account.json"
        self.account_file.write_text(json.dumps({
            "type": "service_account", "client_email": "billing@ciris-test.iam.gserviceaccount.com", "token_uri": f"{self.url}/token",
            "private_key": key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()}))

    def sell(self, product: str, package: str = "ai.ciris.mobile", state: int = 0) -> str:
        """A purchase of `product` (purchaseState `state`: 0 paid, 1 cancelled, 2 pending); its token."""
        token = f"play-token-{uuid.uuid4().hex}.AO-J1O{uuid.uuid4().hex}"
        self.purchases[(package, product, token)] = {
            "kind": "androidpublisher#productPurchase", "orderId": f"GPA.{uuid.uuid4().hex[:16]}", "purchaseState": state,
            "consumptionState": 0, "acknowledgementState": 0, "purchaseTimeMillis": str(int(time.time() * 1000)), "purchaseType": 0}
        return token


class Billing:
    def __init__(self, env: dict, log: Path):
        self.env, self.log = env, log
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def run(self, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "billing", *args], cwd=PAYLOAD, env=env or self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, healthy: bool = True) -> None:
        """`healthy=False`: wait only until it answers HTTP at all (/health may rightly be 503)."""
        self.proc = subprocess.Popen([sys.executable, "-m", "billing"], cwd=PAYLOAD, env=self.env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        if healthy:
            wait_until_healthy(self.url, self.proc, self.log, "billing", timeout=60)
            return
        deadline = time.time() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                httpx.get(f"{self.url}/openapi.json", timeout=5)
                return
            except httpx.TransportError:
                assert time.time() < deadline, "billing never answered"
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:  # never leave a billing behind a failed test
                self.proc.kill()
                self.proc.wait(5)


def database_url(cluster, user=pgc.APP_ROLE) -> str:
    return (f"postgresql://{user}:{PASSWORDS[user]}@{cluster.addr}:{cluster.port}/{pgc.DATABASE}"
            f"?sslmode=verify-full&sslrootcert={cluster.tls.ca_file}")


def service_env(db) -> dict:
    """A billing's environment on cluster `db` (add PORT)."""
    return {**os.environ, "DATABASE_URL": database_url(db), "BILLING_JWT_PRIVATE_KEY": KEY_PEM, "STRIPE_SECRET_KEY": "sk_test_x",
            "STRIPE_WEBHOOK_SECRET": "whsec_x", "HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def cluster():
    root, tls = workspace()
    c = init_primary(root, tls[PRIMARY_ADDR], replicas=())
    yield c
    c.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def stripe_api():
    fake = FakeStripe()
    yield fake
    fake.server.shutdown()


def scratch(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


# Made once per session and reached through these functions, not only as fixtures: suites that
# import just the `billing` fixture (tests/proxy) get the billing these fakes configure.
@functools.cache
def local_issuer() -> LocalIssuer:
    """The local stand-in for Google's and Apple's sign-in (tests/oidc_issuer.py)."""
    return LocalIssuer(scratch("ciris-oidc-"))


@functools.cache
def fake_play() -> FakePlay:
    return FakePlay(scratch("ciris-play-"))


@pytest.fixture(scope="session")
def oidc() -> LocalIssuer:
    return local_issuer()


@pytest.fixture(scope="session")
def play_api() -> FakePlay:
    return fake_play()


@functools.cache
def jwks_file() -> Path:
    """The published key set, as the program ships it to every billing and proxy: both keys."""
    from billing import jwks

    path = scratch("ciris-jwks-") / "jwks.json"
    path.write_text(jwks.render([PREVIOUS_KEY.public_key(), KEY.public_key()]))
    return path


@pytest.fixture(scope="session")
def billing(cluster, stripe_api, tmp_path_factory):
    env = {
        **os.environ,
        **local_issuer().env(),
        "GOOGLE_PLAY_SERVICE_ACCOUNT_FILE": str(fake_play().account_file),
        "GOOGLE_PLAY_API_BASE": fake_play().url,
        "DATABASE_URL": database_url(cluster),
        "BILLING_JWT_PRIVATE_KEY": KEY_PEM,
        "BILLING_JWKS_FILE": str(jwks_file()),
        "STRIPE_SECRET_KEY": "sk_test_CANARY_stripe_key",
        "STRIPE_WEBHOOK_SECRET": f"{WEBHOOK_SECRET}, {OTHER_REGION_WEBHOOK_SECRET}",
        "STRIPE_API_BASE": stripe_api.url,
        "STRIPE_PUBLISHABLE_KEY": "pk_test_ciris",
        # Bursts of hundreds of requests on one worker queue for the pool longer than production's
        # budget on this shared machine; these tests are about exactly-once answers, test_failover
        # about the budget.
        "DB_WRITE_TIMEOUT_SECONDS": "30",
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        "DRAIN_FILE": str(tmp_path_factory.mktemp("billing-drain") / "draining"),
        "PROXY_TOKEN_GENERATIONS": ",".join(PROXY_GENERATIONS),
    }
    service = Billing(env, tmp_path_factory.mktemp("billing") / "billing.log")
    service.start()
    yield service
    service.stop()


def kid(key=KEY) -> str:
    from billing import jwks

    return jwks.thumbprint(key.public_key())


def token(role: str = "admin", sub: str = "ops", key=KEY, headers: dict | None = None, **claims) -> str:
    """As billing mints it: its key named in the header (kid); `headers={}` for a token from before kids."""
    # Valid 4 h: ADMIN and SERVICE below are made once, at import, and the whole suite runs ~20 min.
    now = int(time.time())
    body = {"sub": sub, "role": role, "iss": "ciris-billing", "aud": "ciris-bridge", "iat": now, "exp": now + 4 * 3600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="EdDSA",
                      headers={"kid": kid(key)} if headers is None else headers)


def bearer(role: str = "admin", sub: str = "ops", **claims) -> dict:
    return {"Authorization": f"Bearer {token(role, sub, **claims)}"}


ADMIN = bearer("admin")
SERVICE = bearer("service", "proxy")
PROXY = bearer("proxy", "proxy-test", gen=PROXY_GENERATION)  # as the program mints the proxy's (components/proxy.py)


@pytest.fixture
def api(billing):
    with httpx.Client(base_url=billing.url, timeout=30) as client:
        yield client


def new_user(api: httpx.Client, signup: int = 15) -> str:
    """A fresh user holding `signup` credits (the signup grant plus an admin grant or a consume)."""
    r = api.post("/v1/users", json={"email": f"{uuid.uuid4().hex[:12]}@example.org"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    user = r.json()["id"]
    delta = signup - r.json()["balance"]
    if delta > 0:
        r = api.post("/v1/credits/grant", json={"user_id": user, "amount": delta, "idempotency_key": "top-up", "reason": "test"}, headers=ADMIN)
        assert r.status_code == 200, r.text
    elif delta < 0:
        r = api.post("/v1/credits/consume", json={"user_id": user, "amount": -delta, "idempotency_key": "draw-down"}, headers=SERVICE)
        assert r.status_code == 200, r.text
    return user


def balance(api: httpx.Client, user: str) -> int:
    r = api.get(f"/v1/credits/{user}", headers=SERVICE)
    assert r.status_code == 200, r.text
    return r.json()["balance"]


class Locks:
    """Rows held locked from the test, as movements in progress would hold them: a user's balance
    row (what every movement locks first) or their `users` row (which a ledger insert's foreign key
    check waits for, after the balance lock). Each on its own connection, released by release(user)."""

    def __init__(self, dsn: str):
        self.dsn, self.held = dsn, {}

    def balance(self, user: str) -> None:
        self._hold(user, "SELECT 1 FROM credit_balances WHERE user_id = %s FOR UPDATE")

    def insert(self, user: str) -> None:
        self._hold(user, "SELECT 1 FROM users WHERE id = %s FOR UPDATE")

    def _hold(self, user: str, sql: str) -> None:
        conn = psycopg.connect(self.dsn)
        conn.execute(sql, (user,))
        self.held[user] = conn

    def release(self, user: str) -> None:
        conn = self.held.pop(user)
        conn.rollback()
        conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for user in list(self.held):
            self.release(user)


async def consumes_in_order(url: str, bodies: list[dict], gap: float = 0.1) -> list[asyncio.Future]:
    """Sent `gap` apart, so they reach billing in this order; answered whenever billing answers."""
    client = httpx.AsyncClient(base_url=url, timeout=60)
    tasks = []
    for body in bodies:
        tasks.append(asyncio.ensure_future(client.post("/v1/credits/consume", json=body, headers=SERVICE)))
        await asyncio.sleep(gap)
    asyncio.gather(*tasks, return_exceptions=True).add_done_callback(lambda _: asyncio.ensure_future(client.aclose()))
    return tasks


def run(coro):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
