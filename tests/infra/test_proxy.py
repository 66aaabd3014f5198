"""The proxy in the Pulumi program: deployed in every region with its secrets, its config rendered
by the payload's renderer, its billing service token valid for billing's key."""

from __future__ import annotations

import base64
import datetime
import gzip
import io
import json
import tarfile

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key, load_pem_public_key

from components import mocks, plan, proxy
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
    # The service token verifies with the public key the proxy is given, as billing will verify it.
    public = load_pem_public_key(files["proxy/billing-public.pem"][1].encode())
    claims = jwt.decode(env["BILLING_SERVICE_TOKEN"], public, algorithms=["EdDSA"], audience="ciris-bridge", issuer="ciris-billing")
    assert claims["role"] == "service" and claims["sub"] == f"proxy-{region}"
    assert claims["exp"] == int(datetime.datetime(2027, 12, 31, tzinfo=datetime.timezone.utc).timestamp())
    # Billing signs with the key whose public half the proxy holds.
    signing = load_pem_private_key(files["billing/jwt.pem"][1].encode(), password=None)
    assert signing.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode() == files["proxy/billing-public.pem"][1]
    # The non-root containers read their code and public files; secrets are private to their reader.
    for path in ("proxy/config.yaml", "proxy/billing-public.pem", "proxy/ciris_proxy/server.py", "billing/billing/app.py"):
        assert (files[path][0].uid, files[path][0].mode) == (0, 0o644), path
    assert (files["billing/jwt.pem"][0].uid, files["billing/jwt.pem"][0].mode) == (SERVICE_UID, 0o600)
    for path in ("proxy/env", "billing/env"):
        assert (files[path][0].uid, files[path][0].mode) == (0, 0o600), path
    compose = files["compose.yaml"][1]
    assert "./proxy/config.yaml:/etc/ciris-proxy/config.yaml:ro" in compose and "ciris-proxy:local" in compose


def test_the_plan_shows_the_config_but_no_secret(production):
    artifacts = json.dumps(production.artifacts)
    for canary in SECRETS.values():
        assert canary not in artifacts
    assert production.artifacts["us-east/proxy/env"].startswith("[secret:")
    config = production.artifacts["us-east/proxy/config.yaml"]
    assert "together_ai/" in config and "data_collection: deny" in config and "os.environ/TOGETHER_API_KEY" in config


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
