"""Settings from the environment. A missing or malformed value stops the service with one line
naming the variable (SettingsError), never a traceback."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from billing import jwks

# Set by `python -m billing` for its workers (not an operator's setting): a directory made fresh for
# each start, holding what the workers share (ledger_check.py, metrics.py).
STATE_DIR_VAR = "BILLING_STATE_DIR"
DEFAULT_PACKS = "500:500,2000:2000,10000:10000"  # credits (cents of balance) : price in US cents
# Google Play products (the app's, as in CIRISBilling) : credits granted, the product's price in cents.
DEFAULT_PLAY_PRODUCTS = "credits_100:999,credits_250:2499,credits_600:5999"


# Sign-in with Google and Apple (identity.py): each provider is on when its client ids are set.
# Issuers and JWKS URLs are settings so tests and `make local` can stand a local issuer in.
OIDC_PROVIDERS = {
    "google": ("https://accounts.google.com,accounts.google.com", "https://www.googleapis.com/oauth2/v3/certs"),
    "apple": ("https://appleid.apple.com", "https://appleid.apple.com/auth/keys"),
}
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256")  # asymmetric only: never none or HS*


@dataclass(frozen=True)
class Issuer:
    provider: str
    issuers: tuple[str, ...]  # accepted `iss` values
    jwks_url: str
    client_ids: tuple[str, ...]  # accepted `aud` values
    algorithm: str = "RS256"


class SettingsError(ValueError):
    def __init__(self, var: str, problem: str):
        super().__init__(f"{var} {problem}")
        self.var = var


@dataclass(frozen=True)
class Settings:
    database_url: str
    jwt_private_key: Ed25519PrivateKey = field(repr=False)  # the signing key
    # kid -> public key: every key billing's tokens verify with (the signing key's among them; ADR 21).
    jwt_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    stripe_secret_key: str | None = field(default=None, repr=False)  # None: purchases answer 503
    # One signing secret per webhook endpoint Stripe calls (each region's, and a rolled one's old and
    # new while both sign): an event is accepted when any of them verifies it. Empty: webhooks answer 503.
    stripe_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    stripe_api_base: str | None = None
    stripe_publishable_key: str = ""  # handed to the app with a PaymentIntent (agent_api.py); not secret
    price_per_interaction_cents: int = 5
    signup_credits: int = 15
    credit_packs: dict[int, int] = field(default_factory=dict)  # credits -> price in cents
    checkout_success_url: str = "https://ciris.ai/credits/success"
    checkout_cancel_url: str = "https://ciris.ai/credits/cancelled"
    host: str = "0.0.0.0"
    port: int = 8000
    db_pool_size: int = 20
    # At most this many batches of consumes in the database at once per worker (batches.py); more
    # consumes wait and go together in the next batch.
    consume_batches: int = 2
    # A write (or a read's proof that its server is still the primary) not confirmed within this
    # many seconds answers 503 `unavailable` (outcome unknown: retry with the same idempotency key).
    # 4: billing answers before the proxy stops waiting for it (5 s).
    db_write_timeout: float = 4.0
    workers: int = 1
    # While this file exists, GET /serving answers 503: a deploy drains the container before it
    # stops it, and the edge sends new requests to its twin (ADR 16).
    drain_file: str = "/tmp/ciris-draining"
    # verify-ledger in the background for the metrics (ledger_check.py): the next run this many
    # seconds after the last ended. About 6 s of one core per 100,000 transactions (measured).
    ledger_verify_interval: float = 300.0
    google_play_service_account_file: str | None = None  # None: google-play/verify answers 503
    google_play_api_base: str = "https://androidpublisher.googleapis.com"
    google_play_package: str = "ai.ciris.mobile"
    google_play_products: dict[str, int] = field(default_factory=dict)  # product id -> credits
    oidc_issuers: tuple[Issuer, ...] = ()
    oidc_ca_file: str | None = None  # a CA bundle for JWKS fetches instead of the system's (local issuer)
    # The generations of the proxy's token accepted (ADR 25): two while one replaces the other; a
    # generation left out is revoked. Empty: no proxy token is accepted.
    proxy_token_generations: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.jwt_keys:  # no published set: the signing key alone
            public = self.jwt_private_key.public_key()
            object.__setattr__(self, "jwt_keys", {jwks.thumbprint(public): public})

    def __repr__(self) -> str:  # never print the DSN's password or the keys
        return f"Settings(host={self.host!r}, port={self.port}, price={self.price_per_interaction_cents})"


def _required(env: Mapping[str, str], var: str) -> str:
    value = env.get(var, "").strip()
    if not value:
        raise SettingsError(var, "is not set")
    return value


def _int(env: Mapping[str, str], var: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(var, f"must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(var, f"must be between {lo} and {hi}, got {value}")
    return value


def _seconds(env: Mapping[str, str], var: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(var, f"must be a number of seconds, got {raw!r}") from None
    if not lo <= value <= hi:  # also refuses nan and inf
        raise SettingsError(var, f"must be between {lo:g} and {hi:g} seconds, got {raw}")
    return value


def _read(var: str, path: str) -> str:
    """The file `var` names; unreadable, a SettingsError naming both."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise SettingsError(var, f"cannot be read ({e.strerror}: {path})") from None


