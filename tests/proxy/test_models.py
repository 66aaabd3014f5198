"""Models the CIRIS agent asks for: aliases (`default`, `fast`), per-model output caps (a larger
max_tokens is lowered to the cap, ADR 18), and images routed to the model that can see."""

from __future__ import annotations

import sys

import httpx
import pytest

from tests.proxy.conftest import MODEL, PAYLOAD, Proxy, chat, holds, new_user, proxy_env, total_requests, user_token

sys.path.insert(0, str(PAYLOAD))
from ciris_proxy import litellm_config  # noqa: E402  (the payload's pure renderer, as the program uses it)

MAVERICK_AT_TOGETHER = "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8"
IMAGE = [{"type": "text", "text": "what is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]


@pytest.mark.parametrize("alias", ["default", "fast"])
def test_an_alias_is_served_by_its_model(client, api, cluster, upstreams, alias):
    user = new_user(api, 15)
    r = chat(client, user_token(user), model=alias)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "llama-4-maverick"  # the model that answered
    assert upstreams["together"].stats()["last_body"]["model"] == MAVERICK_AT_TOGETHER
    assert holds(cluster, user) == [("captured", 5)]


@pytest.mark.parametrize("model, asked, sent", [
    (MODEL, {"max_tokens": 8192}, {"max_tokens": 8192}),                      # the agent's decision steps
    (MODEL, {"max_tokens": 1_000_000_000}, {"max_tokens": 8192}),             # lowered to the cap, not refused
    (MODEL, {"max_completion_tokens": 9000}, {"max_completion_tokens": 8192}),
    (MODEL, {}, {"max_tokens": 8192}),                                         # none asked: the cap
    ("default", {"max_tokens": 50_000}, {"max_tokens": 16384}),               # the model's own cap
    ("llama-4-maverick", {"max_tokens": 100}, {"max_tokens": 100}),
])
def test_output_is_capped_per_model(client, api, upstreams, model, asked, sent):
    r = chat(client, user_token(new_user(api, 15)), model=model, **asked)
    assert r.status_code == 200, r.text
    body = upstreams["together"].stats()["last_body"]
    assert {k: body.get(k) for k in sent} == sent


@pytest.mark.parametrize("model", [MODEL, "llama-3.1-8b", "default"])
def test_images_go_to_the_model_that_can_see(client, api, cluster, upstreams, model):
    user = new_user(api, 15)
    r = chat(client, user_token(user), IMAGE, model=model, max_tokens=8192)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "llama-4-maverick"
    sent = upstreams["together"].stats()["last_body"]
    assert sent["model"] == MAVERICK_AT_TOGETHER and sent["messages"][0]["content"][1]["type"] == "image_url"
    assert sent["max_tokens"] == 8192
    assert holds(cluster, user) == [("captured", 5)]


@pytest.fixture(scope="module")
def configured_proxy(billing, upstreams, tmp_path_factory):
    """A proxy whose config (PROXY_CONFIG, as the Pulumi program ships it) has its own alias and
    cap, and no model for images."""
    work = tmp_path_factory.mktemp("configured")
    config = work / "config.yaml"
    config.write_text(litellm_config.render(aliases={"small": "llama-3.1-8b"}, vision_model=None,
                                            output_caps={"llama-3.1-8b": 1000}))
    p = Proxy({**proxy_env(billing.url, upstreams, work / "captures.jsonl"), "PROXY_CONFIG": str(config),
               "MAX_OUTPUT_TOKENS": "2000"}, work / "proxy.log")
    p.start()
    yield p
    p.stop()


def test_aliases_caps_and_the_vision_route_come_from_config(configured_proxy, api, cluster, upstreams):
    user = new_user(api, 15)
    with httpx.Client(base_url=configured_proxy.url, timeout=30) as c:
        models = {m["id"]: m for m in c.get("/v1/models", headers={"Authorization": f"Bearer {user_token(user)}"}).json()["data"]}
        assert models["small"]["alias_of"] == "llama-3.1-8b" and "default" not in models
        assert models["llama-3.1-8b"]["limits"]["max_output_tokens"] == 1000
        assert models[MODEL]["limits"]["max_output_tokens"] == 8192  # its default cap, kept
        assert models["openai/*"]["limits"]["max_output_tokens"] == 2000  # a model without one: MAX_OUTPUT_TOKENS
        assert "images_go_to" not in models[MODEL]
        assert chat(c, user_token(user), model="small", max_tokens=8192).status_code == 200
        assert upstreams["together"].stats()["last_body"]["max_tokens"] == 1000
        assert chat(c, user_token(user), model="default").status_code == 404
        before = total_requests(upstreams)
        r = chat(c, user_token(user), IMAGE)
    assert r.status_code == 400 and r.json()["error"]["code"] == "images_not_supported", r.text
    assert total_requests(upstreams) == before
    assert holds(cluster, user) == [("captured", 5)]


@pytest.mark.parametrize("kwargs, message", [
    ({"aliases": {"default": "gpt-9"}}, "alias names no model: gpt-9"),
    ({"vision_model": "llama-3.3-70b"}, "does not take images"),
    ({"output_caps": {"nope": 1}}, "output cap names no model: nope"),
])
def test_a_config_naming_no_model_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        litellm_config.render(**kwargs)
