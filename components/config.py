"""The whole stack config as pydantic models -- the only place that reads config.

The same `parse()` runs under the Pulumi engine (values from `pulumi.Config`'s environment) and
offline (values read from a `Pulumi.<stack>.yaml` file), so a stack that plans offline is the stack
`pulumi up` sees. Any mistake becomes one `ConfigError` naming the key, raised before a single
resource is declared.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator,
)

from components import cost, dns, release as release_mod

PROJECT = "ciris-bridge"
ROOT = Path(__file__).resolve().parent.parent

# Settings that may only be given with `pulumi config set --secret`.
SECRET_KEYS = (
    "backup_encryption_key",
    "stripe_secret_key",
    "stripe_webhook_secret",
    "together_api_key",
    "groq_api_key",
    "openrouter_api_key",
    "backup_s3_access_key",
    "backup_s3_secret_key",
    "ssh_private_key",
    "alert_smtp_password",
    "alert_webhook_url",
    "alert_heartbeat_url",
)
# Provider credentials live in the providers' own namespaces but are just as secret.
PROVIDER_SECRET_KEYS = ("vultr:apiKey", "hcloud:token", "digitalocean:token")

OFFLINE_SECRET = "offline-plan-placeholder"

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"^({_LABEL}\.)+[a-z]{{2,63}}$")
_SSH_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com) ([A-Za-z0-9+/]+=*)( \S.*)?$"
)


class ConfigError(ValueError):
    """One bad setting: `key` is the full config key (with a path inside it), `message` what is wrong."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_provider(v: str) -> str:
    if v not in cost.PLANS:
        raise ValueError(f"unknown provider {v!r}; expected one of: {', '.join(cost.PLANS)}")
    return v


Provider = Annotated[str, AfterValidator(_known_provider)]


def _host_name(v: str) -> str:
    if not _DOMAIN_RE.match(v) or len(v) > 253:
        raise ValueError(f"{v!r} is not a host name: lower-case letters, digits and '-' in dot-separated labels, "
                         "no wildcard (e.g. llm01.ciris-services-1.ai)")
    return v


HostName = Annotated[str, AfterValidator(_host_name)]


class ServiceNames(_Model):
    """Host names a region's edge serves for each service besides its default (billing1.<domain>,
    proxy1.<domain>): the names clients already have, e.g. the released agent's (ADR 19)."""

    billing: list[HostName] = []
    proxy: list[HostName] = []


