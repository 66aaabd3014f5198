"""Billing: the credit service (payloads/billing) in every region, behind that region's edge,
writing to whichever database member is primary (FSD §4.2, issue #12).

DATABASE_URL lists every member: its own region's first (`postgres` on the container network),
then the other members' addresses in config order (through the peer-only 5432 opening), all over
TLS with verify-full against the stack's CA (every member's certificate names `postgres` too), and
`target_session_attrs=read-write`: a new connection lands on the primary, wherever it is now. So
no `pulumi up` follows a failover; billing finds the new primary by itself (payloads/billing/db.py).
Billing's token keys are Ed25519 keys the program creates, named in `services.jwt_keys`: billing
signs with `services.jwt_signing_key` and every region's billing and proxy verify with the whole set,
shipped as one JWK Set (ADR 21; rotation: docs/runbook-secrets.md). Billing accepts the proxy's
token only of the generations in `services.proxy_tokens` (PROXY_TOKEN_GENERATIONS, ADR 25).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pulumi
import pulumi_tls as tls
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from components import postgres_config as pgc
from components.config import SignIn
from components.postgres import PORT as PG_PORT, ReplicatedPostgres
from components.region import Region
from components.services import (
    BILLING_ADDRESS_SUFFIX, BILLING_TWIN_ADDRESS_SUFFIX, PAYLOADS, SERVICE_UID, ContainerSpec, env_file, payload_files,
)

sys.path.insert(0, str(PAYLOADS / "billing"))
from billing import auth, jwks  # noqa: E402  (the payload's own: kids and the key set as billing computes them)

PORT = 8000
CA_PATH = "/etc/ciris-billing/ca.crt"
JWKS_PATH = "/etc/ciris-billing/jwks.json"
OIDC_CA_PATH = "/etc/ciris-billing/oidc-ca.crt"  # sign_in's private CA (the local issuer's), when set
LOCAL_HOST = "postgres"  # this region's member, on the container network
CONNECT_TIMEOUT = 3  # seconds per member: a dead or cut-off member costs a new connection this long


def database_url(*, hosts: list[str], password: str, user: str = pgc.APP_ROLE) -> str:
    """libpq's multi-host URL: members tried in order, the first that accepts writes kept. `user`:
    the login role billing uses (services.database_login, ADR 26)."""
    members = ",".join(f"{h}:{PG_PORT}" for h in hosts)
    return (f"postgresql://{user}:{password}@{members}/{pgc.DATABASE}?sslmode=verify-full&sslrootcert={CA_PATH}"
            f"&target_session_attrs=read-write&connect_timeout={CONNECT_TIMEOUT}")


def members_for(region: Region, members: list[Region]) -> list[pulumi.Output]:
    """The database members as `region`'s billing tries them: its own first, then the others' IPv4
    addresses in config order."""
    own = [pulumi.Output.from_input(LOCAL_HOST)] if region in members else []
    return own + [m.ipv4 for m in members if m is not region]


def key_resource(name: str, key: str) -> str:
    """Key "1" keeps the name of the single key there was before keys had names: no new key on upgrade."""
    return f"{name}-jwt-key" if key == "1" else f"{name}-jwt-key-{key}"


def render_jwks(public_pems: list[str]) -> str:
    return jwks.render(load_pem_public_key(pem.encode()) for pem in public_pems)


def mint(private_key_pem: str, sub: str, role: auth.Role, ttl_seconds: int, now: float | None = None,
         generation: str | None = None) -> str:
    """A token as billing mints it (its kid too), signed with the key `private_key_pem`; `generation`
    for the proxy role (ADR 25)."""
    key = load_pem_private_key(private_key_pem.encode(), password=None)
    return auth.mint(key, sub, role, ttl_seconds, now, generation=generation)[0]


@dataclass(frozen=True)
class BillingArgs:
    regions: list[Region]
    database: ReplicatedPostgres
    price_per_interaction_cents: int
    signup_credits: int
    # stripe_secret_key, stripe_webhook_secret (from config secrets; None when unset)
    secrets: dict[str, str | None] = field(default_factory=dict)
    primary: Region | None = None  # unused: billing no longer depends on which member is primary
    sign_in: SignIn = SignIn()
    jwt_keys: tuple[str, ...] = ("1",)  # services.jwt_keys
    jwt_signing_key: str = "1"
    proxy_token_generations: tuple[str, ...] = ("1",)  # services.proxy_tokens


def sign_in_env(sign_in: SignIn) -> dict[str, str]:
    """Billing's OIDC_* settings (payloads/billing/billing/settings.py): a provider is on when it has client ids."""
    env = {}
    for name in ("google", "apple"):
        provider = getattr(sign_in, name)
        if provider is None:
            continue
        prefix = f"OIDC_{name.upper()}_"
        env[prefix + "CLIENT_IDS"] = ",".join(provider.client_ids)
        if provider.algorithm != "RS256":
            env[prefix + "ALGORITHM"] = provider.algorithm
        if provider.issuer:
            env[prefix + "ISSUERS"] = provider.issuer
        if provider.jwks_url:
            env[prefix + "JWKS_URL"] = provider.jwks_url
    if sign_in_ca(sign_in):
        env["OIDC_CA_FILE"] = OIDC_CA_PATH
    return env


