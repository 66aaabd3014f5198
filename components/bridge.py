"""The whole bridge: every region, the witness, the replicated database, and the stack outputs."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_tls as tls

from components import cost
from components.billing import Billing, BillingArgs
from components.config import BridgeConfig
from components.release import Release
from components.monitors import Monitors, MonitorsArgs
from components.nameservers import Nameservers, NameserversArgs
from components.postgres import ReplicatedPostgres, ReplicatedPostgresArgs
from components.proxy import PROVIDER_SECRETS, Proxy, ProxyArgs
from components.region import Region, RegionArgs
from components.services import ContainerSpec, payload_files
from components.witness import NO_WITNESS, Witness, WitnessArgs

CLIENT_CONFIG_SCHEMA = 1
FAKE_LLM_PORT = 8080  # payloads/fake-llm


@dataclass
class Bridge:
    regions: list[Region]
    database: ReplicatedPostgres
    billing: Billing
    nameservers: Nameservers
    estimate: cost.Estimate
    outputs: dict[str, pulumi.Input]
    witness: Witness | None = None
    failover: str = NO_WITNESS  # what the database does when a region is lost (the plan prints it)

    @property
    def nodes(self) -> list[Witness | Region]:
        """Every host: the witness (it deploys first), then the regions in config order."""
        return [*([self.witness] if self.witness else []), *self.regions]

    @property
    def artifacts(self) -> pulumi.Output[dict[str, str]]:
        """Rendered files by path (`<host>/<file>`, `zones/<zone>.zone`), for the plan's --out."""
        files = {f"{n.spec.name}/{name}": text for n in self.nodes for name, text in n.artifacts.items()}
        return pulumi.Output.all(pulumi.Output.all(**files), self.nameservers.zone_files).apply(
            lambda a: {**a[0], **{f"zones/{zone}.zone": text for zone, text in a[1].items()}}
        )


def build(config: BridgeConfig) -> Bridge:
    edge_ca = local_edge_ca() if config.environment == "local" else None
    shared: dict = {}
    witness = Witness(config.witness.name, WitnessArgs(config.witness, config, shared)) if config.witness else None
    regions = [Region(r.name, RegionArgs(r, config, i, edge_ca, shared)) for i, r in enumerate(config.regions)]
    by_name = {r.spec.name: r for r in regions}
    database = ReplicatedPostgres(
        "postgres",
        ReplicatedPostgresArgs(
            primary=by_name[config.primary.name],
            replicas=[by_name[r.name] for r in config.replicas],
            backup=config.backup,
            backup_secrets={k: config.secret(k) for k in ("backup_encryption_key", "backup_s3_access_key", "backup_s3_secret_key")},
            witness=witness,
            logins=tuple(config.services.database_logins),
            login=config.services.app_login,
        ),
    )
    billing = Billing(
        "billing",
        BillingArgs(
            regions=regions,
            database=database,
            primary=by_name[config.primary.name],
            price_per_interaction_cents=config.services.price_per_interaction_cents,
            signup_credits=config.services.signup_credits,
            secrets={k: config.secret(k) for k in ("stripe_secret_key", "stripe_webhook_secret")},
            sign_in=config.sign_in,
            jwt_keys=tuple(config.services.jwt_keys),
            jwt_signing_key=config.services.signing_key,
            proxy_token_generations=tuple(config.services.proxy_tokens),
        ),
    )
    fake_upstream = None
    if config.services.fake_llm_upstream:
        fake_upstream = f"http://fake-llm:{FAKE_LLM_PORT}/v1"
        for region in regions:
            region.add_service(ContainerSpec(name="fake-llm", image="ciris-fake-llm:local", build="./fake-llm"),
                               payload_files("fake-llm"))
    Proxy(
        "proxy",
        ProxyArgs(
            regions=regions,
            billing=billing,
            price_per_interaction_cents=config.services.price_per_interaction_cents,
            token_expires=config.services.proxy_token_expires,
            token_generation=config.services.proxy_generation,
            token_role=config.services.proxy_token_role,
            secrets={k: config.secret(k) for k in PROVIDER_SECRETS},
            fake_upstream=fake_upstream,
            aliases=config.services.proxy_model_aliases,
            vision_model=config.services.proxy_vision_model,
            output_caps=config.services.proxy_output_caps,
            interactions={name: getattr(config.services, f"proxy_interaction_{name}")
                          for name in ("window_seconds", "max_calls", "max_tokens")},
        ),
    )
    nodes = [*([witness] if witness else []), *regions]
    monitors = Monitors("monitoring", MonitorsArgs(
        nodes, regions, config, [config.primary.name, *(r.name for r in config.replicas)], database.consensus_hosts,
        edge_ca=edge_ca[0] if edge_ca else None))
    # Every component has added its containers and files. The witness first: the consensus needs
    # two of its three members before the primary's database can start. Then the primary's
    # region: a replica clones from it, and a region's billing writes to it.
    first = [witness.build()] if witness else []
    primary = by_name[config.primary.name]
    primary.build(after=first)
    for region in regions:
        if region is not primary:
            region.build(after=[primary.deploy])
    if config.replicas:
        database.declare_primary(after=[r.deploy for r in regions])
    nameservers = Nameservers(
        "dns",
        NameserversArgs(
            regions,
            config.zones,
            hostmaster=config.services.hostmaster,
            geo=config.services.dns_geoip_database is not None,
        ),
    )
    estimate = cost.estimate(config.regions, config.budget, config.witness, config.backup)
    outputs = {
        "client_config": client_config(config, regions),
        "glue_records": glue_records(regions),
        "database": database.summary,
        "monthly_cost_usd": estimate.as_output(),
        # For operators (SSH, the consensus's health); never in client_config: clients don't talk to it.
        "witness": witness.summary() if witness else None,
        # For `ops status`: each host's Prometheus (over SSH where it listens on the host's loopback).
        "monitoring": monitors.summary,
        # What every host runs (ADR 10): the release's id and each payload's image; None before the first.
        "release": release_summary(config.release),
    }
    if any(z.dnssec for z in config.zones.zones.values()):
        outputs["dnssec_ds"] = nameservers.dnssec_ds
    failover = NO_WITNESS
    if witness:
        members = ", ".join([config.primary.name, *(r.name for r in config.replicas), witness.spec.name])
        failover = (f"automatic: consensus members in {members} (the witness at {witness.spec.provider} "
                    f"{witness.spec.location}); losing any one provider leaves a majority")
    return Bridge(regions, database, billing, nameservers, estimate, outputs, witness, failover)