class Region(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{1,30}$")
    provider: Provider
    location: str
    plan: str
    domain: str
    nameserver: str = Field(pattern=rf"^{_LABEL}$", description="label of this region's nameserver, e.g. ns1")
    volume_gb: int = Field(default=0, description="block storage for Postgres data; 0 = none")
    postgres: Literal["primary", "replica", "none"] = "none"
    names: ServiceNames = ServiceNames()

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if not _DOMAIN_RE.match(v):
            raise ValueError(f"{v!r} is not a valid lower-case domain name")
        return v

    @field_validator("volume_gb")
    @classmethod
    def _volume(cls, v: int) -> int:
        if v != 0 and not 10 <= v <= 10_000:
            raise ValueError(f"{v} GB is out of range; use 0 (no volume) or 10-10000")
        return v

    @property
    def nameserver_fqdn(self) -> str:
        return f"{self.nameserver}.{self.domain}"

    @property
    def extra_names(self) -> tuple[str, ...]:
        """Every service's extra names (DNS gives each the region's addresses, as a default name)."""
        return (*self.names.billing, *self.names.proxy)


class Witness(_Model):
    """The third host, at a third provider: only the consensus member (and later a monitor) runs
    there, so losing any one provider leaves a majority (ADR 13). It serves nothing public."""

    provider: Provider
    location: str
    plan: str

    # The host interface (hosts.create) reads these as it reads a region's.
    @property
    def name(self) -> str:
        return "witness"

    @property
    def volume_gb(self) -> int:
        return 0


class Budget(_Model):
    target_usd: float = Field(gt=0)
    ceiling_usd: float = Field(gt=0)
    eur_usd: float = Field(default=1.10, gt=0, description="EUR->USD rate for EUR-priced items")


class Services(_Model):
    acme_email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$")
    hsts_max_age: int = Field(default=31_536_000, ge=0)
    price_per_interaction_cents: int = Field(default=5, ge=1)
    signup_credits: int = Field(default=15, ge=0)
    proxy_token_expires: datetime.date = Field(
        default=datetime.date(2027, 12, 31), description="expiry of the proxy's billing token (ADR 8); revoked sooner by generation (ADR 25)"
    )
    # The proxy's billing token by generation (ADR 25, docs/runbook-secrets.md): billing accepts those
    # listed, the proxies carry one; a generation dropped from the list is revoked. Never reuse a name.
    proxy_tokens: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]] = Field(
        default=["1"], min_length=1, max_length=2, description="proxy token generations billing accepts; two only while one replaces the other")
    proxy_token: str | None = Field(default=None, description="the one of proxy_tokens the proxies carry (default: the first)")
    proxy_token_role: Literal["proxy", "service"] = Field(
        default="proxy", description="service: the old any-user token, only for the deploy that upgrades a stack to the proxy role")
    hostmaster: str = Field(default="admin.ciris.ai", description="SOA contact, as a domain (admin@ciris.ai)")
    dns_geoip_database: str | None = Field(
        default=None, description="MaxMind DB path on the hosts; when set, health-checked records answer the closest region"
    )
    fake_llm_upstream: bool = Field(
        default=False, description="environment local only: every provider is the stack's fake upstream (payloads/fake-llm)"
    )
    # The proxy's models (payloads/proxy/ciris_proxy/litellm_config.py; README "Proxy", ADR 18). None: its defaults.
    proxy_model_aliases: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")], str] | None = Field(
        default=None, description="names clients may ask for, by proxy model (default: default and fast -> llama-4-maverick)"
    )
    proxy_vision_model: str | None = Field(
        default=None, description="the proxy model that answers requests with images (default: llama-4-maverick)"
    )
    proxy_output_caps: dict[str, Annotated[int, Field(ge=1, le=1_000_000)]] | None = Field(
        default=None, description="most output tokens one request buys, by proxy model; more asked is lowered to it"
    )

    # Billing's token signing keys by name (ADR 21, docs/runbook-secrets.md): every one verifies, one signs.
    jwt_keys: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]] = Field(
        default=["1"], min_length=1, max_length=2, description="billing's token keys; two only while one replaces the other")
    jwt_signing_key: str | None = Field(default=None, description="the one of jwt_keys billing signs with (default: the first)")
    # Billing's database logins by name (ADR 26, docs/runbook-secrets.md): each a login role with its
    # own password, set in place by the primary; billing and the backup job use one; a name dropped
    # from the list can no longer log in. Never reuse a name.
    database_logins: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_]{0,31}$")]] = Field(
        default=["1"], min_length=1, max_length=2, description="billing's database logins; two only while one replaces the other")
    database_login: str | None = Field(default=None, description="the one of database_logins billing uses (default: the first)")

    # One charge per agent interaction (README "Proxy": interactions, ADR 8). None: the payload's defaults
    # (a window of 300 s, 80 calls and 1,000,000 tokens per region).
    proxy_interaction_window_seconds: int | None = Field(
        default=None, ge=1, le=86_400, description="an interaction's calls within this many seconds of its first share one charge")
    proxy_interaction_max_calls: int | None = Field(
        default=None, ge=1, le=100_000, description="calls one interaction charge buys per region; the next starts a new charge")
    proxy_interaction_max_tokens: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="tokens one interaction charge buys per region; past them a new charge")

    @property
    def signing_key(self) -> str:
        return self.jwt_signing_key or self.jwt_keys[0]

    @property
    def proxy_generation(self) -> str:
        return self.proxy_token or self.proxy_tokens[0]

    @property
    def app_login(self) -> str:
        return self.database_login or self.database_logins[0]

    @model_validator(mode="after")
    def _proxy_models_exist(self) -> "Services":
        if self.proxy_model_aliases is self.proxy_vision_model is self.proxy_output_caps is None:
            return self  # the payload's defaults (and no import while this module is still loading)
        from components.proxy import config_text  # the payload's renderer: a name that is no model is a ValueError

        config_text(self.proxy_model_aliases, self.proxy_vision_model, self.proxy_output_caps)
        return self


