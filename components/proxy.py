"""Proxy: our ASGI front with the credit gate on LiteLLM's Router (payloads/proxy) in every region,
behind that region's edge, calling that region's billing service (FSD §4.3, ADR 8).

The upstream config is rendered here by the payload's own renderer and shipped in the bundle; it
holds no secret, nor does billing's key set (the JWK Set billing's tokens verify with, the same file
in every region). The environment file carries the provider keys and the proxy's billing token:
role `proxy` (only the routes the proxy calls) and a generation (`services.proxy_token`, of those
billing accepts, `services.proxy_tokens`), so an operator revokes it by generation (ADR 25). It is
signed here with billing's signing key: Ed25519 signatures are deterministic, so the same claims
give the same token and `pulumi preview` shows no change until `services.proxy_token`,
`services.proxy_token_expires` or `services.jwt_signing_key` is moved (ADR 8, ADR 21).
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass, field

import pulumi

from components.billing import PORT as BILLING_PORT, Billing, mint
from components.region import Region
from components.services import PAYLOADS, SERVICE_UID, ContainerSpec, env_file, payload_files

sys.path.insert(0, str(PAYLOADS / "proxy"))
from ciris_proxy import litellm_config  # noqa: E402  (the payload's pure renderer, shared with the container)
from ciris_proxy.settings import Caps  # noqa: E402

# The largest request body the proxy takes; the edge should refuse anything larger before it arrives.
MAX_BODY_BYTES = Caps.max_body_bytes
PORT = 4000
# SIGTERM to SIGKILL: the longest call it serves (a minute per provider attempt, with fallbacks) ends first.
STOP_GRACE_SECONDS = 180
CONFIG_PATH = "/etc/ciris-proxy/config.yaml"
JWKS_PATH = "/etc/ciris-proxy/billing-jwks.json"  # billing's key set (ADR 21)
TOKEN_WARN_DAYS = 60
PROVIDER_SECRETS = {"together_api_key": "TOGETHER_API_KEY", "groq_api_key": "GROQ_API_KEY", "openrouter_api_key": "OPENROUTER_API_KEY"}


def config_text(aliases: dict[str, str] | None = None, vision_model: str | None = None,
                output_caps: dict[str, int] | None = None) -> str:
    """The proxy's rendered config; None takes the payload's default (a ValueError names what is no model)."""
    return litellm_config.render(aliases=aliases, vision_model=vision_model or litellm_config.VISION_MODEL,
                                 output_caps=output_caps)


def service_token(private_key_pem: str, sub: str, expires: datetime.date, generation: str, role: str = "proxy") -> str:
    """Billing's token for one region's proxy, signed (and its kid named) with billing's signing key;
    the same inputs always give the same token. Role `service` (no generation) only while a stack
    upgrades: the billing still running then knows no `proxy` role (ADR 25)."""
    exp = int(datetime.datetime.combine(expires, datetime.time(), datetime.timezone.utc).timestamp())
    lifetime = 2 * 366 * 86_400
    return mint(private_key_pem, sub, role, lifetime, now=exp - lifetime, generation=generation if role == "proxy" else None)


@dataclass(frozen=True)
class ProxyArgs:
    regions: list[Region]
    billing: Billing
    price_per_interaction_cents: int
    token_expires: datetime.date
    token_generation: str = "1"  # services.proxy_token (ADR 25)
    token_role: str = "proxy"  # services.proxy_token_role
    # together_api_key, groq_api_key, openrouter_api_key (from config secrets; None when unset)
    secrets: dict[str, str | None] = field(default_factory=dict)
    # `make local` without provider keys: every provider is this fake upstream (base URL).
    fake_upstream: str | None = None
    # services.proxy_model_aliases, proxy_vision_model, proxy_output_caps (None: the payload's defaults).
    aliases: dict[str, str] | None = None
    vision_model: str | None = None
    output_caps: dict[str, int] | None = None
    # services.proxy_interaction_*: the proxy's INTERACTION_* environment (None: the payload's defaults).
    interactions: dict[str, int | None] = field(default_factory=dict)


def interaction_env(interactions: dict[str, int | None]) -> dict[str, int]:
    """INTERACTION_WINDOW_SECONDS, INTERACTION_MAX_CALLS, INTERACTION_MAX_TOKENS, for those set."""
    return {f"INTERACTION_{name.upper()}": value for name, value in interactions.items() if value is not None}


class Proxy(pulumi.ComponentResource):
    def __init__(self, name: str, args: ProxyArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:Proxy", name, None, opts)
        missing = [k for k in PROVIDER_SECRETS if not args.secrets.get(k)]
        fake = {}
        if args.fake_upstream:
            missing = []
            fake = {var: "fake-upstream" for var in PROVIDER_SECRETS.values()}
            fake.update({f"{var.removesuffix('_KEY')}_BASE": args.fake_upstream for var in PROVIDER_SECRETS.values()})
        if missing:
            effect = ("every paid request will fail" if len(missing) == len(PROVIDER_SECRETS)
                      else "requests fall through to the remaining providers")
            pulumi.log.warn(f"proxy: no {', '.join(missing)}; {effect} "
                            f"(pulumi config set --secret ciris-bridge:{missing[0]} ...)", self)
        days_left = (args.token_expires - datetime.date.today()).days
        if days_left < TOKEN_WARN_DAYS:
            pulumi.log.warn(f"proxy: its billing service token expires on {args.token_expires} ({days_left} days); "
                            "move ciris-bridge:services.proxy_token_expires later and run pulumi up", self)
        if args.token_role == "service":
            pulumi.log.warn("proxy: ciris-bridge:services.proxy_token_role is service: the proxies carry the old token that may act "
                            "for any user; remove the setting once this deploy is done and run pulumi up (ADR 25)", self)
        # What the plan shows of the token: never the token, only what an operator rotates by.
        token_shown = f"proxy role, generation {args.token_generation!r}" if args.token_role == "proxy" else "service role"
        source = payload_files("proxy")
        rendered = config_text(args.aliases, args.vision_model, args.output_caps)
        for region in args.regions:
            token = args.billing.private_key_pem.apply(
                lambda pem, r=region.spec.name: service_token(pem, f"proxy-{r}", args.token_expires, args.token_generation, args.token_role))

            def render(tok):
                return env_file({
                    "BILLING_URL": f"http://billing:{BILLING_PORT}",
                    "BILLING_SERVICE_TOKEN": tok,
                    "BILLING_JWKS_FILE": JWKS_PATH,
                    **{var: args.secrets.get(key) or "" for key, var in PROVIDER_SECRETS.items()},
                    **fake,
                    "PRICE_PER_INTERACTION_CENTS": args.price_per_interaction_cents,
                    **interaction_env(args.interactions),
                    "MAX_BODY_BYTES": MAX_BODY_BYTES,  # the edge refuses larger bodies first
                    "PROXY_CONFIG": CONFIG_PATH,
                    "HOST": "0.0.0.0",
                    "PORT": PORT,
                })

            region.add_service(
                ContainerSpec(
                    name="proxy",
                    image="ciris-proxy:local",
                    build="./proxy",
                    env_file="./proxy/env",
                    volumes=(f"./proxy/config.yaml:{CONFIG_PATH}:ro", f"./proxy/billing-jwks.json:{JWKS_PATH}:ro",
                             "proxy-journal:/var/lib/ciris-proxy"),
                    # Its calls (a minute per provider, with fallbacks) finish before it stops.
                    rolling=True, stop_grace_seconds=STOP_GRACE_SECONDS,
                ),
                {
                    **source,
                    "proxy/config.yaml": rendered,
                    "proxy/billing-jwks.json": args.billing.jwks,
                    "proxy/env": pulumi.Output.secret(token.apply(render)),
                },
                private={"proxy/env": SERVICE_UID},
                shown={"proxy/env": f"[secret: billing token ({token_shown}), Together/Groq/OpenRouter keys, price, body limit]\n"},
            )
        self.register_outputs({})
