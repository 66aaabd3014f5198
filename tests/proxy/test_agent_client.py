"""The CIRIS agent's way of calling an LLM, through a real proxy: the `openai` SDK wrapped by
`instructor` (JSON mode by default, TOOLS mode on request), `max_tokens` 8192, the interaction
metadata in the body (`extra_body`), model `default`, instructor's own retry on a reply that does
not validate. The upstreams answer a forced tool and a JSON format as a model would."""

from __future__ import annotations

import json

import instructor
import openai
import pytest
from pydantic import field_validator

from tests.proxy.agent_shapes import Decision
from tests.proxy.conftest import holds, new_user, user_token

INTERACTION = "9e107d9d372bb6826bd81d3542a419d6"  # sha256(task_id)[:32], as the agent makes it


def metadata(retry_count: int | None = None, previous_error: str | None = None) -> dict:
    return {"extra_body": {"metadata": {"interaction_id": INTERACTION, "retry_count": retry_count,
                                        "previous_error": previous_error, "original_request_id": "5d41402abc4b"}}}


@pytest.fixture
def agent_client(proxy, api):
    user = new_user(api, 50)
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=user_token(user), max_retries=0, timeout=30)
    yield user, client
    client.close()


def test_json_mode_at_8192_tokens(agent_client, cluster, upstreams):
    user, client = agent_client
    decision, completion = instructor.from_openai(client, mode=instructor.Mode.JSON).chat.completions.create_with_completion(
        model="default", response_model=Decision, max_retries=2, temperature=0, max_tokens=8192,
        messages=[{"role": "system", "content": "You decide."}, {"role": "user", "content": "What now?"}], **metadata())
    assert decision.selected_action == "speak" and completion.model == "llama-4-maverick"
    sent = upstreams["together"].stats()["last_body"]
    assert sent["response_format"] == {"type": "json_object"} and sent["max_tokens"] == 8192
    assert "metadata" not in sent and INTERACTION not in json.dumps(sent)
    assert holds(cluster, user) == [("captured", 5)]


def test_tools_mode_with_instructors_retry(agent_client, cluster, upstreams):
    """The first reply does not validate: instructor asks again with its reask messages (the tool
    call, and a tool message carrying `name`), and the second reply is taken."""
    user, client = agent_client
    seen: list[str] = []

    class Checked(Decision):
        @field_validator("rationale")
        @classmethod
        def not_the_first(cls, value: str) -> str:
            seen.append(value)
            if len(seen) == 1:
                raise ValueError("try again")
            return value

    before = upstreams["together"].requests
    decision = instructor.from_openai(client, mode=instructor.Mode.TOOLS).chat.completions.create(
        model="default", response_model=Checked, max_retries=2, temperature=0, max_tokens=8192,
        messages=[{"role": "user", "content": "What now?"}], **metadata(retry_count=1, previous_error="TIMEOUT"))
    assert decision.selected_action == "speak" and len(seen) == 2
    assert upstreams["together"].requests == before + 2
    sent = upstreams["together"].stats()["last_body"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "Checked"}}
    reask = [m for m in sent["messages"] if m["role"] == "tool"]
    assert reask and reask[0]["name"] == "Checked", sent["messages"]
    assert "metadata" not in sent
    assert holds(cluster, user) == [("captured", 5)]  # both calls of the agent's interaction: one charge (issue #24)


def test_json_schema_response_format(agent_client, upstreams):
    _, client = agent_client
    r = client.chat.completions.create(
        model="fast", max_tokens=8192, messages=[{"role": "user", "content": "What now?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "Decision", "schema": Decision.model_json_schema()}})
    Decision.model_validate_json(r.choices[0].message.content)