def _restore_target(v: Any) -> datetime.datetime | Literal["latest"]:
    """`latest`, or an ISO 8601 time with its zone (a time without one means a different moment
    on every machine that reads it)."""
    if v == "latest":
        return v
    if isinstance(v, datetime.datetime):  # YAML reads an unquoted time as one
        at = v
    else:
        try:
            at = datetime.datetime.fromisoformat(str(v))
        except ValueError:
            raise ValueError(f"{v!r} is neither \"latest\" nor an ISO 8601 time (e.g. 2026-11-22T14:05:00Z)") from None
    if at.tzinfo is None:
        raise ValueError(f"{at.isoformat()!r} has no time zone; add one (e.g. {at.isoformat()}Z)")
    return at


class RestoreSettings(_Model):
    """Set for the first `pulumi up` of a stack that replaces one whose every region was lost (ADR 24):
    the cluster is created from the bucket's pgBackRest repository instead of empty. Remove it after."""

    target_time: Annotated[Any, AfterValidator(_restore_target)] = Field(
        description='"latest" (everything archived) or the moment to restore to, e.g. 2026-11-22T14:05:00Z')


class BackupSettings(_Model):
    """Where the primary's daily encrypted pg_dump goes (any S3-compatible object storage)."""

    s3_endpoint: str = Field(pattern=r"^https?://\S+$")
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    region: str = "us-east-1"
    retention_days: int = Field(default=30, ge=1, le=3650)
    hour_utc: int = Field(default=3, ge=0, le=23)
    ca_cert: str | None = Field(
        default=None, pattern=r"^-----BEGIN CERTIFICATE-----", description="PEM of a private CA the S3 endpoint's certificate is from"
    )
    restore: RestoreSettings | None = None


_EMAIL = r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$"


class SignInProvider(_Model):
    """One OpenID Connect provider users sign in with (ADR 17): billing accepts its ID tokens for
    these client ids. `issuer`, `jwks_url` and `ca_cert` default to the provider's own; `make local`
    sets them to its local issuer (components/local_oidc.py)."""

    client_ids: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,200}$")]] = Field(min_length=1)
    algorithm: Literal["RS256", "ES256"] = "RS256"  # the issuer's signing algorithm (Google's and Apple's: RS256)
    issuer: str | None = Field(default=None, pattern=r"^https://\S+$")
    jwks_url: str | None = Field(default=None, pattern=r"^https://\S+$")
    ca_cert: str | None = Field(default=None, pattern=r"^-----BEGIN CERTIFICATE-----",
                                description="PEM of a private CA the JWKS URL's certificate is from")


class SignIn(_Model):
    """Sign-in with Google and Apple ID tokens; a provider left out is refused."""

    google: SignInProvider | None = None
    apple: SignInProvider | None = None


class EmailAlerts(_Model):
    """Where Alertmanager sends e-mail; the password is the secret ciris-bridge:alert_smtp_password
    (optional: a relay that takes mail without login needs none)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    smtp_host: str = Field(pattern=rf"^({_LABEL}\.)*{_LABEL}$")
    smtp_port: int = Field(default=587, ge=1, le=65535)
    sender: str = Field(alias="from", pattern=_EMAIL)
    to: list[Annotated[str, Field(pattern=_EMAIL)]] = Field(min_length=1)
    username: str | None = Field(default=None, description="SMTP login; default: the from address")


class Alerts(_Model):
    """Alert channels (FSD §9.2). Optional: without any, alerts fire but reach no one (the plan
    warns). The webhook's URL is the secret ciris-bridge:alert_webhook_url (it usually holds a token)."""

    email: EmailAlerts | None = None


