"""`make local`'s fake upstream (payloads/fake-llm) answers structured clients as a model would: the
`openai` SDK with `instructor` in JSON and TOOLS mode, a JSON schema format, streamed JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import instructor
import openai
import pytest

from tests.conftest import REPO, wait_until_healthy
from tests.postgres.conftest import free_port
from tests.proxy.test_agent_client import Decision


@pytest.fixture(scope="module")
def fake_llm(tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("fake-llm") / "fake-llm.log"
    proc = subprocess.Popen([sys.executable, str(REPO / "payloads" / "fake-llm" / "fake_llm.py")],
                            env={"PORT": str(port)}, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, proc, log, "fake-llm")
    with openai.OpenAI(base_url=f"{url}/v1", api_key="fake", max_retries=0, timeout=10) as client:
        yield client
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("mode", [instructor.Mode.JSON, instructor.Mode.TOOLS, instructor.Mode.MD_JSON])
def test_instructor_gets_a_valid_instance(fake_llm, mode):
    decision = instructor.from_openai(fake_llm, mode=mode).chat.completions.create(
        model="fake", response_model=Decision, max_retries=0, max_tokens=8192,
        messages=[{"role": "user", "content": "What now?"}])
    assert decision.selected_action == "speak" and decision.steps[0].weight >= 1


def test_a_json_schema_format_is_answered_in_it_streamed_or_not(fake_llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "Decision", "schema": Decision.model_json_schema()}}
    messages = [{"role": "user", "content": "What now?"}]
    r = fake_llm.chat.completions.create(model="fake", messages=messages, response_format=fmt)
    Decision.model_validate_json(r.choices[0].message.content)
    chunks = fake_llm.chat.completions.create(model="fake", messages=messages, response_format=fmt, stream=True)
    Decision.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))


def test_json_object_without_a_schema_is_an_object_and_plain_text_stays_text(fake_llm):
    messages = [{"role": "user", "content": "hi"}]
    r = fake_llm.chat.completions.create(model="fake", messages=messages, response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content) == {}
    r = fake_llm.chat.completions.create(model="fake", messages=messages)
    assert r.choices[0].message.content.startswith("Hello from the local fake upstream")


@pytest.mark.parametrize("mode", [instructor.Mode.JSON, instructor.Mode.TOOLS])
def test_a_reask_tag_is_answered_outside_the_schema_once_so_instructor_asks_again(fake_llm, mode):
    sent = []
    fake_llm._client.event_hooks["request"] = [lambda request: sent.append(json.loads(request.content))]
    try:
        decision = instructor.from_openai(fake_llm, mode=mode).chat.completions.create(
            model="fake", response_model=Decision, max_retries=2,
            messages=[{"role": "user", "content": f"What now? [fake-llm:reask:{mode.value}-1]"}])
    finally:
        fake_llm._client.event_hooks["request"] = []
    assert decision.selected_action == "speak"
    assert len(sent) == 2, "one answer outside the schema, then instructor's reask"
    if mode is instructor.Mode.TOOLS:  # instructor's TOOLS reask names the tool on its tool message
        assert any(m.get("role") == "tool" and m.get("name") for m in sent[1]["messages"]), sent[1]["messages"]