def _private_key(env: Mapping[str, str]) -> Ed25519PrivateKey:
    if env.get("BILLING_JWT_PRIVATE_KEY", "").strip():
        var, pem = "BILLING_JWT_PRIVATE_KEY", env["BILLING_JWT_PRIVATE_KEY"]
    else:
        var = "BILLING_JWT_PRIVATE_KEY_FILE"
        path = env.get(var, "").strip()
        if not path:
            raise SettingsError("BILLING_JWT_PRIVATE_KEY", "is not set (nor BILLING_JWT_PRIVATE_KEY_FILE)")
        pem = _read(var, path)
    try:
        key = load_pem_private_key(pem.strip().encode(), password=None)
    except (ValueError, TypeError):
        raise SettingsError(var, "is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SettingsError(var, "must be an Ed25519 key (EdDSA tokens)")
    return key


def _jwt_keys(env: Mapping[str, str], signing: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    """BILLING_JWKS[_FILE]: the published key set; unset, the signing key alone."""
    own = jwks.thumbprint(signing.public_key())
    var, text = "BILLING_JWKS", env.get("BILLING_JWKS", "").strip()
    if not text:
        var, path = "BILLING_JWKS_FILE", env.get("BILLING_JWKS_FILE", "").strip()
        if not path:
            return {}  # Settings: the signing key alone
        text = _read(var, path)
    try:
        keys = jwks.parse(text)
    except ValueError as e:
        raise SettingsError(var, str(e)) from None
    if own not in keys:  # it would sign tokens no one accepts
        raise SettingsError(var, f"does not hold the signing key (kid {own}) of BILLING_JWT_PRIVATE_KEY")
    return keys


def _play_account(env: Mapping[str, str]) -> str | None:
    """The service account file's path, once it reads as one (google_play.py reads it again)."""
    var = "GOOGLE_PLAY_SERVICE_ACCOUNT_FILE"
    path = env.get(var, "").strip()
    if not path:
        return None
    try:
        with open(path) as f:
            account = json.load(f)
        if not all(isinstance(account.get(k), str) for k in ("client_email", "private_key", "token_uri")):
            raise ValueError
    except OSError as e:
        raise SettingsError(var, f"cannot be read ({e.strerror}: {path})") from None
    except (ValueError, AttributeError):
        raise SettingsError(var, "is not a service account key (client_email, private_key, token_uri)") from None
    return path


def _play_products(env: Mapping[str, str]) -> dict[str, int]:
    products = {}
    for item in (env.get("GOOGLE_PLAY_PRODUCTS", "").strip() or DEFAULT_PLAY_PRODUCTS).split(","):
        product, _, credits = item.strip().partition(":")
        if not product or not credits.isdigit() or int(credits) <= 0:
            raise SettingsError("GOOGLE_PLAY_PRODUCTS", f"must be product_id:credits pairs separated by commas, got {item!r}")
        products[product] = int(credits)
    return products


def _packs(env: Mapping[str, str]) -> dict[int, int]:
    raw = env.get("CREDIT_PACKS", "").strip() or DEFAULT_PACKS
    packs = {}
    for item in raw.split(","):
        try:
            credits, price = (int(x) for x in item.split(":"))
        except ValueError:
            raise SettingsError("CREDIT_PACKS", f"must be credits:price_cents pairs separated by commas, got {item!r}") from None
        if credits <= 0 or price < 50:  # Stripe's minimum charge is $0.50
            raise SettingsError("CREDIT_PACKS", f"needs positive credits and a price of at least 50 cents, got {item!r}")
        packs[credits] = price
    return packs


def _list(env: Mapping[str, str], var: str, default: str = "") -> tuple[str, ...]:
    return tuple(x.strip() for x in (env.get(var, "").strip() or default).split(",") if x.strip())


GENERATION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")  # as config's services.proxy_tokens


def _generations(env: Mapping[str, str]) -> tuple[str, ...]:
    """PROXY_TOKEN_GENERATIONS: comma-separated generation names (not secret: a token is)."""
    found = _list(env, "PROXY_TOKEN_GENERATIONS")
    for name in found:
        if not GENERATION.fullmatch(name):
            raise SettingsError("PROXY_TOKEN_GENERATIONS", f"has {name[:40]!r}, not a generation name ([a-z0-9-], at most 32)")
    return found


def _webhook_secrets(env: Mapping[str, str]) -> tuple[str, ...]:
    """STRIPE_WEBHOOK_SECRET: one endpoint secret, or several separated by commas."""
    found = _list(env, "STRIPE_WEBHOOK_SECRET")
    for i, secret in enumerate(found):
        if not secret.startswith("whsec_"):  # never the value: it is a secret
            raise SettingsError("STRIPE_WEBHOOK_SECRET", f"item {i + 1} is not a Stripe endpoint secret (whsec_...)")
    return found


def _issuers(env: Mapping[str, str]) -> tuple[Issuer, ...]:
    """OIDC_<PROVIDER>_CLIENT_IDS (on when set), _ISSUERS, _JWKS_URL, _ALGORITHM."""
    found = []
    for provider, (issuers, jwks_url) in OIDC_PROVIDERS.items():
        prefix = f"OIDC_{provider.upper()}_"
        client_ids = _list(env, prefix + "CLIENT_IDS")
        if not client_ids:
            continue
        url = env.get(prefix + "JWKS_URL", "").strip() or jwks_url
        if not url.startswith("https://"):
            raise SettingsError(prefix + "JWKS_URL", "must be an https:// URL")
        algorithm = env.get(prefix + "ALGORITHM", "").strip() or "RS256"
        if algorithm not in OIDC_ALGORITHMS:
            raise SettingsError(prefix + "ALGORITHM", f"must be one of {', '.join(OIDC_ALGORITHMS)}")
        found.append(Issuer(provider, _list(env, prefix + "ISSUERS", issuers), url, client_ids, algorithm))
    return tuple(found)


# Secrets reach the container as a file it mounts (compose.yaml: services.SECRETS_FILE), never as
# its configured environment, which `docker inspect` shows to anyone with the engine's socket.
# The same loader is in payloads/proxy/ciris_proxy/settings.py: the two images share no code.
ENV_FILE_VAR = "CIRIS_ENV_FILE"


def load_env_file(environ=os.environ) -> None:
    """Adds the KEY=value lines of the file $CIRIS_ENV_FILE names to this process's environment
    (which its workers inherit); an error names the line, never a value."""
    path = environ.get(ENV_FILE_VAR, "").strip()
    if not path:
        return
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SettingsError(ENV_FILE_VAR, f"names {path}, which cannot be read ({e.strerror})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise SettingsError(ENV_FILE_VAR, f"line {n} of {path} is not KEY=value")
        environ[key] = value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    url = _required(env, "DATABASE_URL")
    if not url.startswith(("postgresql://", "postgres://")):
        raise SettingsError("DATABASE_URL", "must be a postgresql:// URL")
    signing = _private_key(env)
    return Settings(
        database_url=url,
        jwt_private_key=signing,
        jwt_keys=_jwt_keys(env, signing),
        stripe_secret_key=env.get("STRIPE_SECRET_KEY", "").strip() or None,
        stripe_webhook_secrets=_webhook_secrets(env),
        stripe_api_base=env.get("STRIPE_API_BASE", "").strip() or None,
        stripe_publishable_key=env.get("STRIPE_PUBLISHABLE_KEY", "").strip(),
        price_per_interaction_cents=_int(env, "PRICE_PER_INTERACTION_CENTS", 5, 1, 1_000_000),
        signup_credits=_int(env, "SIGNUP_CREDITS", 15, 0, 1_000_000),
        credit_packs=_packs(env),
        checkout_success_url=env.get("CHECKOUT_SUCCESS_URL", "").strip() or Settings.checkout_success_url,
        checkout_cancel_url=env.get("CHECKOUT_CANCEL_URL", "").strip() or Settings.checkout_cancel_url,
        host=env.get("HOST", "").strip() or "0.0.0.0",
        port=_int(env, "PORT", 8000, 1, 65535),
        db_pool_size=_int(env, "DB_POOL_SIZE", 20, 1, 200),
        consume_batches=_int(env, "CONSUME_BATCHES", Settings.consume_batches, 1, 200),
        db_write_timeout=_seconds(env, "DB_WRITE_TIMEOUT_SECONDS", Settings.db_write_timeout, 0.5, 60),
        workers=_int(env, "WORKERS", 1, 1, 32),
        drain_file=env.get("DRAIN_FILE", "").strip() or Settings.drain_file,
        ledger_verify_interval=_seconds(env, "LEDGER_VERIFY_INTERVAL_SECONDS", Settings.ledger_verify_interval, 1, 86_400),
        google_play_service_account_file=_play_account(env),
        google_play_api_base=env.get("GOOGLE_PLAY_API_BASE", "").strip() or Settings.google_play_api_base,
        google_play_package=env.get("GOOGLE_PLAY_PACKAGE_NAME", "").strip() or Settings.google_play_package,
        google_play_products=_play_products(env),
        oidc_issuers=_issuers(env),
        oidc_ca_file=env.get("OIDC_CA_FILE", "").strip() or None,
        proxy_token_generations=_generations(env),
    )