class BridgeConfig(_Model):
    environment: Literal["production", "staging", "local"]
    regions: list[Region] = Field(min_length=1)
    admin_ssh_cidrs: list[str] = Field(min_length=1)
    ssh_public_key: str
    # Keys the deploy user no longer accepts, each once its successor works (components/access.py).
    ssh_retired_public_keys: list[str] = []
    budget: Budget
    services: Services = Services()
    backup: BackupSettings | None = None
    witness: Witness | None = None
    alerts: Alerts = Alerts()
    sign_in: SignIn = SignIn()
    zones_file: str = Field(default="records/zones.yaml", description="DNS records, relative to the project")
    secrets: dict[str, SecretStr] = Field(default_factory=dict)
    releases_file: str = Field(default="", description="the stack's releases (components/release.py), relative "
                                                         "to the project; default releases/<environment>.json")
    # Filled in by parse() from zones_file and releases_file, never set directly.
    zones: dns.ZonesFile = dns.ZonesFile()
    release: release_mod.Release | None = None  # the current release; None: none built yet

    @field_validator("admin_ssh_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                net = ipaddress.ip_network(cidr, strict=True)
            except ValueError as e:
                raise ValueError(f"{cidr!r} is not a CIDR ({e})") from None
            if net.prefixlen == 0:
                raise ValueError(f"{cidr} opens SSH to the whole internet; list your admin addresses")
        return v

    @field_validator("ssh_public_key")
    @classmethod
    def _ssh_key(cls, v: str) -> str:
        if "PRIVATE KEY" in v:
            raise ValueError("this is a private key; give the public one (the .pub file)")
        m = _SSH_KEY_RE.match(v.strip())
        if not m:
            raise ValueError("not an OpenSSH public key (expected 'ssh-ed25519 AAAA... comment')")
        try:
            blob = base64.b64decode(m.group(3), validate=True)
        except ValueError:
            raise ValueError("the key body is not valid base64") from None
        if m.group(1).encode() not in blob[:40]:
            raise ValueError(f"the key body does not match its type {m.group(1)}")
        return v.strip()

    @field_validator("ssh_retired_public_keys")
    @classmethod
    def _retired(cls, v: list[str], info: ValidationInfo) -> list[str]:
        keys = [cls._ssh_key(k) for k in v]
        body = lambda k: " ".join(k.split()[:2])  # noqa: E731
        if "ssh_public_key" in info.data and body(info.data["ssh_public_key"]) in {body(k) for k in keys}:
            raise ValueError("lists ssh_public_key itself: retiring it would lock you out")
        return keys

    # --- derived views used by the components ---
    @property
    def primary(self) -> Region:
        return next(r for r in self.regions if r.postgres == "primary")

    @property
    def replicas(self) -> list[Region]:
        return [r for r in self.regions if r.postgres == "replica"]

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)

    def secret(self, key: str) -> str | None:
        value = self.secrets.get(key)
        return value.get_secret_value() if value is not None else None


def parse(raw: Mapping[str, Any], secret_keys: set[str] | frozenset[str] = frozenset()) -> BridgeConfig:
    """Validate a flat config map (`{"ciris-bridge:regions": ..., "hcloud:token": ...}`)."""
    for key in PROVIDER_SECRET_KEYS:
        if key in raw and key not in secret_keys:
            raise ConfigError(key, f"is a secret but is given in plain text; use `pulumi config set --secret {key}`")

    settings: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    known = set(BridgeConfig.model_fields) - {"secrets", "zones", "release"}
    for full_key, value in raw.items():
        namespace, _, key = full_key.rpartition(":")
        if namespace not in ("", PROJECT):
            continue  # provider settings (vultr:*, hcloud:*) are the providers' business
        shown = f"{PROJECT}:{key}"
        if key in SECRET_KEYS:
            if full_key not in secret_keys and shown not in secret_keys:
                raise ConfigError(shown, f"is a secret but is given in plain text; use `pulumi config set --secret {shown}`")
            secrets[key] = value
        elif key in known:
            settings[key] = _decode(value)
        else:
            raise ConfigError(shown, f"unknown setting; known settings are {', '.join(sorted(known | set(SECRET_KEYS)))}")

    try:
        config = BridgeConfig(**settings, secrets=secrets)
    except ValidationError as e:
        raise _first_error(e) from None
    _check_topology(config)
    if config.services.fake_llm_upstream and config.environment != "local":
        raise ConfigError(f"{PROJECT}:services.fake_llm_upstream", f"is for environment local only, not {config.environment}")
    _check_backup_elsewhere(config)
    _check_cost(config)
    _check_jwt_keys(config.services)
    _check_proxy_tokens(config.services)
    _check_rotation_set(config.services.database_logins, "database_logins", config.services.app_login, "database_login",
                        "login", "add it there and deploy first")
    _check_alerts(config)
    _check_webhook_secrets(config)
    try:
        zones = dns.load(ROOT / config.zones_file, config.regions, label=config.zones_file)
    except dns.ZonesError as e:
        raise ConfigError(f"{PROJECT}:zones_file", str(e)) from None
    return config.model_copy(update={"zones": zones, "release": _current_release(config)})


