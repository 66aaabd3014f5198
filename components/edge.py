"""The public edge: one Caddy per region terminating TLS for billing1.<domain> and proxy1.<domain>,
and for the extra names the region's config gives each service (ADR 19).

Certificates come from Let's Encrypt over TLS-ALPN-01 only, so port 80 stays closed. Only each
service's public paths are routed (an allow-list); /metrics and everything else answers 404 at the
edge. Access logs are Caddy's JSON lines: no bodies, and Authorization/Cookie headers redacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from components.dns import SERVICE_LABELS
from components.services import ContainerSpec, main_name, twin_name

CA_DIR = "/etc/caddy/ca"  # `make local`: the stack's own CA, which signs every region's certificates


SERVING_URI = "/serving"  # 503 while a rolling service drains before its deploy stops it (ADR 16)


@dataclass(frozen=True)
class Site:
    host: str
    upstreams: tuple[str, ...]  # host:port on the container network, the first healthy one serves
    public_paths: tuple[str, ...]
    max_body: int = 64 * 1024  # bytes: larger bodies get 413 at the edge, before any service reads them
    aliases: tuple[str, ...] = ()  # more names for the same site, each with its own certificate

    @property
    def names(self) -> tuple[str, ...]:
        return (self.host, *self.aliases)


# What clients may reach; everything else (metrics, admin, docs UIs) is internal.
BILLING_PATHS = ("/health", "/openapi.json", "/.well-known/jwks.json", "/v1/*")  # jwks: its token keys (ADR 21)
PROXY_PATHS = ("/health", "/ready", "/v1/*")  # /ready: can a paid call be served (monitoring)
PROXY_MAX_BODY = 512 * 1024  # = components.proxy.MAX_BODY_BYTES, the proxy's own cap (a test checks)


def rolling(service: str, port: int) -> tuple[str, ...]:
    """A rolling service's container, then its twin, which runs only while a deploy replaces it."""
    return f"{main_name(service)}:{port}", f"{twin_name(service)}:{port}"


def sites(domain: str, billing: str | tuple[str, ...] = rolling("billing", 8000),
          proxy: str | tuple[str, ...] = rolling("proxy", 4000), names: Mapping[str, Sequence[str]] | None = None) -> list[Site]:
    """Each service at its default name in `domain` and at its extra `names` (service -> host names)."""
    as_tuple = lambda u: (u,) if isinstance(u, str) else tuple(u)  # noqa: E731
    host = lambda service: f"{SERVICE_LABELS[service]}.{domain}"  # noqa: E731
    extra = lambda service: tuple((names or {}).get(service, ()))  # noqa: E731
    return [
        Site(host("billing"), as_tuple(billing), BILLING_PATHS, aliases=extra("billing")),
        Site(host("proxy"), as_tuple(proxy), PROXY_PATHS, PROXY_MAX_BODY, aliases=extra("proxy")),
    ]


def reverse_proxy(upstreams: tuple[str, ...]) -> str:
    """A connection refused (a service starting, stopping) is tried again, on the next upstream or
    the same one, for up to 30 s instead of failing. With a twin (ADR 16) the edge asks each upstream
    every second whether it takes new requests and sends each to the first that does: a deploy
    drains a container (503 on /serving) before it stops it, so no request reaches a closing
    listener (Caddy 2.6 cannot resend a POST's body). No kept-alive upstream connections: a request
    is never sent on one a stopping service is closing."""
    opts = ["lb_try_duration 30s", "lb_try_interval 250ms"]
    if len(upstreams) > 1:
        opts += ["lb_policy first", f"health_uri {SERVING_URI}", "health_interval 1s", "health_timeout 2s"]
    lines = [f"reverse_proxy {' '.join(upstreams)} {{", *(f"\t{o}" for o in opts),
             "\ttransport http {", "\t\tkeepalive off", "\t}", "}"]
    return "\n".join(f"\t\t{line}" for line in lines)


