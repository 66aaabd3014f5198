"""Extra host names per service and region (regions[].names, ADR 19): config, the edge, DNS, the warning."""

from __future__ import annotations

import pytest

from components import config, plan
from tests.conftest import stack_raw
from tests.infra import expected

P = "ciris-bridge"


def regions(raw):
    return raw[f"{P}:regions"]


CASES = [
    ({"proxy": ["*.ciris-services-1.ai"]}, 0, "regions[0].names.proxy[0]", "no wildcard"),
    ({"proxy": ["LLM01.ciris-services-1.ai"]}, 0, "regions[0].names.proxy[0]", "is not a host name"),
    ({"billing": ["ok.example.org", "billing1.example.org."]}, 0, "regions[0].names.billing[1]", "is not a host name"),
    ({"billing": [f"{'a' * 64}.example.org"]}, 1, "regions[1].names.billing[0]", "is not a host name"),
    ({"proxy": ["llm01.ciris-services-1.ai"]}, 1, "regions[1].names.proxy[0]", "is already regions[0].names.proxy[0]"),
    ({"proxy": ["billing1.ciris-services-2.ai"]}, 1, "regions[1].names.proxy[0]", "is already regions[1]'s default billing name"),
    ({"proxy": ["proxy1.ciris-services-1.ai"]}, 1, "regions[1].names.proxy[0]", "is already regions[0]'s default proxy name"),
    ({"billing": ["api.example.org"], "proxy": ["api.example.org"]}, 1, "regions[1].names.proxy[0]",
     "is already regions[1].names.billing[0]"),
    ({"proxy": ["x.example.org", "x.example.org"]}, 1, "regions[1].names.proxy[1]", "is already regions[1].names.proxy[0]"),
    ({"proxy": ["ns1.ciris-services-1.ai"]}, 1, "regions[1].names.proxy[0]", "is already regions[0]'s nameserver"),
    ({"dns": ["x.example.org"]}, 1, "regions[1].names.dns", "unknown setting"),
]


@pytest.mark.parametrize("names,region,key,text", CASES)
def test_a_bad_name_is_refused_naming_its_key(names, region, key, text):
    raw, secret_keys = stack_raw("production")
    regions(raw)[region]["names"] = names
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys)
    assert info.value.key == f"{P}:{key}"
    assert text in info.value.message


def test_names_are_optional_and_the_defaults_stay():
    raw, secret_keys = stack_raw("staging")
    cfg = config.parse(raw, secret_keys)
    assert [r.extra_names for r in cfg.regions] == [(), ()]


def zone_records(text: str) -> set[tuple[str, str, str]]:
    """(name, type, content) of a rendered RFC 1035 zone's A/AAAA lines."""
    lines = (line.split(None, 4) for line in text.splitlines() if not line.startswith(("$", ";")))
    return {(name, rtype, content) for name, _, _, rtype, content in lines if rtype in ("A", "AAAA")}


@pytest.mark.parametrize("stack", ["production", "local"])
def test_edges_answer_the_names_and_dns_points_ours_at_them(stack, monkeypatch):
    """Each site answers its default name and the region's extra ones; an extra name in one of our
    zones gets the serving region's A/AAAA there, one outside gets none, and the plan says where to
    point it."""
    warnings = []
    monkeypatch.setattr("pulumi.log.warn", lambda msg, *a, **k: warnings.append(msg))
    raw, secret_keys = stack_raw(stack)
    p = plan.run(stack, raw, secret_keys)
    ips = expected.addresses(p)
    names = expected.host_names(raw)
    assert any(len(services["proxy"]) > 1 for services in names.values())  # the stack has extra names
    for region, services in names.items():
        lines = p.artifacts[f"{region}/Caddyfile"].splitlines()
        for service_names in services.values():
            assert f"{', '.join(service_names)} {{" in lines
    in_zones, outside = expected.name_records(p, raw)
    for zone, records in in_zones.items():
        assert records <= zone_records(p.artifacts[f"zones/{zone}.zone"]), zone
    recorded = {name for path, text in p.artifacts.items() if path.startswith("zones/") for name, _, _ in zone_records(text)}
    # Production's names are all in our zones (its foreign one waits for its domain: ADR 19).
    assert bool(outside) == (stack == "local") and not {f"{name}." for name in outside} & recorded
    # One warning per region serving names outside our zones, with where to point them.
    foreign = [w for w in warnings if w.startswith("dns: ")]
    serving = {r["name"]: [n for ns in r.get("names", {}).values() for n in ns if n in outside] for r in regions(raw)}
    assert len(foreign) == sum(1 for ns in serving.values() if ns)
    for region, region_names in serving.items():
        if region_names:
            warning = next(w for w in foreign if w.startswith(f"dns: {region} serves "))
            assert all(n in warning for n in region_names)
            assert f"(A {ips[region][0]}, AAAA {ips[region][1]})" in warning
    assert all(n.rstrip(".") not in " ".join(foreign) for recs in in_zones.values() for n, _, _ in recs)


def test_the_stacks_serve_the_released_agents_names():
    """The released agent's CIRIS_SERVICES.json: billing1.ciris-services-{1,2}.ai (production's
    defaults), llm01.ciris-services-1.ai (and llm01.ciris-services-eu-1.com, production's once its
    holder points it at eu-west); locally, all four."""
    raw, secret_keys = stack_raw("production")
    cfg = config.parse(raw, secret_keys)
    assert {r.name: r.extra_names for r in cfg.regions} == {
        "us-east": ("llm01.ciris-services-1.ai",), "eu-west": ()}
    raw, secret_keys = stack_raw("local")
    cfg = config.parse(raw, secret_keys)
    assert {r.name: (r.names.billing, r.names.proxy) for r in cfg.regions} == {
        "us-east": (["billing1.ciris-services-1.ai"], ["llm01.ciris-services-1.ai"]),
        "eu-west": (["billing1.ciris-services-2.ai"], ["llm01.ciris-services-eu-1.com"])}
