"""A real proxy process (`python -m ciris_proxy`: our front, the credit gate, LiteLLM's Router) in front of
three local OpenAI-compatible upstreams (Together, Groq, OpenRouter) and two more for
bring-your-own-key OpenAI and Anthropic calls, gated by a real billing process on real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.billing.conftest import (  # noqa: F401  (fixtures shared with the billing suite)
    ADMIN, KEY, PROXY_GENERATION, SERVICE, api, balance, billing, cluster, jwks_file, new_user, stripe_api, token,
)
from components import postgres_config as pgc
from tests.conftest import REPO, wait_until_healthy
from tests.postgres.conftest import free_port

PAYLOAD = REPO / "payloads" / "proxy"
PROVIDER_KEYS = {"TOGETHER_API_KEY": "tg-key", "GROQ_API_KEY": "gq-key", "OPENROUTER_API_KEY": "or-key"}
MODEL = "llama-3.3-70b"
# The interpreter that runs the proxy: this one, or (CIRIS_PROXY_PYTHON) one with only the image's
# requirements installed (payloads/proxy/requirements.txt), to prove the proxy needs nothing more.
PROXY_PYTHON = os.environ.get("CIRIS_PROXY_PYTHON") or sys.executable
# LiteLLM's proxy-server extras are installed here (bench/proxy's baseline) but not in the image: the
# proxy runs with them unimportable, so a test fails as soon as it starts needing one.
NOT_IN_IMAGE = ("fastapi", "starlette", "mcp", "apscheduler", "gunicorn", "granian", "orjson", "backoff", "rq",
                "litellm_enterprise", "litellm_proxy_extras", "websockets", "nacl", "multipart", "python_multipart",
                "rich", "polars", "prisma")
LAUNCH = ("import runpy, sys; sys.modules.update(dict.fromkeys({!r})); "
          "runpy.run_module('ciris_proxy', run_name='__main__', alter_sys=True)").format(NOT_IN_IMAGE)
PROVIDERS = ("together", "groq", "openrouter", "openai", "anthropic")


class Upstream:
    def __init__(self, name: str, log: Path):
        self.name, self.log = name, log
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.proxy.upstream", "--name", name, "--port",
                                      self.url.rsplit(":", 1)[1]], cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                self.stats()
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"upstream {name} did not start:\n{log.read_text()}")
                time.sleep(0.1)

    def control(self, **settings) -> None:
        httpx.post(f"{self.url}/_control", json=settings, timeout=5).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_stats", timeout=5).json()

    @property
    def requests(self) -> int:
        return self.stats()["requests"]


class Proxy:
    def __init__(self, env: dict, log: Path):
        self.env, self.log = env, log
        self.url = f"http://127.0.0.1:{env['PORT']}"
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> None:
        self.proc = subprocess.Popen([PROXY_PYTHON, "-c", LAUNCH, "serve", *args], cwd=PAYLOAD, env=self.env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_until_healthy(self.url, self.proc, self.log, "proxy")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def proxy_env(billing_url: str, upstreams: dict[str, Upstream], journal: Path, generation: str = PROXY_GENERATION) -> dict:
    return {
        **os.environ,
        "BILLING_URL": billing_url,
        # The proxy's scoped, revocable token (ADR 25), as the program mints it.
        "BILLING_SERVICE_TOKEN": token("proxy", "proxy-test", gen=generation, exp=int(time.time()) + 86_400),
        "BILLING_JWKS_FILE": str(jwks_file()),  # billing's published key set, as the program ships it
        **PROVIDER_KEYS,
        **{f"{name.upper()}_API_BASE": f"{u.url}/v1" for name, u in upstreams.items()},
        "CAPTURE_JOURNAL": str(journal),
        "DRAIN_FILE": str(journal.parent / "draining"),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }


@pytest.fixture(scope="session")
def upstreams(tmp_path_factory):
    logs = tmp_path_factory.mktemp("upstreams")
    running = {name: Upstream(name, logs / f"{name}.log") for name in PROVIDERS}
    yield running
    for u in running.values():
        u.proc.terminate()


@pytest.fixture(autouse=True)
def healthy_upstreams(request):
    """Every test starts with all upstreams answering at once."""
    if "upstreams" in request.fixturenames:
        for u in request.getfixturevalue("upstreams").values():
            u.control(reset=True)


@pytest.fixture(scope="session")
def proxy(billing, upstreams, tmp_path_factory):
    work = tmp_path_factory.mktemp("proxy")
    service = Proxy(proxy_env(billing.url, upstreams, work / "captures.jsonl"), work / "proxy.log")
    service.start()
    yield service
    service.stop()


@pytest.fixture
def second_proxy(upstreams, tmp_path):
    """Another proxy process (its own cooldowns and journal); the test says which billing it talks to."""
    started: list[Proxy] = []

    def start(billing_url: str, journal_text: str = "", generation: str = PROXY_GENERATION) -> Proxy:
        journal = tmp_path / "captures.jsonl"
        journal.write_text(journal_text)
        p = Proxy(proxy_env(billing_url, upstreams, journal, generation), tmp_path / "proxy.log")
        started.append(p)
        p.start()
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def client(proxy):
    with httpx.Client(base_url=proxy.url, timeout=60) as c:
        yield c


def user_token(user: str, **claims) -> str:
    return token("user", user, **claims)


def chat(client: httpx.Client, user_tok: str | None, content: str = "hi", model: str = MODEL, **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {user_tok}"} if user_tok else {}
    headers.update(extra.pop("headers", {}))
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def total_requests(upstreams: dict[str, Upstream]) -> int:
    return sum(u.requests for u in upstreams.values())


def settled(api: httpx.Client, user: str, expected: int, timeout: float = 10) -> int:
    """The balance once captures (which run after the response) have landed, or the last seen."""
    deadline = time.time() + timeout
    while True:
        seen = balance(api, user)
        if seen == expected or time.time() > deadline:
            return seen
        time.sleep(0.05)


def holds(cluster, user: str, timeout: float = 10) -> list[tuple[str, int]]:
    """The user's holds in billing's database once none is still active (captures and releases run
    after the response): (status, captured or held amount), oldest first."""
    deadline = time.time() + timeout
    with cluster.connect(dbname=pgc.DATABASE) as conn:
        while True:
            rows = conn.execute("SELECT status, coalesce(captured, amount) FROM holds WHERE user_id = %s ORDER BY created_at",
                                (user,)).fetchall()
            if all(status != "active" for status, _ in rows) or time.time() > deadline:
                return [(status, int(amount)) for status, amount in rows]
            time.sleep(0.05)
