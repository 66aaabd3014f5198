"""Settings from the environment. A missing or malformed value stops the proxy with one line naming
the variable (SettingsError), never a traceback. No LiteLLM import here: the Pulumi program and the
`render` command use this module too."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# Real provider endpoints; each is overridable (`<PROVIDER>_API_BASE`) so tests reach local upstreams.
DEFAULT_API_BASES = {
    "TOGETHER_API_BASE": "https://api.together.xyz/v1",
    "GROQ_API_BASE": "https://api.groq.com/openai/v1",
    "OPENROUTER_API_BASE": "https://openrouter.ai/api/v1",
    "OPENAI_API_BASE": "https://api.openai.com/v1",
    "ANTHROPIC_API_BASE": "https://api.anthropic.com",
}


class SettingsError(ValueError):
    def __init__(self, var: str, problem: str):
        super().__init__(f"{var} {problem}")
        self.var = var


@dataclass(frozen=True)
class Caps:
    """What one flat-priced request may ask for (shown in GET /v1/models); beyond them a 400."""
    max_output_tokens: int = 8192  # for a model whose config names no cap of its own (ADR 18)
    max_n: int = 4                 # choices per request
    max_messages: int = 256
    max_body_bytes: int = 512 * 1024  # the edge enforces the same limit


@dataclass(frozen=True)
class StandIn:
    """While billing cannot place a hold, the proxy authorises paid calls itself within these caps
    (README "Proxy": stand-in). instance_cap_cents 0: never (every such call is a 503)."""
    placement_timeout_ms: int = 1500  # a hold not placed within this counts as billing being away
    balance_max_age_seconds: int = 300  # a user's balance from billing older than this is not "recent"
    user_cap_cents: int = 50  # per user: at most this (or their recent balance, if lower) outstanding
    instance_cap_cents: int = 2000  # per proxy process: at most this outstanding in total


@dataclass(frozen=True)
class Interactions:
    """One charge per agent interaction (ADR 8, README "Proxy": interactions): the calls of one user's
    `metadata.interaction_id` share a window's charge while the window lasts; the call past it, or
    past its calls or tokens (counted per region), starts the next window and its charge."""
    window_seconds: int = 300  # from the window's first call, as billing recorded it (CIRISProxy's 5 minutes)
    max_calls: int = 80        # calls per window and region (CIRISProxy's 80)
    max_tokens: int = 1_000_000  # prompt + completion tokens per window and region: a charge buys bounded work


@dataclass(frozen=True)
class Settings:
    billing_url: str
    billing_service_token: str = field(repr=False)
    billing_keys: dict[str, Ed25519PublicKey] = field(repr=False)  # kid -> billing's public key (ADR 21)
    price_per_interaction_cents: int = 5
    hold_ttl_seconds: int = 900
    capture_journal: str = "/var/lib/ciris-proxy/captures.jsonl"
    host: str = "0.0.0.0"
    port: int = 4000
    caps: Caps = field(default_factory=Caps)
    stand_in: StandIn = field(default_factory=StandIn)
    interactions: Interactions = field(default_factory=Interactions)
    call_log_days: int = 14  # the answered-calls log reconcile reads (by day, deleted after this)
    # While this file exists, GET /serving answers 503: a deploy drains the container before it
    # stops it, and the edge sends new requests to its twin (ADR 16).
    drain_file: str = "/tmp/ciris-draining"
    # A server API key billing accepted is asked about again after this: a revoked key stops within it.
    api_key_ttl_seconds: int = 60


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


def _text_or_file(env: Mapping[str, str], var: str) -> str:
    if env.get(var, "").strip():
        return env[var].strip()
    path = env.get(f"{var}_FILE", "").strip()
    if not path:
        raise SettingsError(var, f"is not set (nor {var}_FILE)")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise SettingsError(f"{var}_FILE", f"cannot be read ({e.strerror}: {path})") from None


def _billing_keys(env: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """BILLING_JWKS[_FILE]: billing's published key set (RFC 7517), Ed25519 public keys by kid."""
    var = "BILLING_JWKS" if env.get("BILLING_JWKS", "").strip() else "BILLING_JWKS_FILE"
    text = _text_or_file(env, "BILLING_JWKS")  # (its SettingsError is a ValueError: not in the try below)
    try:
        entries = json.loads(text)["keys"]
    except (ValueError, TypeError, KeyError):
        raise SettingsError(var, 'is not a JWK Set ({"keys": [...]})') from None
    if not isinstance(entries, list) or not entries:
        raise SettingsError(var, "holds no keys")
    keys = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or (e.get("kty"), e.get("crv"), e.get("alg", "EdDSA")) != ("OKP", "Ed25519", "EdDSA") or "d" in e:
            raise SettingsError(var, f"key {i + 1} is not billing's: an Ed25519 public key (kty OKP, crv Ed25519, no d)")
        if not isinstance(e.get("kid"), str) or not e["kid"] or e["kid"] in keys:
            raise SettingsError(var, f"key {i + 1} has no kid of its own")
        try:
            keys[e["kid"]] = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(str(e.get("x", "")) + "=="))
        except ValueError:
            raise SettingsError(var, f"key {i + 1} has no valid x") from None
    return keys