def sign_in_ca(sign_in: SignIn) -> str:
    """The private CAs the providers' JWKS URLs are from (none for Google's and Apple's own)."""
    return "".join(dict.fromkeys(p.ca_cert for p in (sign_in.google, sign_in.apple) if p and p.ca_cert))


class Billing(pulumi.ComponentResource):
    """Outputs: `jwks` (the JWK Set every key of which verifies billing's tokens); `private_key_pem`
    (secret: the signing key, which also signs the proxy's service token)."""

    def __init__(self, name: str, args: BillingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:Billing", name, None, opts)
        keys = {k: tls.PrivateKey(key_resource(name, k), algorithm="ED25519", opts=pulumi.ResourceOptions(parent=self))
                for k in args.jwt_keys}
        self.jwks = pulumi.Output.all(*(k.public_key_pem for k in keys.values())).apply(render_jwks)
        self.private_key_pem = pulumi.Output.secret(keys[args.jwt_signing_key].private_key_pem_pkcs8)
        missing = [k for k in ("stripe_secret_key", "stripe_webhook_secret") if not args.secrets.get(k)]
        if missing:
            pulumi.log.warn(f"billing: ciris-bridge:{' and ciris-bridge:'.join(missing)} not set; billing starts, but purchases "
                            "and Stripe webhooks answer 503 payments_unavailable "
                            f"(pulumi config set --secret ciris-bridge:{missing[0]} ...)", self)
        source = payload_files("billing")
        oidc_ca = sign_in_ca(args.sign_in)
        members = [r for r in args.regions if r.spec.postgres != "none"]
        for region in args.regions:
            hosts = pulumi.Output.all(*members_for(region, members))

            def render(a):
                hosts, password = a
                return env_file({
                    "DATABASE_URL": database_url(hosts=hosts, password=password, user=args.database.app_user),
                    "BILLING_JWT_PRIVATE_KEY_FILE": "/run/secrets/billing-jwt.pem",
                    "BILLING_JWKS_FILE": JWKS_PATH,
                    "STRIPE_SECRET_KEY": args.secrets.get("stripe_secret_key") or "",
                    "STRIPE_WEBHOOK_SECRET": args.secrets.get("stripe_webhook_secret") or "",
                    "PRICE_PER_INTERACTION_CENTS": args.price_per_interaction_cents,
                    "SIGNUP_CREDITS": args.signup_credits,
                    "HOST": "0.0.0.0",
                    "PORT": PORT,
                    "WORKERS": 2,  # one per vCPU; bench/billing measures 2
                    "PROXY_TOKEN_GENERATIONS": ",".join(args.proxy_token_generations),
                    **sign_in_env(args.sign_in),
                })

            env = pulumi.Output.all(hosts, args.database.app_password).apply(render)
            region.add_service(
                ContainerSpec(
                    name="billing",
                    image="ciris-billing:local",
                    build="./billing",
                    env_file="./billing/env",
                    volumes=(f"./billing/ca.crt:{CA_PATH}:ro", "./billing/jwt.pem:/run/secrets/billing-jwt.pem:ro",
                             f"./billing/jwks.json:{JWKS_PATH}:ro",
                             *([f"./billing/oidc-ca.crt:{OIDC_CA_PATH}:ro"] if oidc_ca else [])),
                    address_suffix=BILLING_ADDRESS_SUFFIX,  # pg_hba lets this address in
                    rolling=True, twin_address_suffix=BILLING_TWIN_ADDRESS_SUFFIX, stop_grace_seconds=30,
                ),
                {
                    **source,
                    "billing/env": pulumi.Output.secret(env),
                    "billing/ca.crt": args.database.ca_cert,
                    "billing/jwt.pem": self.private_key_pem,
                    "billing/jwks.json": self.jwks,
                    **({"billing/oidc-ca.crt": oidc_ca} if oidc_ca else {}),
                },
                private={"billing/env": SERVICE_UID, "billing/jwt.pem": SERVICE_UID},
                shown={
                    "billing/env": hosts.apply(lambda hs: f"[secret: DATABASE_URL -> {', '.join(f'{h}:{PG_PORT}' for h in hs)} "
                                               "(verify-full, the read-write one), Stripe keys, price, signup credits, "
                                               f"proxy token generations: {', '.join(args.proxy_token_generations)}, "
                                               f"sign-in: {', '.join(k for k in ('google', 'apple') if getattr(args.sign_in, k)) or 'none'}]\n"),
                    "billing/jwt.pem": f"[secret: Ed25519 token signing key {args.jwt_signing_key!r}]\n",
                },
            )
        self.register_outputs({"jwks": self.jwks})