def _current_release(config: BridgeConfig) -> release_mod.Release | None:
    path = config.releases_file or f"releases/{config.environment}.json"
    try:
        history = release_mod.History.load(ROOT / path)
    except release_mod.ReleaseError as e:
        raise ConfigError(f"{PROJECT}:releases_file", str(e)) from None
    if history.current is None:
        return None
    current = history.get(history.current)
    if current is None:
        raise ConfigError(f"{PROJECT}:releases_file", f"{path} names {history.current} as current, but has no such release")
    return current


def _decode(value: Any) -> Any:
    """The engine hands structured values over as JSON text; a file gives them as YAML."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _first_error(e: ValidationError) -> ConfigError:
    err = e.errors()[0]
    path = ""
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "is required but not set"
    elif err["type"] == "extra_forbidden":
        message = "unknown setting"
    elif err["type"] in ("literal_error", "string_pattern_mismatch", "int_parsing", "greater_than", "greater_than_equal"):
        message += f" (got {err['input']!r})"
    more = len(e.errors()) - 1
    return ConfigError(f"{PROJECT}:{path}", message + (f" [and {more} more problem(s)]" if more else ""))


def _check_local(config: BridgeConfig, r: Region | Witness, key: str) -> None:
    """A `local` host (make local) is this machine: its location is the address it serves on."""
    if r.provider != "local":
        raise ConfigError(f"{key}.provider", "environment local runs every region on this machine, and the witness: use provider: local")
    if config.environment != "local":
        raise ConfigError(f"{key}.provider", f"'local' runs on this machine; it is only for environment: local, not {config.environment}")
    try:
        ipaddress.IPv4Address(r.location)
    except ValueError:
        raise ConfigError(f"{key}.location", f"a local host's location is its IPv4 address on this machine, not {r.location!r}") from None
    if r.plan != "local" or r.volume_gb:
        raise ConfigError(f"{key}.plan", "a local host has plan: local" + (" and volume_gb: 0" if isinstance(r, Region) else ""))


def _check_host(config: BridgeConfig, r: Region | Witness, key: str) -> None:
    """Where a host runs: a location and plan the price table knows (or this machine, locally)."""
    if r.provider == "local" or config.environment == "local":
        _check_local(config, r, key)
    elif r.location not in cost.LOCATIONS[r.provider]:
        raise ConfigError(
            f"{key}.location",
            f"the price table does not know {r.provider} location {r.location!r}; "
            f"known: {', '.join(sorted(cost.LOCATIONS[r.provider]))}",
        )
    if r.plan not in cost.PLANS[r.provider]:
        raise ConfigError(
            f"{key}.plan",
            f"the price table does not know {r.provider} plan {r.plan!r}; known: {', '.join(cost.PLANS[r.provider])}",
        )


def _check_witness(config: BridgeConfig) -> None:
    """The witness only breaks ties if it fails on its own: at a provider no region uses."""
    w = config.witness
    if w is None:
        return
    key = f"{PROJECT}:witness"
    _check_host(config, w, key)
    if w.provider != "local" and w.provider in {r.provider for r in config.regions}:
        raise ConfigError(
            f"{key}.provider",
            f"{w.provider} already hosts a region; the witness must be at a third provider "
            f"(one that losing a region's provider does not take down with it)",
        )
    taken = [r.location for r in config.regions if r.provider == "local"]
    if w.provider == "local" and w.location in taken:
        raise ConfigError(f"{key}.location", f"{w.location} is already a region's address; give the witness its own")


def _check_topology(config: BridgeConfig) -> None:
    seen: dict[str, dict[str, int]] = {"name": {}, "domain": {}, "nameserver_fqdn": {}}
    for i, r in enumerate(config.regions):
        key = f"{PROJECT}:regions[{i}]"
        _check_host(config, r, key)
        if r.name == "witness":
            raise ConfigError(f"{key}.name", "'witness' is the name of the third host; give the region another")
        if cost.registrable(r.domain) and r.domain.rsplit(".", 1)[1] not in cost.DOMAIN_USD_PER_YEAR:
            raise ConfigError(f"{key}.domain", f"the price table has no registration price for .{r.domain.rsplit('.', 1)[1]}")
        for field, values in seen.items():
            value = getattr(r, field)
            if value in values:
                shown = "nameserver" if field == "nameserver_fqdn" else field
                raise ConfigError(
                    f"{key}.{shown}", f"duplicate {shown} {value!r} (already used by regions[{values[value]}])"
                )
            values[value] = i

    primaries = [i for i, r in enumerate(config.regions) if r.postgres == "primary"]
    if not primaries:
        raise ConfigError(f"{PROJECT}:regions", "no region has `postgres: primary`; exactly one must")
    if len(primaries) > 1:
        names = " and ".join(config.regions[i].name for i in primaries)
        raise ConfigError(f"{PROJECT}:regions[{primaries[1]}].postgres", f"two primaries ({names}); exactly one region may be primary")
    if config.budget.ceiling_usd < config.budget.target_usd:
        raise ConfigError(f"{PROJECT}:budget.ceiling_usd", "is below budget.target_usd")
    _check_witness(config)
    _check_names(config)


def _check_names(config: BridgeConfig) -> None:
    """A host name belongs to one service in one region: the edge that serves it is the one DNS points it at."""
    taken: dict[str, str] = {}
    for i, r in enumerate(config.regions):
        for service, label in dns.SERVICE_LABELS.items():
            taken[f"{label}.{r.domain}"] = f"regions[{i}]'s default {service} name"
        taken[r.nameserver_fqdn] = f"regions[{i}]'s nameserver"
    for i, r in enumerate(config.regions):
        for service in dns.SERVICE_LABELS:
            for j, name in enumerate(getattr(r.names, service)):
                key = f"regions[{i}].names.{service}[{j}]"
                if name in taken:
                    raise ConfigError(f"{PROJECT}:{key}", f"{name!r} is already {taken[name]}")
                taken[name] = key


def _check_rotation_set(listed: Sequence[str], list_key: str, chosen: str, chosen_key: str, what: str, hint: str) -> None:
    """A set that rotates with overlap (billing's keys, ADR 21; the proxy's token generations, ADR 25):
    no name twice, and the one in use is listed."""
    for i, name in enumerate(listed):
        if name in listed[:i]:
            raise ConfigError(f"{PROJECT}:services.{list_key}[{i}]", f"duplicate {what} {name!r}")
    if chosen not in listed:
        raise ConfigError(f"{PROJECT}:services.{chosen_key}",
                          f"{chosen!r} is not one of services.{list_key} ({', '.join(listed)}); {hint}")


def _check_jwt_keys(services: Services) -> None:
    _check_rotation_set(services.jwt_keys, "jwt_keys", services.signing_key, "jwt_signing_key", "key name", "add it there first")


def _check_proxy_tokens(services: Services) -> None:
    _check_rotation_set(services.proxy_tokens, "proxy_tokens", services.proxy_generation, "proxy_token", "generation",
                        "add it there and deploy first")


def _check_alerts(config: BridgeConfig) -> None:
    """The alert secrets, checked without ever showing their values."""
    schemes = ("https://", "http://") if config.environment == "local" else ("https://",)
    for key in ("alert_webhook_url", "alert_heartbeat_url"):
        url = config.secret(key)
        if url not in (None, OFFLINE_SECRET) and (not url.startswith(schemes) or any(c.isspace() for c in url)):
            raise ConfigError(f"{PROJECT}:{key}", f"is not an {' or '.join(s[:-3] for s in schemes)} URL "
                                                  "(value not shown: it is a secret)")
    if config.secret("alert_smtp_password") is not None and config.alerts.email is None:
        raise ConfigError(f"{PROJECT}:alert_smtp_password", "is set but ciris-bridge:alerts.email is not; "
                                                            "set alerts.email (smtp_host, from, to) or remove the password")


def _check_webhook_secrets(config: BridgeConfig) -> None:
    """stripe_webhook_secret: one Stripe endpoint secret per region's endpoint, comma-separated
    (Stripe signs each endpoint with its own; every region's billing accepts them all)."""
    value = config.secret("stripe_webhook_secret")
    if value in (None, OFFLINE_SECRET):
        return
    for i, item in enumerate(value.split(",")):
        if not item.strip().startswith("whsec_"):
            raise ConfigError(f"{PROJECT}:stripe_webhook_secret", f"item {i + 1} is not a Stripe endpoint secret "
                                                                  "(whsec_...; value not shown: it is a secret)")


def _check_backup_elsewhere(config: BridgeConfig) -> None:
    """Backups at a provider that holds none of the database (ADR 23): closing that provider's
    account, or losing its site, must not take the database's copies and its backups together."""
    provider = config.backup and cost.backup_provider(config.backup.s3_endpoint)
    holders = [r.name for r in config.regions if r.postgres != "none" and r.provider == provider]
    if holders:
        raise ConfigError(f"{PROJECT}:backup.s3_endpoint",
                          f"{config.backup.s3_endpoint} is {provider}'s, which also runs {' and '.join(holders)}'s "
                          "database: losing that provider would take the backups too; use a bucket elsewhere "
                          "(Backblaze B2 in production, ADR 23)")


def _check_cost(config: BridgeConfig) -> None:
    est = cost.estimate(config.regions, config.budget, config.witness, config.backup)
    if est.total_cents > est.ceiling_cents:
        lines = "; ".join(f"{i.item} ${cost.usd(i.cents):.2f}" for i in est.items)
        raise ConfigError(
            f"{PROJECT}:budget.ceiling_usd",
            f"the estimated monthly cost ${cost.usd(est.total_cents):.2f} exceeds the hard ceiling "
            f"${cost.usd(est.ceiling_cents):.2f} ({lines})",
        )


# --- the two ways in -------------------------------------------------------------------------


def from_engine() -> BridgeConfig:
    """The config `pulumi up` (or the mock runtime) hands this program. Under the real engine the
    committed placeholders (documentation-range admin addresses, the placeholder SSH key) and the
    local stack are refused; the offline plan only warns about them."""
    import pulumi
    from pulumi.runtime import config as rc, settings
    from pulumi.runtime.mocks import MockMonitor

    raw = {**rc.get_config_env(), **rc.CONFIG.get()}
    secret_keys = set(rc.get_config_secret_keys_env()) | set(rc._SECRET_KEYS.get())
    config = parse(raw, secret_keys)
    problems = placeholders(config)
    if isinstance(settings.get_monitor(), MockMonitor):
        for key, message in problems if config.environment != "local" else []:
            pulumi.log.warn(f"{key}: {message} (fine for the offline plan; `pulumi up` refuses it)")
    elif problems:
        raise ConfigError(*problems[0])
    return config


DOCUMENTATION_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]
PLACEHOLDER_KEY_COMMENT = "replace-me@ciris-bridge"


