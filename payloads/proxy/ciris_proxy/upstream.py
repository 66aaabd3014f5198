"""The upstream calls, through LiteLLM as a library (`litellm.Router`): provider adapters, streaming,
cooldowns and usage are LiteLLM's; which provider is tried next is ours.

Each (exposed model, provider) pair is one Router group with one deployment, and `complete` walks a
model's providers in the configured order (Together, Groq, OpenRouter). Only provider-side failures
(5xx, timeouts, connection errors, rate limits, our key refused) move on to the next provider and
count toward a deployment's cooldown; a client's bad request (any other 4xx, context length) is
answered at once and cools nothing down for anyone else (LiteLLM cools down only on 401/402/404/
408/429/5xx, issue #13). Bring-your-own-key calls bypass the Router: one call, to that provider's
configured base URL, with the caller's key, no fallback.

Nothing from a provider's error body reaches a client or a log: errors are re-made from the status.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiohttp
import httpcore
import litellm
from litellm.litellm_core_utils.exception_mapping_utils import _get_response_headers
from litellm.types.router import RouterRateLimitError, RouterRateLimitErrorBasic

from ciris_proxy import metrics
from ciris_proxy.errors import ApiError
from ciris_proxy.litellm_config import BYOK_PROVIDERS

log = logging.getLogger("ciris_proxy")
BYOK_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")  # one path segment: no other route, no other host
PROVIDER_SIDE = frozenset({401, 402, 403, 404, 408, 429})  # and every 5xx
COOLING = (RouterRateLimitError, RouterRateLimitErrorBasic)
# The contract takes function tools only; LiteLLM's MCP tool handling would import its proxy server.
NO_MCP = {"_skip_mcp_handler": True}


def quiet_litellm() -> None:
    """LiteLLM's own loggers print exception strings, which can quote a provider's error body and so
    the prompt (FSD §7.4): they are silenced by level (uvicorn's logging setup re-enables disabled
    loggers, and Python's last-resort handler would print their warnings); our log lines carry
    statuses and types only."""
    litellm.suppress_debug_info = True
    litellm.turn_off_message_logging = True
    litellm.drop_params = True
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "httpcore"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [logging.NullHandler()]
        logger.propagate = False
        logger.setLevel(logging.CRITICAL + 1)


class Delivery:
    """Whether the current provider attempt's request — the whole prompt — has been handed to the
    provider's connection: from then on the provider has the prompt, and a client that leaves pays
    for it (ADR 8, "when a request is charged"). Set by `delivering()` for one upstream call."""
    sent = False


DELIVERY: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar("ciris_delivery", default=None)


def _marks_sent(write):
    """Wrap a client library's "write the request body" step to mark the current Delivery once it
    returns. The writer may run in a task of its own (aiohttp's): it copies our context, so it sees
    the same Delivery object."""
    @functools.wraps(write)
    async def wrapper(*args, **kwargs):
        result = await write(*args, **kwargs)
        delivery = DELIVERY.get()
        if delivery is not None:
            delivery.sent = True
        return result
    wrapper.ciris_marks_sent = True
    return wrapper


def observe_delivery() -> None:
    """LiteLLM sends through httpx over aiohttp (its default transport) or over httpcore: both
    libraries' body writers mark the call's Delivery. Idempotent."""
    for cls, name in ((aiohttp.ClientRequest, "write_bytes"), (httpcore.AsyncHTTP11Connection, "_send_request_body"),
                      (httpcore.AsyncHTTP2Connection, "_send_request_body")):
        method = getattr(cls, name, None)
        if method is not None and not getattr(method, "ciris_marks_sent", False):
            setattr(cls, name, _marks_sent(method))


def delivering() -> Delivery:
    """A Delivery for the upstream call about to be made in this task."""
    delivery = Delivery()
    DELIVERY.set(delivery)
    return delivery


@dataclass
class Target:
    """What an exposed model name means: Router groups in order, or a bring-your-own-key provider."""
    name: str
    groups: list[tuple[str, str]] = field(default_factory=list)  # (router group, LiteLLM provider), in order
    byok: str | None = None                                     # "openai" | "anthropic"
    vision: bool = False
    max_output_tokens: int | None = None                        # None: the proxy's MAX_OUTPUT_TOKENS


def _resolve(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str) and value.startswith("os.environ/"):
        return env.get(value.removeprefix("os.environ/"), "").strip()
    return value


class Upstreams:
    def __init__(self, doc: dict, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        observe_delivery()
        rs = doc.get("router_settings", {})
        self.timeout = float(rs.get("timeout", 60))
        self.cooldown = float(rs.get("cooldown_time", 30))
        self.models: dict[str, Target] = {}
        self.byok_bases: dict[str, str] = {}
        deployments = []
        for d in sorted(doc["model_list"], key=lambda d: d["litellm_params"].get("order", 0)):
            params = {k: _resolve(v, env) for k, v in d["litellm_params"].items() if k != "order"}
            provider = params["model"].split("/", 1)[0]
            if provider in BYOK_PROVIDERS:
                self.byok_bases[provider] = params["api_base"]
                continue
            group = d["model_info"]["id"]  # "<model>@<provider>"
            if not params.get("api_key"):
                log.warning("no key for %s: it is skipped", group)
                continue
            deployments.append({"model_name": group, "litellm_params": params, "model_info": {"id": group}})
            info = d["model_info"]
            target = self.models.setdefault(d["model_name"], Target(
                d["model_name"], vision=bool(info.get("supports_vision")), max_output_tokens=info.get("max_output_tokens")))
            target.groups.append((group, provider))
        # Other names for a model (LiteLLM's model_group_alias), and where a request with images goes.
        self.aliases = {a: m for a, m in rs.get("model_group_alias", {}).items() if m in self.models}
        vision = doc.get("ciris_settings", {}).get("vision_model")
        self.vision = self.models.get(vision) if vision else None
        self.router = litellm.Router(
            model_list=deployments, num_retries=0, timeout=self.timeout, cooldown_time=self.cooldown,
            allowed_fails=int(rs.get("allowed_fails", 3)), routing_strategy="simple-shuffle")

    def target(self, model: str) -> Target:
        model = self.aliases.get(model, model)
        if model in self.models:
            return self.models[model]
        provider, _, model_id = model.partition("/")
        if provider in self.byok_bases and BYOK_MODEL_ID.fullmatch(model_id):
            return Target(model, byok=provider, vision=True)
        raise ApiError(404, "unknown model: GET /v1/models lists the models served here "
                            "(or openai/<model> and anthropic/<model> with X-Provider-Key)",
                       param="model", code="model_not_found")

    async def complete(self, target: Target, params: dict, stream: bool, key: str | None = None):
        """The provider's response (a stream when `stream`), or an ApiError for the client."""
        if target.byok:
            return await self._byok(target, params, stream, key)
        failures: list[tuple[str, BaseException]] = []
        delivery = DELIVERY.get() or Delivery()
        for group, provider in target.groups:
            started = time.monotonic()
            delivery.sent = False  # a provider that failed had the prompt, but did no work we charge for
            try:
                response = await self.router.acompletion(model=group, stream=stream, **params, **NO_MCP)
            except Exception as e:  # noqa: BLE001  (every failure is classified below)
                cooling = isinstance(e, COOLING)
                _count(provider, "cooldown" if cooling else "error", started)
                if not cooling and not _provider_side(e):
                    log.info("%s refused a request: %s (HTTP %s)", provider, type(e).__name__, _status(e))
                    raise _client_error(e) from None
                log.warning("%s failed: %s (HTTP %s); trying the next provider", provider, type(e).__name__, _status(e))
                failures.append((provider, e))
                continue
            _count(provider, "ok", started)
            return response
        raise self._exhausted(target.name, failures)

    async def _byok(self, target: Target, params: dict, stream: bool, key: str | None):
        provider = target.byok
        started = time.monotonic()
        try:
            response = await litellm.acompletion(
                model=target.name, api_key=key, api_base=self.byok_bases[provider], stream=stream,
                num_retries=0, timeout=self.timeout, drop_params=True, **params, **NO_MCP)
        except Exception as e:  # noqa: BLE001
            _count(provider, "error", started)
            status = _status(e)
            if status in (401, 403):
                raise ApiError(401, f"{provider} refused your X-Provider-Key (HTTP {status})",
                               code="provider_key_refused") from None
            if _provider_side(e):
                raise self._exhausted(target.name, [(provider, e)]) from None
            raise _client_error(e) from None
        _count(provider, "ok", started)
        return response

    def _exhausted(self, model: str, failures: list[tuple[str, BaseException]]) -> ApiError:
        what = ", ".join(f"{p}: {_describe(e)}" for p, e in failures) or "no provider is configured"
        if failures and all(isinstance(e, COOLING) or _status(e) == 429 for _, e in failures):
            wait = min(_retry_after(e, self.cooldown) for _, e in failures)
            return ApiError(429, f"every provider of {model} is rate-limited ({what}); nothing was charged; "
                                 f"retry after {wait} s", code="rate_limit_exceeded",
                            headers=((b"retry-after", str(wait).encode()),))
        if failures and all(isinstance(e, litellm.Timeout) for _, e in failures):
            return ApiError(504, f"every provider of {model} timed out ({what}); nothing was charged",
                            code="upstream_timeout")
        return ApiError(502, f"every provider of {model} failed ({what}); nothing was charged",
                        code="upstream_error")


def _status(e: BaseException) -> int | None:
    status = getattr(e, "status_code", None)
    return status if isinstance(status, int) else None


def _provider_side(e: BaseException) -> bool:
    if isinstance(e, (litellm.Timeout, litellm.APIConnectionError, *COOLING)):
        return True
    status = _status(e)
    return status is None or status >= 500 or status in PROVIDER_SIDE


def _describe(e: BaseException) -> str:
    if isinstance(e, COOLING):
        return "cooling down"
    if isinstance(e, litellm.Timeout):
        return "timeout"
    return f"HTTP {_status(e)}" if _status(e) else "unreachable"


def _retry_after(e: BaseException, default: float) -> int:
    seconds = getattr(e, "cooldown_time", None)
    if seconds is None:
        headers = _get_response_headers(original_exception=e) or {}
        try:
            seconds = float(headers.get("retry-after", default))
        except (TypeError, ValueError):
            seconds = default
    return max(1, math.ceil(seconds))


def _client_error(e: BaseException) -> ApiError:
    if isinstance(e, litellm.ContextWindowExceededError):
        return ApiError(400, "the messages (with max_tokens) exceed the model's context window",
                        param="messages", code="context_length_exceeded")
    if isinstance(e, litellm.ContentPolicyViolationError):
        return ApiError(400, "the provider's content policy refused the request", code="content_filter")
    return ApiError(400, f"the provider refused the request as invalid (HTTP {_status(e) or 400}); "
                         "nothing was charged", code="upstream_rejected")


def _count(provider: str, result: str, started: float) -> None:
    metrics.UPSTREAM.labels(provider, result).inc()
    metrics.UPSTREAM_SECONDS.labels(provider).observe(time.monotonic() - started)