def render_caddyfile(
    site_list: Sequence[Site],
    *,
    acme_email: str | None = None,
    hsts_max_age: int = 31_536_000,
    tls: Literal["acme", "internal"] = "acme",
    https_port: int = 443,
    http_port: int = 80,
    ca_dir: str | None = None,
) -> str:
    """`tls="internal"` (Caddy's own CA, or the root in `ca_dir`: `make local`) and other ports are
    for running it on this machine."""
    glob = ["\tadmin off", f"\thttps_port {https_port}", f"\thttp_port {http_port}", "\tauto_https disable_redirects"]
    if acme_email:
        glob.append(f"\temail {acme_email}")
    if tls == "internal":
        glob.append("\tskip_install_trust")
    if ca_dir:
        pair = lambda kind: f"\t\t\t{kind} {{\n\t\t\t\tcert {ca_dir}/{kind}.crt\n\t\t\t\tkey {ca_dir}/{kind}.key\n\t\t\t}}"  # noqa: E731
        glob.append(f"\tpki {{\n\t\tca local {{\n{pair('root')}\n{pair('intermediate')}\n\t\t}}\n\t}}")
    glob.append("\tservers {\n\t\tprotocols h1 h2\n\t}")
    # The twins' health checks fail every second while no deploy runs (no such host): not logged.
    glob.append("\tlog default {\n\t\toutput stderr\n\t\texclude http.handlers.reverse_proxy.health_checker.active\n\t}")
    out = ["{", *glob, "}", ""]

    # Internal: 90 days, like a public CA's certificates (Caddy's default is 12 hours), so monitoring
    # judges both stacks alike; it needs `ca_dir`'s long-lived intermediate (Caddy makes a 7-day one).
    if tls == "internal":
        tls_block = "\ttls {\n\t\tissuer internal {\n\t\t\tlifetime 90d\n\t\t}\n\t}" if ca_dir else "\ttls internal"
    else:
        tls_block = "\ttls {\n\t\tissuer acme {\n\t\t\tdisable_http_challenge\n\t\t}\n\t}"
    for site in site_list:
        out += [
            f"{', '.join(site.names)} {{",
            tls_block,
            f'\theader Strict-Transport-Security "max-age={hsts_max_age}; includeSubDomains"',
            "\theader -Server",
            # Caddy redacts Authorization and Cookie itself; a caller's own provider key never lands in a log.
            "\tlog {\n\t\toutput stdout\n\t\tformat filter {\n\t\t\twrap json\n\t\t\tfields {\n"
            "\t\t\t\trequest>headers>X-Provider-Key delete\n\t\t\t}\n\t\t}\n\t}",
            # A declared length over the cap is refused before anything is read; a chunked body is
            # cut off at the cap (Caddy 2.6 then answers 502): no service ever reads more.
            "\t@too_large expression {http.request.header.Content-Length} != '' && "
            f"int({{http.request.header.Content-Length}}) > {site.max_body}",
            '\thandle @too_large {\n\t\trespond "request body too large" 413\n\t}',
            f"\trequest_body {{\n\t\tmax_size {site.max_body}\n\t}}",
            f"\t@public path {' '.join(site.public_paths)}",
            "\thandle @public {",
            reverse_proxy(site.upstreams),
            "\t}",
            "\thandle {",
            '\t\trespond "not found" 404',
            "\t}",
            "}",
            "",
        ]
    return "\n".join(out)


def container(local_ca: bool = False, podman_dns: str | None = None) -> ContainerSpec:
    """Caddy from payloads/edge; with `local_ca` it also mounts the stack's CA (`make local`).
    `podman_dns` (`make local`): Podman's name server on the region network, the only one the edge
    asks. Podman lists the host's resolvers after its own, and a lookup its own answered late
    (it reloads whenever a container starts) got the host's "no such host" instead: a failed dial,
    and Caddy 2.6 cannot send a POST again (ADR 16). Asked alone, it is asked again after 2 s."""
    ca = (f"./edge/ca:{CA_DIR}:ro",) if local_ca else ()
    return ContainerSpec(
        name="edge",
        image="ciris-edge:local",
        build="./edge",
        ports=("443:443/tcp",),
        volumes=("./Caddyfile:/etc/caddy/Caddyfile:ro", *ca, "caddy-data:/data", "caddy-config:/config"),
        dns=(podman_dns,) if podman_dns else (),
        dns_options=("timeout:2", "attempts:3") if podman_dns else (),
    )
