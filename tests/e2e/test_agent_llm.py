"""The released CIRIS agent's own LLM service (`ciris-agent` from PyPI; tests/agent_venv.py builds
its venv, tests/proxy/agent_llm_driver.py builds the service as the agent's initializer does)
against `make local`, through the regions' edges under the agent's own proxy names (ADR 19): one
interaction of a JSON-mode call at max_tokens 8192 and a TOOLS-mode (instructor) call, each asked
again once by the agent's instructor (the fake upstream's first answer is outside the schema), as the mobile
app (a Google ID token from `make id-token`) and as a server agent (an API key); the interaction is
charged once (#24), also when its calls go to both regions' proxies."""

from __future__ import annotations

import time
import uuid

from components import config
from tests.agent_venv import agent_python, drive  # noqa: F401  (agent_python: the fixture)
from tests.conftest import REPO
from tests.e2e.test_agent_billing import agent_env
from tests.e2e.test_stack import id_token
from tests.proxy.test_agent_llm_contract import assert_reasked

DRIVER = REPO / "tests" / "proxy" / "agent_llm_driver.py"
PRICE = 5  # Pulumi.local.yaml leaves services.price_per_interaction_cents at 5
SIGNUP = 15


def proxy_names(stack) -> dict[str, str]:
    """Region -> the agent's proxy name it serves (Pulumi.local.yaml's names, as production's)."""
    local = config.load_stack_file(REPO / "Pulumi.local.yaml")
    return {r.name: r.names.proxy[0] for r in local.regions if r.names.proxy}


def run(stack, agent_python, tmp_path, region: str, credential: str, task: str) -> dict:  # noqa: F811
    names = proxy_names(stack)
    addresses = {r["name"]: r["ipv4"] for r in stack.regions}
    out = drive(agent_python, DRIVER, tmp_path, {"SSL_CERT_FILE": agent_env()["SSL_CERT_FILE"]}, timeout=240,
                url=f"https://{names[region]}/v1", api_key=credential, model="default", task_id=task,
                hosts={name: addresses[r] for r, name in names.items()}, reask=uuid.uuid4().hex[:12])
    for mode in ("JSON", "TOOLS"):
        sent = out[mode]["sent"]
        assert sent and all(s["metadata"] and s["max_tokens"] == 8192 for s in sent), out
        assert out[mode]["decision"]["selected_action"], out
    assert_reasked(out)
    return out


def settled(read, expected: int, timeout: float = 60) -> int:
    """The balance once it reached `expected` (captures follow the answers), and still there 3 s later."""
    deadline = time.time() + timeout
    while (got := read()) != expected and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    return read()


def test_the_agents_llm_calls_as_the_mobile_app_charged_once_across_both_regions(stack, agent_python, tmp_path):  # noqa: F811
    token = id_token("google", f"e2e-llm-{uuid.uuid4().hex[:8]}")
    task = f"task-{uuid.uuid4().hex}"
    names = proxy_names(stack)
    assert set(names) == {r["name"] for r in stack.regions}, names
    for region in names:  # the same interaction through us-east's proxy, then eu-west's
        run(stack, agent_python, tmp_path, region, token, task)
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    with stack.edge(stack.regions[0], "billing") as billing:
        user = billing.post("/v1/auth/token", json={"id_token": token}).json()["user_id"]
        balance = settled(lambda: billing.get(f"/v1/credits/{user}", headers=admin).json()["balance"], SIGNUP - PRICE)
    assert balance == SIGNUP - PRICE, f"8 calls of one interaction in two regions: charged {SIGNUP - balance}"


def test_the_agents_llm_calls_as_a_server_agent_with_an_api_key(stack, agent_python, tmp_path):  # noqa: F811
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    region = stack.regions[-1]
    with stack.edge(region, "billing") as billing:
        r = billing.post("/v1/admin/api-keys", json={"name": f"e2e-llm-{uuid.uuid4().hex[:8]}"}, headers=admin)
        assert r.status_code == 201, r.text
        key = r.json()
        run(stack, agent_python, tmp_path, region["name"], key["api_key"], f"task-{uuid.uuid4().hex}")

        def remaining() -> int:  # the key's own account, as the agent's billing client reads it
            r = billing.post("/v1/billing/credits/check", headers={"X-API-Key": key["api_key"]},
                             json={"oauth_provider": "oauth:api_key", "external_id": key["id"]})
            assert r.status_code == 200, r.text
            return r.json()["credits_remaining"]
        assert settled(remaining, SIGNUP - PRICE) == SIGNUP - PRICE