# Secrets reach the container as a file it mounts (compose.yaml: services.SECRETS_FILE), never as
# its configured environment, which `docker inspect` shows to anyone with the engine's socket.
# The same loader is in payloads/billing/billing/settings.py: the two images share no code.
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
    url = _required(env, "BILLING_URL").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise SettingsError("BILLING_URL", f"must be an http(s) URL, got {url!r}")
    return Settings(
        billing_url=url,
        billing_service_token=_text_or_file(env, "BILLING_SERVICE_TOKEN"),
        billing_keys=_billing_keys(env),
        price_per_interaction_cents=_int(env, "PRICE_PER_INTERACTION_CENTS", 5, 1, 1_000_000),
        hold_ttl_seconds=_int(env, "HOLD_TTL_SECONDS", 900, 5, 86_400),
        capture_journal=env.get("CAPTURE_JOURNAL", "").strip() or Settings.capture_journal,
        host=env.get("HOST", "").strip() or "0.0.0.0",
        port=_int(env, "PORT", 4000, 1, 65535),
        drain_file=env.get("DRAIN_FILE", "").strip() or Settings.drain_file,
        api_key_ttl_seconds=_int(env, "API_KEY_TTL_SECONDS", Settings.api_key_ttl_seconds, 1, 3600),
        caps=Caps(
            max_output_tokens=_int(env, "MAX_OUTPUT_TOKENS", Caps.max_output_tokens, 1, 1_000_000),
            max_n=_int(env, "MAX_N", Caps.max_n, 1, 128),
            max_messages=_int(env, "MAX_MESSAGES", Caps.max_messages, 1, 100_000),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", Caps.max_body_bytes, 1024, 64 * 1024 * 1024),
        ),
        stand_in=StandIn(
            placement_timeout_ms=_int(env, "HOLD_PLACEMENT_TIMEOUT_MS", StandIn.placement_timeout_ms, 100, 60_000),
            balance_max_age_seconds=_int(env, "STANDIN_BALANCE_MAX_AGE_SECONDS", StandIn.balance_max_age_seconds, 0, 86_400),
            user_cap_cents=_int(env, "STANDIN_USER_CAP_CENTS", StandIn.user_cap_cents, 0, 1_000_000),
            instance_cap_cents=_int(env, "STANDIN_INSTANCE_CAP_CENTS", StandIn.instance_cap_cents, 0, 100_000_000),
        ),
        interactions=Interactions(
            window_seconds=_int(env, "INTERACTION_WINDOW_SECONDS", Interactions.window_seconds, 1, 86_400),
            max_calls=_int(env, "INTERACTION_MAX_CALLS", Interactions.max_calls, 1, 100_000),
            max_tokens=_int(env, "INTERACTION_MAX_TOKENS", Interactions.max_tokens, 1, 1_000_000_000),
        ),
        call_log_days=_int(env, "CALL_LOG_DAYS", 14, 1, 3650),
    )


def api_bases(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every provider base URL: the environment's where set, else the real endpoint."""
    env = os.environ if env is None else env
    return {var: env.get(var, "").strip() or default for var, default in DEFAULT_API_BASES.items()}
