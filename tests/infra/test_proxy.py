"""The proxy in the Pulumi program: deployed in every region with its secrets, its config rendered
by the payload's renderer, its billing service token valid for billing's key set (ADR 21)."""

from __future__ import annotations

import base64
import datetime
import gzip
import io
import json
import tarfile

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from components import mocks, plan, proxy
from components.billing import jwks
from components.services import SERVICE_UID
from tests.conftest import stack_raw

SECRETS = {
    "ciris-bridge:together_api_key": "tg-CANARY-1a",
    "ciris-bridge:groq_api_key": "gq-CANARY-2b",
    "ciris-bridge:openrouter_api_key": "or-CANARY-3c",
}


def deployed_bundle(p: plan.Plan, region: str) -> dict[str, tarfile.TarInfo | str]:
    """What `<region>-deploy` ships to the host: path -> (member, text)."""
    deploy = next(r for r in p.registrations if r.name == f"{region}-deploy")
    raw = base64.b64decode(mocks.unwrap(deploy.inputs)["stdin"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tar:
        return {m.name: (m, tar.extractfile(m).read().decode()) for m in tar.getmembers()}


@pytest.fixture(scope="module")
def production():
    raw, secret_keys = stack_raw("production")
    raw.update(SECRETS)
    return plan.run("production", raw, secret_keys | set(SECRETS))


def env_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


@pytest.mark.parametrize("region", ["us-east", "eu-west"])
def test_proxy_runs_in_every_region_with_its_secrets(production, region):
    p = production
    assert "proxy" in {c.name for c in p.containers[region]}
    files = deployed_bundle(p, region)
    env = env_of(files["proxy/env"][1])
    assert env["BILLING_URL"] == "http://billing:8000"  # this region's billing, on the container network
    assert (env["TOGETHER_API_KEY"], env["GROQ_API_KEY"], env["OPENROUTER_API_KEY"]) == ("tg-CANARY-1a", "gq-CANARY-2b", "or-CANARY-3c")
    assert "LITELLM_MASTER_KEY" not in env  # no admin API: the proxy's routes are the public surface (ADR 8)
    assert env["MAX_BODY_BYTES"] == str(proxy.MAX_BODY_BYTES) and env["PROXY_CONFIG"] == "/etc/ciris-proxy/config.yaml"
    # The service token verifies with the key its kid names in the set the proxy is given, as billing will verify it.
    assert env["BILLING_JWKS_FILE"] == proxy.JWKS_PATH and f"./proxy/billing-jwks.json:{proxy.JWKS_PATH}:ro" in files["compose.yaml"][1]
    keys = jwks.parse(files["proxy/billing-jwks.json"][1])
    claims = jwt.decode(env["BILLING_SERVICE_TOKEN"], keys[service_kid(files)], algorithms=["EdDSA"], audience="ciris-bridge",
                        issuer="ciris-billing")
    # The proxy's own role, of the generation billing is told to accept (ADR 25).
    assert (claims["role"], claims["gen"], claims["sub"]) == ("proxy", "1", f"proxy-{region}")
    assert env_of(files["billing/env"][1])["PROXY_TOKEN_GENERATIONS"] == "1"
    assert claims["exp"] == int(datetime.datetime(2027, 12, 31, tzinfo=datetime.timezone.utc).timestamp())
    # Billing signs with a key of that set, and verifies with the same set.
    assert service_kid(files) == signing_kid(files) and files["billing/jwks.json"][1] == files["proxy/billing-jwks.json"][1]
    assert env_of(files["billing/env"][1])["BILLING_JWKS_FILE"] == "/etc/ciris-billing/jwks.json"
    # The non-root containers read their code and public files; secrets are private to their reader.
    for path in ("proxy/config.yaml", "proxy/billing-jwks.json", "billing/jwks.json", "proxy/ciris_proxy/server.py", "billing/billing/app.py"):
        assert (files[path][0].uid, files[path][0].mode) == (0, 0o644), path
    assert (files["billing/jwt.pem"][0].uid, files["billing/jwt.pem"][0].mode) == (SERVICE_UID, 0o600)
    for path in ("proxy/env", "billing/env"):  # read by the container's own uid, at start (d7d929b)
        assert (files[path][0].uid, files[path][0].mode) == (SERVICE_UID, 0o600), path
    compose = files["compose.yaml"][1]
    assert "./proxy/config.yaml:/etc/ciris-proxy/config.yaml:ro" in compose and "ciris-proxy:local" in compose


def signing_kid(files) -> str:
    """The kid of the key billing signs with (billing/jwt.pem)."""
    return jwks.thumbprint(load_pem_private_key(files["billing/jwt.pem"][1].encode(), password=None).public_key())


def service_kid(files) -> str:
    return jwt.get_unverified_header(env_of(files["proxy/env"][1])["BILLING_SERVICE_TOKEN"])["kid"]


def key_set(files) -> list[str]:
    return list(jwks.parse(files["billing/jwks.json"][1]))


def with_keys(keys: list[str], signing: str | None = None) -> plan.Plan:
    raw, secret_keys = stack_raw("staging")
    raw["ciris-bridge:services"] = {**raw.get("ciris-bridge:services", {}), "jwt_keys": keys,
                                    **({"jwt_signing_key": signing} if signing else {})}
    return plan.run("staging", raw, secret_keys)


def test_one_key_set_ships_to_every_regions_billing_and_proxy(production):
    """The same JWKS file everywhere (so both regions learn a key in one deploy); by default one key,
    the existing stack's `billing-jwt-key`, which signs."""
    sets = {deployed_bundle(production, r)[path][1] for r in ("us-east", "eu-west") for path in ("billing/jwks.json", "proxy/billing-jwks.json")}
    assert len(sets) == 1
    assert [r.name for r in production.registrations if r.type == "tls:index/privateKey:PrivateKey" and "jwt" in r.name] == ["billing-jwt-key"]
    files = deployed_bundle(production, "us-east")
    assert key_set(files) == [signing_kid(files)] and production.artifacts["us-east/billing/jwks.json"] == files["billing/jwks.json"][1]


def test_a_key_rotates_in_three_deploys_with_every_token_verifying_throughout():
    """docs/runbook-secrets.md: add the new key (verify-only), make it the signer, remove the old.
    Key "1" keeps its resource name, so an existing stack keeps its key; the service token is
    re-minted with whichever key signs."""
    before = {r: deployed_bundle(with_keys(["1"]), r) for r in ("us-east", "eu-west")}
    old = signing_kid(before["us-east"])
    added = with_keys(["1", "2"])
    assert sorted(r.name for r in added.registrations if r.type == "tls:index/privateKey:PrivateKey" and "jwt" in r.name) == [
        "billing-jwt-key", "billing-jwt-key-2"]
    steps = [added, with_keys(["1", "2"], "2"), with_keys(["2"])]
    bundles = [{r: deployed_bundle(p, r) for r in ("us-east", "eu-west")} for p in steps]
    new = signing_kid(bundles[1]["us-east"])
    assert new != old
    expected = [([old, new], old), ([old, new], new), ([new], new)]  # (published set, signer) after each deploy
    previous = before
    for (published, signer), files in zip(expected, bundles):
        for region in ("us-east", "eu-west"):
            f = files[region]
            assert key_set(f) == published and f["proxy/billing-jwks.json"][1] == f["billing/jwks.json"][1]
            assert signing_kid(f) == service_kid(f) == signer
            # Mid-deploy, one region runs the new bundle and the other the previous one: each side's
            # tokens verify with the other side's set.
            for other in ("us-east", "eu-west"):
                assert signing_kid(previous[other]) in key_set(f) and signing_kid(f) in key_set(previous[other])
        previous = files
    # Deploys that change no key change no token: the service token is re-minted only when the signer changes.
    assert service_token_of(before) == service_token_of(bundles[0]) and service_token_of(bundles[1]) == service_token_of(bundles[2])


def service_token_of(files: dict) -> str:
    return env_of(files["us-east"]["proxy/env"][1])["BILLING_SERVICE_TOKEN"]


def test_the_plan_shows_the_config_but_no_secret(production):
    artifacts = json.dumps(production.artifacts)
    for canary in SECRETS.values():
        assert canary not in artifacts
    for region in ("us-east", "eu-west"):  # nor the proxy's billing token: only its role and generation
        assert env_of(deployed_bundle(production, region)["proxy/env"][1])["BILLING_SERVICE_TOKEN"] not in artifacts
    assert production.artifacts["us-east/proxy/env"].startswith("[secret: billing token (proxy role, generation '1')")
    assert "proxy token generations: 1," in production.artifacts["us-east/billing/env"]
    config = production.artifacts["us-east/proxy/config.yaml"]
    assert "together_ai/" in config and "data_collection: deny" in config and "os.environ/TOGETHER_API_KEY" in config


def with_proxy_tokens(generations: list[str], carried: str | None = None, **more) -> plan.Plan:
    raw, secret_keys = stack_raw("staging")
    raw["ciris-bridge:services"] = {**raw.get("ciris-bridge:services", {}), "proxy_tokens": generations,
                                    **({"proxy_token": carried} if carried else {}), **more}
    return plan.run("staging", raw, secret_keys)


def accepted(files) -> set[str]:
    """The proxy token generations this bundle's billing accepts."""
    return set(env_of(files["billing/env"][1])["PROXY_TOKEN_GENERATIONS"].split(","))


def carried(files) -> str | None:
    claims = jwt.decode(env_of(files["proxy/env"][1])["BILLING_SERVICE_TOKEN"], options={"verify_signature": False})
    return claims.get("gen") if claims["role"] == "proxy" else None


def test_the_proxy_token_rotates_in_three_deploys_and_every_call_is_accepted_throughout():
    """docs/runbook-secrets.md: billing learns the new generation, the proxies carry it, billing
    drops the old one (revoked). While a region deploys, its old and new billing both answer
    `billing` (the twin, ADR 16), and its old and new proxy both call it: each proxy's generation
    must be accepted by both billings."""
    steps = [with_proxy_tokens(["1"]), with_proxy_tokens(["1", "2"]), with_proxy_tokens(["1", "2"], "2"), with_proxy_tokens(["2"])]
    bundles = [{r: deployed_bundle(p, r) for r in ("us-east", "eu-west")} for p in steps]
    assert [(accepted(b["us-east"]), carried(b["us-east"])) for b in bundles] == [
        ({"1"}, "1"), ({"1", "2"}, "1"), ({"1", "2"}, "2"), ({"2"}, "2")]
    for before, after in zip(bundles, bundles[1:]):
        for region in ("us-east", "eu-west"):
            old, new = before[region], after[region]
            for proxy_side in (old, new):
                assert carried(proxy_side) in accepted(old) & accepted(new), (carried(proxy_side), accepted(old), accepted(new))
    # Billing's list alone changing leaves the proxies' token as it was: no proxy restart in steps 1 and 3.
    assert service_token_of(bundles[0]) == service_token_of(bundles[1]) and service_token_of(bundles[2]) == service_token_of(bundles[3])


def test_a_stack_upgrades_to_the_proxy_role_in_two_deploys(monkeypatch):
    """The billing running before this change knows no `proxy` role: for one deploy the proxies keep
    the old service token while billing learns the role, then they switch (ADR 25)."""
    warnings = []
    monkeypatch.setattr("pulumi.log.warn", lambda msg, *a, **k: warnings.append(msg))
    files = deployed_bundle(with_proxy_tokens(["1"], proxy_token_role="service"), "us-east")
    claims = jwt.decode(env_of(files["proxy/env"][1])["BILLING_SERVICE_TOKEN"], options={"verify_signature": False})
    assert claims["role"] == "service" and "gen" not in claims and accepted(files) == {"1"}
    assert any("proxy_token_role is service" in w for w in warnings)
    assert carried(deployed_bundle(with_proxy_tokens(["1"]), "us-east")) == "1"


def test_service_token_is_stable_across_runs():
    """The same claims sign to the same token: a preview shows no change until the date moves."""
    raw, secret_keys = stack_raw("staging")
    first, second = (deployed_bundle(plan.run("staging", raw, secret_keys), "us-east") for _ in range(2))
    token = lambda files: env_of(files["proxy/env"][1])["BILLING_SERVICE_TOKEN"]  # noqa: E731
    assert token(first) == token(second)


def test_token_expiry_is_config_and_warned_when_near(monkeypatch):
    raw, secret_keys = stack_raw("staging")
    soon = (datetime.date.today() + datetime.timedelta(days=10)).isoformat()
    raw["ciris-bridge:services"] = {**raw.get("ciris-bridge:services", {}), "proxy_token_expires": soon}
    warnings = []
    monkeypatch.setattr("pulumi.log.warn", lambda msg, *a, **k: warnings.append(msg))
    files = deployed_bundle(plan.run("staging", raw, secret_keys), "us-east")
    exp = jwt.decode(env_of(files["proxy/env"][1])["BILLING_SERVICE_TOKEN"], options={"verify_signature": False})["exp"]
    assert datetime.datetime.fromtimestamp(exp, datetime.timezone.utc).date().isoformat() == soon
    assert any("service token expires" in w and soon in w for w in warnings)



def test_the_edge_refuses_bodies_the_proxy_would_refuse():
    from components import edge, proxy

    assert edge.PROXY_MAX_BODY == proxy.MAX_BODY_BYTES
    caddyfile = edge.render_caddyfile(edge.sites("example.ai"))
    assert f"max_size {edge.PROXY_MAX_BODY}" in caddyfile and "request>headers>X-Provider-Key delete" in caddyfile
    assert "/.well-known/jwks.json" in caddyfile  # billing's token keys are public (ADR 21)


def test_the_proxys_models_are_config(production):
    """Aliases, the model for images and output caps flow from services.* into the shipped config; by
    default the CIRIS agent's names (default, fast) and caps that fit it (ADR 18)."""
    import yaml

    default = yaml.safe_load(production.artifacts["us-east/proxy/config.yaml"])
    assert default["router_settings"]["model_group_alias"] == {"default": "llama-4-maverick", "fast": "llama-4-maverick"}
    assert default["ciris_settings"] == {"vision_model": "llama-4-maverick"}
    assert {d["model_info"]["max_output_tokens"] for d in default["model_list"] if "max_output_tokens" in d["model_info"]} >= {8192}
    raw, secret_keys = stack_raw("staging")
    raw["ciris-bridge:services"] = {**raw.get("ciris-bridge:services", {}), "proxy_model_aliases": {"small": "llama-3.1-8b"},
                                    "proxy_output_caps": {"llama-3.1-8b": 1000}}
    files = deployed_bundle(plan.run("staging", raw, secret_keys), "us-east")
    doc = yaml.safe_load(files["proxy/config.yaml"][1])
    assert doc["router_settings"]["model_group_alias"] == {"small": "llama-3.1-8b"}
    caps = {d["model_name"]: d["model_info"].get("max_output_tokens") for d in doc["model_list"]}
    assert caps["llama-3.1-8b"] == 1000 and caps["llama-3.3-70b"] == 8192  # the others keep theirs


def test_the_interaction_window_and_budgets_are_config(production):
    """services.proxy_interaction_* reach the proxy's environment; unset, the payload's defaults."""
    assert not any(k.startswith("INTERACTION_") for k in env_of(deployed_bundle(production, "us-east")["proxy/env"][1]))
    raw, secret_keys = stack_raw("staging")
    raw["ciris-bridge:services"] = {**raw.get("ciris-bridge:services", {}), "proxy_interaction_window_seconds": 600,
                                    "proxy_interaction_max_calls": 40, "proxy_interaction_max_tokens": 500000}
    env = env_of(deployed_bundle(plan.run("staging", raw, secret_keys), "us-east")["proxy/env"][1])
    assert (env["INTERACTION_WINDOW_SECONDS"], env["INTERACTION_MAX_CALLS"], env["INTERACTION_MAX_TOKENS"]) == ("600", "40", "500000")


@pytest.mark.parametrize("setting, text", [
    ({"proxy_interaction_max_calls": 0}, "greater than or equal to 1"),
    ({"proxy_model_aliases": {"default": "gpt-9"}}, "names no model: gpt-9"),
    ({"proxy_vision_model": "llama-3.3-70b"}, "does not take images"),
    ({"proxy_output_caps": {"llama-3.3-70b": 0}}, "greater than or equal to 1"),
])
def test_a_proxy_model_setting_naming_no_model_is_one_clear_error(setting, text):
    from components import config

    raw, secret_keys = stack_raw("staging")
    raw["ciris-bridge:services"] = {**raw.get("ciris-bridge:services", {}), **setting}
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys)
    assert info.value.key.startswith("ciris-bridge:services") and text in info.value.message
