"""Billing: the credit service (payloads/billing) in every region, behind that region's edge,
writing to the ReplicatedPostgres primary (FSD §4.2).

The region holding the primary reaches it on the container network; the others over TLS to the
primary's address (verify-full against the stack's CA), through the peer-only 5432 opening. The
DATABASE_URL follows `postgres: primary` in config, so a declared failover re-points every billing
container on the same `pulumi up`. The token signing key is an Ed25519 key the program creates;
its public half is what the proxy verifies user tokens with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_tls as tls

from components import postgres_config as pgc
from components.postgres import PORT as PG_PORT, ReplicatedPostgres
from components.region import Region
from components.services import BILLING_ADDRESS_SUFFIX, SERVICE_UID, ContainerSpec, env_file, payload_files

PORT = 8000
CA_PATH = "/etc/ciris-billing/ca.crt"


def sslmode(same_host: bool) -> str:
    # Certificates name the members' IPs: in-region ("postgres" on the container network) the CA
    # is still verified, the name cannot be.
    return "verify-ca" if same_host else "verify-full"


def database_url(*, host: str, password: str, same_host: bool) -> str:
    return (f"postgresql://{pgc.APP_ROLE}:{password}@{host}:{PG_PORT}/{pgc.DATABASE}"
            f"?sslmode={sslmode(same_host)}&sslrootcert={CA_PATH}")


@dataclass(frozen=True)
class BillingArgs:
    regions: list[Region]
    database: ReplicatedPostgres
    primary: Region
    price_per_interaction_cents: int
    signup_credits: int
    # stripe_secret_key, stripe_webhook_secret (from config secrets; None when unset)
    secrets: dict[str, str | None] = field(default_factory=dict)


class Billing(pulumi.ComponentResource):
    """Outputs: `public_key_pem` (verifies billing's tokens); `private_key_pem` (secret: signs the
    proxy's service token)."""

    def __init__(self, name: str, args: BillingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:Billing", name, None, opts)
        key = tls.PrivateKey(f"{name}-jwt-key", algorithm="ED25519", opts=pulumi.ResourceOptions(parent=self))
        self.public_key_pem = key.public_key_pem
        self.private_key_pem = pulumi.Output.secret(key.private_key_pem_pkcs8)
        missing = [k for k in ("stripe_secret_key", "stripe_webhook_secret") if not args.secrets.get(k)]
        if missing:
            pulumi.log.warn(f"billing: ciris-bridge:{' and ciris-bridge:'.join(missing)} not set; billing starts, but purchases "
                            "and Stripe webhooks answer 503 payments_unavailable "
                            f"(pulumi config set --secret ciris-bridge:{missing[0]} ...)", self)
        source = payload_files("billing")
        for region in args.regions:
            same_host = region is args.primary
            host = pulumi.Output.from_input("postgres") if same_host else args.primary.ipv4

            def render(a, same_host=same_host):
                host, password = a
                return env_file({
                    "DATABASE_URL": database_url(host=host, password=password, same_host=same_host),
                    "BILLING_JWT_PRIVATE_KEY_FILE": "/run/secrets/billing-jwt.pem",
                    "STRIPE_SECRET_KEY": args.secrets.get("stripe_secret_key") or "",
                    "STRIPE_WEBHOOK_SECRET": args.secrets.get("stripe_webhook_secret") or "",
                    "PRICE_PER_INTERACTION_CENTS": args.price_per_interaction_cents,
                    "SIGNUP_CREDITS": args.signup_credits,
                    "HOST": "0.0.0.0",
                    "PORT": PORT,
                    "WORKERS": 2,  # one per vCPU; bench/billing measures 2
                })

            env = pulumi.Output.all(host, args.database.app_password).apply(render)
            region.add_service(
                ContainerSpec(
                    name="billing",
                    image="ciris-billing:local",
                    build="./billing",
                    env_file="./billing/env",
                    volumes=(f"./billing/ca.crt:{CA_PATH}:ro", "./billing/jwt.pem:/run/secrets/billing-jwt.pem:ro"),
                    address_suffix=BILLING_ADDRESS_SUFFIX,  # pg_hba lets this address in
                ),
                {
                    **source,
                    "billing/env": pulumi.Output.secret(env),
                    "billing/ca.crt": args.database.ca_cert,
                    "billing/jwt.pem": self.private_key_pem,
                },
                private={"billing/env": 0, "billing/jwt.pem": SERVICE_UID},
                shown={
                    "billing/env": host.apply(lambda h, s=same_host: f"[secret: DATABASE_URL -> {h}:{PG_PORT} "
                                              f"({sslmode(s)}), Stripe keys, price, signup credits]\n"),
                    "billing/jwt.pem": "[secret: Ed25519 token signing key]\n",
                },
            )
        self.register_outputs({"public_key_pem": self.public_key_pem})
