"""Zero data retention: no prompt or response text, and no caller's provider key, in any log line,
error body or stored row; bring-your-own-key calls go straight to the provider and cost nothing."""

from __future__ import annotations

import pytest

from tests.proxy.conftest import MODEL, balance, chat, holds, new_user, user_token

CANARY = "CANARY-prompt-7f3a9c"
BYOK_KEY = "sk-byok-CANARY-5e1d"
REPLY = "hello from"  # every fake upstream's answer starts so


def stored_text(cluster) -> str:
    """Every row of every table in billing's database, as text."""
    with cluster.connect(dbname="cirisbilling") as conn:
        tables = [t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(str(row) for t in tables for row in conn.execute(f'SELECT * FROM "{t}"'))


def test_canary_prompt_reaches_no_log_row_or_error(client, api, cluster, proxy, billing, upstreams):
    user = new_user(api, 50)
    prompt = f"please repeat {CANARY}"
    assert chat(client, user_token(user), prompt).status_code == 200
    # The agent's metadata is ours (billing), never logged, stored as text or sent to a provider.
    metadata = {"interaction_id": "CANARY-interaction-7f3a9c", "retry_count": 1, "previous_error": CANARY}
    assert chat(client, user_token(user), prompt, metadata=metadata).status_code == 200
    assert "metadata" not in upstreams["together"].stats()["last_body"]
    bad = chat(client, user_token(user), prompt, metadata={**metadata, "retry_count": CANARY})
    assert bad.status_code == 400 and CANARY not in bad.text
    with client.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {user_token(user)}"},
                       json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": prompt}]}) as r:
        assert r.status_code == 200 and CANARY not in r.read().decode()
    # Providers' error bodies that quote the prompt back (every fake upstream's do): a client error...
    upstreams["together"].control(fail=True, fail_status=400)
    refused = chat(client, user_token(user), prompt)
    assert refused.status_code == 400 and CANARY not in refused.text
    # ... and every provider failing.
    for name in ("together", "groq", "openrouter"):
        upstreams[name].control(fail=True, fail_status=500)
    failed = chat(client, user_token(user), prompt)
    assert failed.status_code == 502 and CANARY not in failed.text
    sent = upstreams["openrouter"].stats()["last_body"]
    assert sent["messages"][0]["content"] == prompt  # it did travel upstream...
    assert sent["provider"] == {"data_collection": "deny", "zdr": True}  # ...to OpenRouter hosts that keep nothing
    holds(cluster, user)  # every hold settled, so every log line about them is written
    for log in (proxy.log, billing.log):
        text = log.read_text()
        assert CANARY not in text and REPLY not in text and "CANARY-interaction" not in text, log
    assert CANARY not in stored_text(cluster) and REPLY not in stored_text(cluster)
    assert CANARY not in client.get("/metrics").text


@pytest.mark.parametrize("provider, model, auth", [
    ("openai", "openai/gpt-4o-mini", f"Bearer {BYOK_KEY}"),
    ("anthropic", "anthropic/claude-sonnet-4-5", BYOK_KEY),
])
def test_own_key_goes_direct_and_costs_nothing(client, api, cluster, proxy, upstreams, provider, model, auth):
    user = new_user(api, 15)
    r = chat(client, user_token(user), model=model, headers={"X-Provider-Key": BYOK_KEY})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == f"hello from {provider}"
    assert upstreams[provider].stats()["last_auth"] == auth
    assert holds(cluster, user) == [] and balance(api, user) == 15
    assert BYOK_KEY not in proxy.log.read_text()


def test_own_key_rules_are_enforced(client, api, upstreams):
    user = new_user(api, 15)
    before = upstreams["openai"].requests
    no_key = chat(client, user_token(user), model="openai/gpt-4o-mini")
    assert no_key.status_code == 400 and "X-Provider-Key" in no_key.text
    assert upstreams["openai"].requests == before  # never with a key of ours
    paid_with_key = chat(client, user_token(user), headers={"X-Provider-Key": BYOK_KEY})
    assert paid_with_key.status_code == 400 and BYOK_KEY not in paid_with_key.text
    no_token = chat(client, None, model="openai/gpt-4o-mini", headers={"X-Provider-Key": BYOK_KEY})
    assert no_token.status_code == 401
    assert balance(api, user) == 15


def test_own_key_never_falls_back_to_another_provider(client, api, cluster, proxy, upstreams):
    """The caller's key goes to its provider only: when that provider fails, the caller is told so,
    and neither its key nor its request reaches a paid provider."""
    upstreams["openai"].control(fail=True)
    user, paid = new_user(api, 15), {n: upstreams[n].requests for n in ("together", "groq", "openrouter")}
    r = chat(client, user_token(user), model="openai/gpt-4o-mini", headers={"X-Provider-Key": BYOK_KEY})
    assert r.status_code == 502 and BYOK_KEY not in r.text, r.text
    assert {n: upstreams[n].requests for n in paid} == paid
    assert upstreams["openai"].stats()["last_auth"] == f"Bearer {BYOK_KEY}"
    assert holds(cluster, user) == [] and balance(api, user) == 15
    assert BYOK_KEY not in proxy.log.read_text()


def test_a_key_the_provider_refuses_is_401_naming_the_header(client, api, upstreams):
    upstreams["openai"].control(fail=True, fail_status=401)
    r = chat(client, user_token(new_user(api, 15)), model="openai/gpt-4o-mini", headers={"X-Provider-Key": BYOK_KEY})
    assert r.status_code == 401 and r.json()["error"]["code"] == "provider_key_refused" and "X-Provider-Key" in r.text
