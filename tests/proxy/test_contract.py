"""The request contract against a real proxy: only the OpenAI parameters we name reach a provider;
anything else is a 400 naming the field (never its value) before any hold or upstream call; caps on
what one flat-priced request may ask for; the upstream model, its parameters and keys come only from
our config; a client's bad request cools nothing down for anyone else."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.proxy.conftest import MODEL, balance, chat, holds, new_user, total_requests, user_token

CANARY = "CANARY-value-4b9e"
PRICE = 5
CAPS = {"max_output_tokens": 8192, "max_n": 4, "max_messages": 256, "max_body_bytes": 512 * 1024}  # the defaults


def refused(r: httpx.Response, status: int, param: str | None, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert CANARY not in r.text
    return error


@pytest.mark.parametrize("field, value", [
    ("extra_body", {"provider": {"data_collection": "allow"}, "models": [CANARY]}),
    ("models", [f"anthropic/{CANARY}"]),            # OpenRouter: buy any model with our key
    ("provider", {"order": [CANARY]}),               # OpenRouter routing preferences
    ("route", "fallback"), ("transforms", [CANARY]),
    ("api_base", f"http://{CANARY}.example"), ("base_url", f"http://{CANARY}.example"),
    ("api_key", CANARY), ("api_version", "2024-02-01"),  # LiteLLM's Azure client, our key to a chosen path
    ("custom_llm_provider", "azure"), ("deployment_id", CANARY), ("model_list", [CANARY]),
    ("fallbacks", [CANARY]), ("litellm_params", {}), ("mock_response", CANARY),
    ("extra_headers", {"x": CANARY}), ("logit_bias", {"1": 1}), ("functions", []), ("input_cost_per_token", 0),
])
def test_a_field_outside_the_contract_is_refused_before_any_hold_or_upstream(client, api, cluster, upstreams, field, value):
    user = new_user(api, 15)
    before = total_requests(upstreams)
    r = chat(client, user_token(user), **{field: value})
    error = refused(r, 400, field, "unknown_parameter")
    assert error["type"] == "invalid_request_error" and field in error["message"]
    assert total_requests(upstreams) == before
    assert holds(cluster, user) == [] and balance(api, user) == 15


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi", "api_base": CANARY}]}, "messages[0].api_base"),
    # An unknown field that shares a known field's name (tool_call_id is a tool message's) is named once.
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": CANARY}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c", "name": {"name": CANARY}}]}, "messages[0].name"),
    # metadata: only the CIRIS agent's keys, bounded; nothing else in it.
    ({"metadata": {"x": CANARY}}, "metadata.x"),
    ({"metadata": {"interaction_id": "i", "provider": {"order": [CANARY]}}}, "metadata.provider"),
    ({"metadata": {"interaction_id": "i", "interaction_id2": CANARY}}, "metadata.interaction_id2"),
    ({"metadata": {"retry_count": 1}}, "metadata.interaction_id"),
    ({"metadata": {"interaction_id": f"{CANARY} with spaces"}}, "metadata.interaction_id"),
    ({"metadata": {"interaction_id": "i" * 129}}, "metadata.interaction_id"),
    ({"metadata": {"interaction_id": "i", "retry_count": -1}}, "metadata.retry_count"),
    ({"metadata": {"interaction_id": "i", "retry_count": "1"}}, "metadata.retry_count"),
    ({"metadata": {"interaction_id": "i", "previous_error": CANARY * 20}}, "metadata.previous_error"),
    ({"metadata": {"interaction_id": "i", "original_request_id": f"../{CANARY}/"}}, "metadata.original_request_id"),
    ({"metadata": CANARY}, "metadata"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": CANARY}]}]},
     "messages[0].content[0].cache_control"),
    ({"stream": "yes"}, "stream"),                   # a non-boolean stream once got full answers for free
    ({"stream": 1}, "stream"),
    ({"temperature": CANARY}, "temperature"), ({"temperature": 7}, "temperature"),
    ({"messages": [{"role": CANARY, "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"http://{CANARY}/x.png"}}]}]},
     "messages[0].content[0].image_url.url"),      # never a URL a provider would fetch
    ({"tool_choice": CANARY}, "tool_choice"),
    ({"messages": []}, "messages"),
    ({"model": None}, "model"),
])
def test_a_malformed_value_is_400_naming_the_field(client, api, upstreams, body, param):
    user = new_user(api, 15)
    before = total_requests(upstreams)
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {user_token(user)}"},
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body})
    refused(r, 400, param, r.json()["error"]["code"])
    assert r.json()["error"]["code"] in ("invalid_value", "unknown_parameter", "missing_parameter")
    assert total_requests(upstreams) == before and balance(api, user) == 15


def test_a_body_that_is_not_json_is_400(client, api):
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {user_token(new_user(api))}"},
                    content=b"{" + CANARY.encode())
    refused(r, 400, None, "invalid_request")


@pytest.mark.parametrize("model, headers", [
    (f"openrouter/anthropic/{CANARY}", {}),
    ("together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo", {}),
    ("azure/gpt-4o", {"X-Provider-Key": "sk-own"}),
    (f"openai/../{CANARY}", {"X-Provider-Key": "sk-own"}),
    ("openai/gpt-4o/chat", {"X-Provider-Key": "sk-own"}),
    ("llama-3.3-70b@openrouter", {}),                # our internal group names are not models
])
def test_only_our_models_can_be_asked_for(client, api, upstreams, model, headers):
    user = new_user(api, 15)
    before = total_requests(upstreams)
    refused(chat(client, user_token(user), model=model, headers=headers), 404, "model", "model_not_found")
    assert total_requests(upstreams) == before and balance(api, user) == 15


def test_the_provider_gets_our_model_and_only_contract_parameters(client, api, upstreams):
    accepted = {"temperature": 0.5, "top_p": 0.9, "max_tokens": 100, "stop": ["\n\n"], "n": 2, "presence_penalty": 0.1,
                "frequency_penalty": 0.2, "seed": 7, "response_format": {"type": "json_object"}, "user": CANARY,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                "tool_choice": "auto"}
    r = chat(client, user_token(new_user(api, 15)), **accepted)
    assert r.status_code == 200, r.text
    sent = upstreams["together"].stats()["last_body"]
    assert sent["model"] == "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # from our config, whatever the client said
    assert {k: sent[k] for k in ("temperature", "max_tokens", "n", "seed", "tool_choice")} == \
        {k: accepted[k] for k in ("temperature", "max_tokens", "n", "seed", "tool_choice")}
    assert CANARY not in json.dumps(sent)  # `user` is accepted, never forwarded
    allowed = set(accepted) | {"model", "messages", "stream", "stream_options", "max_completion_tokens"}
    assert set(sent) <= allowed, set(sent) - allowed


def test_openrouter_always_gets_our_zero_data_retention_preferences(client, api, upstreams):
    for name in ("together", "groq"):
        upstreams[name].control(fail=True)
    r = chat(client, user_token(new_user(api, 15)))
    assert r.status_code == 200 and r.json()["model"] == MODEL, r.text
    assert upstreams["openrouter"].stats()["last_body"]["provider"] == {"data_collection": "deny", "zdr": True}


def test_models_lists_the_caps_and_the_price(client, api):
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {user_token(new_user(api))}"})
    models = {m["id"]: m for m in r.json()["data"]}
    assert models[MODEL]["limits"] == CAPS and models[MODEL]["price_cents"] == PRICE
    assert models["llama-4-maverick"]["limits"]["max_output_tokens"] == 16384 and models["llama-4-maverick"]["vision"]
    assert not models[MODEL]["vision"] and models[MODEL]["images_go_to"] == "llama-4-maverick"
    for alias in ("default", "fast"):  # what the CIRIS agent and its mobile app ask for
        assert models[alias]["alias_of"] == "llama-4-maverick" and models[alias]["limits"]["max_output_tokens"] == 16384
    assert models[MODEL]["providers"] == ["together_ai", "groq", "openrouter"]
    assert models["openai/*"]["requires"] == "X-Provider-Key"
    assert client.get("/v1/models").status_code == 401


@pytest.mark.parametrize("extra, param, code", [
    ({"max_tokens": 10, "max_completion_tokens": 10}, "max_completion_tokens", "invalid_value"),
    ({"n": 128}, "n", "above_limit"),
    ({"messages": [{"role": "user", "content": "hi"}] * (CAPS["max_messages"] + 1)}, "messages", "too_many_messages"),
])
def test_caps_are_400_before_any_hold(client, api, cluster, upstreams, extra, param, code):
    user = new_user(api, 15)
    before = total_requests(upstreams)
    refused(chat(client, user_token(user), **extra), 400, param, code)
    assert total_requests(upstreams) == before and holds(cluster, user) == []


def test_a_request_without_max_tokens_is_capped_upstream(client, api, upstreams):
    assert chat(client, user_token(new_user(api, 15))).status_code == 200
    assert upstreams["together"].stats()["last_body"]["max_tokens"] == CAPS["max_output_tokens"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_above_the_limit_is_413_and_never_read_whole(client, api, upstreams, chunked):
    user = new_user(api, 15)
    before = total_requests(upstreams)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * CAPS["max_body_bytes"]}]}).encode()
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    r = client.post("/v1/chat/completions", content=content,
                    headers={"Authorization": f"Bearer {user_token(user)}", "Content-Type": "application/json"})
    refused(r, 413, None, "request_too_large")
    assert total_requests(upstreams) == before and balance(api, user) == 15


def test_a_body_just_within_the_limit_is_served(client, api):
    head = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": ""}]}).encode()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (CAPS["max_body_bytes"] - len(head))}]})
    assert len(body) == CAPS["max_body_bytes"]
    r = client.post("/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {user_token(new_user(api, 15))}"})
    assert r.status_code == 200, r.text


def test_a_clients_bad_request_cools_nothing_down_for_anyone_else(client, api, cluster, upstreams):
    """A request the provider refuses as invalid (HTTP 400) is answered at once: no fallback to the
    next provider, nothing charged, and however often it is sent, other users still get Together."""
    together = upstreams["together"]
    together.control(fail=True, fail_status=400, fail_message="invalid tool schema", fail_when="POISON")
    attacker, groq_before = new_user(api, 50), upstreams["groq"].requests
    for _ in range(8):
        r = chat(client, user_token(attacker), "POISON")
        refused(r, 400, None, "upstream_rejected")
    assert upstreams["groq"].requests == groq_before
    assert holds(cluster, attacker) == [("released", PRICE)] * 8 and balance(api, attacker) == 50
    r = chat(client, user_token(new_user(api, 15)))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello from together"


def test_context_length_is_openais_error_and_not_a_fallback(client, api, cluster, upstreams):
    upstreams["together"].control(fail=True, fail_status=400,
                                  fail_message="This model's maximum context length is 8192 tokens")
    user, groq_before = new_user(api, 15), upstreams["groq"].requests
    refused(chat(client, user_token(user), CANARY), 400, "messages", "context_length_exceeded")
    assert upstreams["groq"].requests == groq_before
    assert holds(cluster, user) == [("released", PRICE)]


def test_every_provider_rate_limited_is_429_with_retry_after(second_proxy, billing, api, cluster, upstreams):
    """Rate limits are the provider's: they fall through to the next provider and cool the deployment
    down (so this runs on its own proxy); when all are limited the client is told when to retry."""
    p = second_proxy(billing.url)
    upstreams["together"].control(fail=True, fail_status=429, retry_after=7)
    user = new_user(api, 50)
    with httpx.Client(base_url=p.url, timeout=30) as c:
        r = chat(c, user_token(user))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello from groq"
        for name in ("groq", "openrouter"):
            upstreams[name].control(fail=True, fail_status=429, retry_after=7)
        r = chat(c, user_token(user), CANARY)
    refused(r, 429, None, "rate_limit_exceeded")
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert holds(cluster, user) == [("captured", PRICE), ("released", PRICE)]


def agent_metadata(**retry) -> dict:
    """The body field the CIRIS agent adds for a CIRIS proxy (`LLMRequestMetadata.model_dump()`)."""
    return {"interaction_id": "4f1c" * 8, "retry_count": None, "previous_error": None,
            "original_request_id": "0a1b2c3d4e5f", **retry}


@pytest.mark.parametrize("metadata", [
    agent_metadata(),
    agent_metadata(retry_count=2, previous_error="TIMEOUT"),
    {"interaction_id": "no-retry-fields"},
])
def test_the_agents_metadata_is_accepted_and_never_reaches_a_provider(client, api, upstreams, metadata):
    metadata = {**metadata, "previous_error": CANARY} if "previous_error" in metadata else metadata
    r = chat(client, user_token(new_user(api, 15)), metadata=metadata)
    assert r.status_code == 200, r.text
    sent = upstreams["together"].stats()["last_body"]
    assert "metadata" not in sent and CANARY not in json.dumps(sent)
    assert metadata["interaction_id"] not in json.dumps(sent)


def test_instructors_tools_mode_retry_is_accepted(client, api, upstreams):
    """instructor's TOOLS-mode reask: the assistant's tool call, then a tool message with `name`."""
    messages = [
        {"role": "system", "content": "answer with the tool"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "Answer", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "Answer", "content": "Validation Error found: ..."},
    ]
    tools = [{"type": "function", "function": {"name": "Answer", "description": "d", "parameters": {"type": "object"}}}]
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {user_token(new_user(api, 15))}"},
                    json={"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 100,
                          "tool_choice": {"type": "function", "function": {"name": "Answer"}},
                          "metadata": agent_metadata(retry_count=1, previous_error="VALIDATION")})
    assert r.status_code == 200, r.text
    sent = upstreams["together"].stats()["last_body"]
    assert sent["messages"][3]["name"] == "Answer" and "metadata" not in sent
