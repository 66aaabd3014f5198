"""The released CIRIS agent's own LLM service (`ciris-agent` from PyPI, in its venv:
tests/agent_venv.py), built as its initializer builds it for a CIRIS proxy URL, against the real
proxy, billing and PostgreSQL: a JSON-mode call at max_tokens 8192 and a TOOLS-mode (instructor)
call, each answered outside the schema once so the agent's instructor asks again (its TOOLS-mode
reask names the tool on its tool message), once as the mobile app (a Google ID token) and once as a
server agent (a billing API key)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from tests.agent_venv import agent_python, drive  # noqa: F401  (agent_python: fixture)
from tests.billing.conftest import SERVICE, oidc  # noqa: F401  (oidc: fixture)
from tests.billing.test_api_keys import mint
from tests.proxy.conftest import balance, holds

DRIVER = Path(__file__).with_name("agent_llm_driver.py")
HOST = "llm.ciris-services.test"  # the agent attaches its metadata only for a `ciris-services` host
SIGNUP = 15
PRICE = 5  # the proxy's default price per interaction


def charged(api, cluster, user: str) -> int:
    """What the user paid, once no hold is still active (captures run after each response)."""
    holds(cluster, user)
    return SIGNUP - balance(api, user)


def run_agent(agent_python: str, proxy, tmp_path: Path, credential: str) -> tuple[dict, str]:
    task = f"task-{uuid.uuid4().hex}"
    url = proxy.url.replace("127.0.0.1", HOST) + "/v1"
    out = drive(agent_python, DRIVER, tmp_path, timeout=180, url=url, api_key=credential, model="default",
                task_id=task, hosts={HOST: "127.0.0.1"}, reask=uuid.uuid4().hex[:12])
    return out, hashlib.sha256(task.encode()).hexdigest()[:32]


def assert_answered(out: dict, interaction: str) -> None:
    for mode in ("JSON", "TOOLS"):
        assert out[mode]["decision"]["selected_action"] in ("speak", "ponder", "defer"), out
        sent = out[mode]["sent"]
        assert sent and all(s["metadata"]["interaction_id"] == interaction and s["max_tokens"] == 8192
                            and s["auth_scheme"] == "Bearer" for s in sent), sent
    assert out["JSON"]["sent"][0]["response_format"] == {"type": "json_object"}
    assert out["TOOLS"]["sent"][0]["tool_choice"]["type"] == "function"
    assert_reasked(out)


def assert_reasked(out: dict) -> None:
    """Each mode's first answer was outside the schema (the driver's reask tag): the agent asked again
    once, in TOOLS mode with the tool's name on its tool message (issue #24)."""
    assert [len(out[mode]["sent"]) for mode in ("JSON", "TOOLS")] == [2, 2], out
    assert out["TOOLS"]["sent"][1]["tool_names"] and all(out["TOOLS"]["sent"][1]["tool_names"]), out


def test_mobile_mode_with_a_google_id_token(agent_python, proxy, api, cluster, oidc, tmp_path):  # noqa: F811
    token = oidc.id_token("google", f"sub-{uuid.uuid4().hex}")
    out, interaction = run_agent(agent_python, proxy, tmp_path, token)
    assert_answered(out, interaction)
    user = api.post("/v1/auth/resolve", json={"id_token": token}, headers=SERVICE).json()["user_id"]
    # Both calls (JSON and TOOLS mode) carry the task's interaction id: one charge (#24 item 2).
    assert charged(api, cluster, user) == PRICE


def test_server_mode_with_an_api_key(agent_python, proxy, api, cluster, tmp_path):  # noqa: F811
    key = mint(api, "agent llm contract")["api_key"]
    out, interaction = run_agent(agent_python, proxy, tmp_path, key)
    assert_answered(out, interaction)
    account = api.post("/v1/auth/resolve", json={"api_key": key}, headers=SERVICE).json()["user_id"]
    # As above: one charge for the interaction; the key's own account pays.
    assert charged(api, cluster, account) == PRICE
