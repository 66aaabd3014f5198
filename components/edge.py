"""The public edge: one Caddy per region terminating TLS for billing1.<domain> and proxy1.<domain>.

Certificates come from Let's Encrypt over TLS-ALPN-01 only, so port 80 stays closed. Only each
service's public paths are routed (an allow-list); /metrics and everything else answers 404 at the
edge. Access logs are Caddy's JSON lines: no bodies, and Authorization/Cookie headers redacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from components.services import ContainerSpec

CADDY_IMAGE = "caddy:2.10"


@dataclass(frozen=True)
class Site:
    host: str
    upstream: str  # host:port on the container network
    public_paths: tuple[str, ...]


# What clients may reach; everything else (metrics, admin, docs UIs) is internal.
BILLING_PATHS = ("/health", "/openapi.json", "/v1/*")
PROXY_PATHS = ("/health", "/v1/*")


def sites(domain: str, billing_upstream: str = "billing:8000", proxy_upstream: str = "proxy:4000") -> list[Site]:
    return [
        Site(f"billing1.{domain}", billing_upstream, BILLING_PATHS),
        Site(f"proxy1.{domain}", proxy_upstream, PROXY_PATHS),
    ]


def render_caddyfile(
    site_list: Sequence[Site],
    *,
    acme_email: str | None = None,
    hsts_max_age: int = 31_536_000,
    tls: Literal["acme", "internal"] = "acme",
    https_port: int = 443,
    http_port: int = 80,
) -> str:
    """`tls="internal"` (Caddy's own CA) and other ports are for running it on a test machine."""
    glob = ["\tadmin off", f"\thttps_port {https_port}", f"\thttp_port {http_port}", "\tauto_https disable_redirects"]
    if acme_email:
        glob.append(f"\temail {acme_email}")
    if tls == "internal":
        glob.append("\tskip_install_trust")
    glob.append("\tservers {\n\t\tprotocols h1 h2\n\t}")
    out = ["{", *glob, "}", ""]

    tls_block = (
        "\ttls internal"
        if tls == "internal"
        else "\ttls {\n\t\tissuer acme {\n\t\t\tdisable_http_challenge\n\t\t}\n\t}"
    )
    for site in site_list:
        out += [
            f"{site.host} {{",
            tls_block,
            f'\theader Strict-Transport-Security "max-age={hsts_max_age}; includeSubDomains"',
            "\theader -Server",
            "\tlog {\n\t\toutput stdout\n\t\tformat json\n\t}",
            f"\t@public path {' '.join(site.public_paths)}",
            "\thandle @public {",
            f"\t\treverse_proxy {site.upstream}",
            "\t}",
            "\thandle {",
            '\t\trespond "not found" 404',
            "\t}",
            "}",
            "",
        ]
    return "\n".join(out)


def container() -> ContainerSpec:
    return ContainerSpec(
        name="edge",
        image=CADDY_IMAGE,
        ports=("443:443/tcp",),
        volumes=("./Caddyfile:/etc/caddy/Caddyfile:ro", "caddy-data:/data", "caddy-config:/config"),
        healthcheck=None,
    )