def release_summary(release: Release | None) -> dict | None:
    if release is None:
        return None
    return {"id": release.id, "built": release.built, "images": {p: release.ref(p) for p in sorted(release.images)}}


def local_edge_ca() -> tuple[pulumi.Output[str], ...]:
    """`make local`: one CA for every region's edge (no ACME here); clients trust local/ca.crt.
    (root cert, root key, intermediate cert, intermediate key): the edges sign with the long-lived
    intermediate, so their certificates last 90 days like a public CA's (Caddy 2.6 makes its own
    7-day intermediate otherwise, and its sites' certificates last 12 hours)."""
    key = tls.PrivateKey("edge-ca-key", algorithm="ECDSA", ecdsa_curve="P256")
    cert = tls.SelfSignedCert(
        "edge-ca", private_key_pem=key.private_key_pem, is_ca_certificate=True,
        subject=tls.SelfSignedCertSubjectArgs(common_name="ciris-bridge local CA"),
        validity_period_hours=24 * 365 * 10, allowed_uses=["cert_signing", "crl_signing"],
    )
    int_key = tls.PrivateKey("edge-ca-intermediate-key", algorithm="ECDSA", ecdsa_curve="P256")
    request = tls.CertRequest("edge-ca-intermediate-request", private_key_pem=int_key.private_key_pem,
                              subject=tls.CertRequestSubjectArgs(common_name="ciris-bridge local intermediate"))
    intermediate = tls.LocallySignedCert(
        "edge-ca-intermediate", cert_request_pem=request.cert_request_pem, ca_private_key_pem=key.private_key_pem,
        ca_cert_pem=cert.cert_pem, is_ca_certificate=True, validity_period_hours=24 * 365 * 5,
        allowed_uses=["cert_signing", "crl_signing"],
    )
    return (cert.cert_pem, pulumi.Output.secret(key.private_key_pem),
            intermediate.cert_pem, pulumi.Output.secret(int_key.private_key_pem))


def client_config(config: BridgeConfig, regions: list[Region]) -> dict:
    """What clients read. Lists are in failover order: the order regions are listed in config."""
    return {
        "schema_version": CLIENT_CONFIG_SCHEMA,
        "environment": config.environment,
        "billing_urls": [f"https://billing1.{r.domain}" for r in regions],
        "proxy_urls": [f"https://proxy1.{r.domain}" for r in regions],
        "dns": {
            "zones": [r.domain for r in regions],
            "nameservers": [{"name": r.nameserver, "ipv4": r.ipv4, "ipv6": r.ipv6} for r in regions],
        },
        "regions": [
            {
                "name": r.spec.name,
                "provider": r.spec.provider,
                "location": r.spec.location,
                "domain": r.domain,
                "ipv4": r.ipv4,
                "ipv6": r.ipv6,
            }
            for r in regions
        ],
    }


def glue_records(regions: list[Region]) -> list[dict]:
    """Per domain: the NS set and the glue (A/AAAA of its own in-zone nameserver) to enter where the
    domain is delegated -- at the registrar for registered domains, in the parent zone otherwise."""
    return [
        {
            "domain": r.domain,
            "delegated_at": "registrar" if cost.registrable(r.domain) else "parent zone",
            "nameservers": [other.nameserver for other in regions],
            "glue": [{"host": r.nameserver, "ipv4": r.ipv4, "ipv6": r.ipv6}],
        }
        for r in regions
    ]