def placeholders(config: BridgeConfig) -> list[tuple[str, str]]:
    """What a real deploy must not go out with: (key, message) pairs."""
    problems = []
    if config.environment == "local":
        problems.append((f"{PROJECT}:environment", "local runs on this machine (make local), never in a cloud"))
    for cidr in config.admin_ssh_cidrs:
        net = ipaddress.ip_network(cidr)
        if any(net.version == doc.version and net.subnet_of(doc) for doc in DOCUMENTATION_NETS):
            problems.append((f"{PROJECT}:admin_ssh_cidrs", f"{cidr} is a documentation placeholder; list your admin addresses"))
    if config.ssh_public_key.endswith(PLACEHOLDER_KEY_COMMENT):
        problems.append((f"{PROJECT}:ssh_public_key", "is the committed placeholder; set your deploy key's public half"))
    if config.environment == "production" and config.alerts.email is None and config.secret("alert_webhook_url") is None:
        problems.append((f"{PROJECT}:alerts", "production has no alert channel: set alerts.email (and the secret "
                         "alert_smtp_password) or the secret alert_webhook_url, or its pages reach no one"))
    if config.release is None and config.environment != "local":
        problems.append((f"{PROJECT}:releases_file", f"no release built for {config.environment} yet: run "
                         f"`python -m ops release {config.environment}` (the hosts build nothing; ADR 10)"))
    return problems


def read_stack_file(path: str | Path) -> tuple[dict[str, Any], set[str]]:
    """A `Pulumi.<stack>.yaml` as a flat config map; `secure:` values (which need the passphrase
    to decrypt) become placeholders, marked secret."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(str(path), "stack file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"is not valid YAML ({e})") from None
    raw: dict[str, Any] = {}
    secret_keys: set[str] = set()
    for key, value in (doc.get("config") or {}).items():
        key = key if ":" in key else f"{PROJECT}:{key}"
        if isinstance(value, dict) and set(value) == {"secure"}:
            raw[key] = OFFLINE_SECRET
            secret_keys.add(key)
        else:
            raw[key] = value
    return raw, secret_keys


def engine_config(raw: Mapping[str, Any]) -> dict[str, str]:
    """The flat map as the engine passes it to a program: structured values as JSON text."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


def load_stack_file(path: str | Path) -> BridgeConfig:
    raw, secret_keys = read_stack_file(path)
    return parse(raw, secret_keys)
