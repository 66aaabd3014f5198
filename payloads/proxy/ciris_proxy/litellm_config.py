"""The proxy's upstream config (config.yaml): a pure renderer (models in, text out) used by the
Pulumi program, `python -m ciris_proxy serve`, the tests and bench/proxy alike.

Every exposed model has one deployment per provider with an `order`: the proxy tries them in the
FSD's order (Together, then Groq, then OpenRouter) and falls back to the next on a provider-side
failure. Keys and base URLs are `os.environ/...` references: the text holds no secret and no
address, so the same file serves production and the tests' local upstreams. The text is also a
valid LiteLLM proxy config (model_list, router_settings), which bench/proxy runs as its baseline.
"""

from __future__ import annotations

from typing import Mapping

import yaml

# (provider label, LiteLLM prefix, key variable, base variable), in fallback order.
PROVIDERS = (
    ("together", "together_ai", "TOGETHER_API_KEY", "TOGETHER_API_BASE"),
    ("groq", "groq", "GROQ_API_KEY", "GROQ_API_BASE"),
    ("openrouter", "openrouter", "OPENROUTER_API_KEY", "OPENROUTER_API_BASE"),
)

# Exposed model name -> each provider's id for it.
MODELS: dict[str, dict[str, str]] = {
    # The CIRIS agent's model (CIRISProxy serves `default` and `fast` with it); it sees images too.
    "llama-4-maverick": {
        "together": "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8",
        "groq": "meta-llama/llama-4-maverick-17b-128e-instruct",
        "openrouter": "meta-llama/llama-4-maverick",
    },
    "llama-3.3-70b": {
        "together": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "groq": "llama-3.3-70b-versatile",
        "openrouter": "meta-llama/llama-3.3-70b-instruct",
    },
    "llama-3.1-8b": {
        "together": "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
        "groq": "llama-3.1-8b-instant",
        "openrouter": "meta-llama/llama-3.1-8b-instruct",
    },
}

# Names clients use for a model (the CIRIS mobile app asks for `default`): LiteLLM's model_group_alias.
ALIASES = {"default": "llama-4-maverick", "fast": "llama-4-maverick"}
# The models that take images; a request with images for another model goes to VISION_MODEL.
VISION = frozenset({"llama-4-maverick"})
VISION_MODEL = "llama-4-maverick"
# The most output tokens one request buys (a larger max_tokens is lowered to it, ADR 18). The agent's
# decision steps ask 8192; a model not named here gets the proxy's MAX_OUTPUT_TOKENS (8192).
OUTPUT_CAPS = {"llama-4-maverick": 16384, "llama-3.3-70b": 8192, "llama-3.1-8b": 8192}

# Bring-your-own-key: `openai/<model>` and `anthropic/<model>` go straight to that provider with the
# caller's key (X-Provider-Key header), at no credit cost. No key of ours is configured for them.
BYOK_PROVIDERS = {"openai": "OPENAI_API_BASE", "anthropic": "ANTHROPIC_API_BASE"}

# OpenRouter routes to many hosts; ask it to use only those that neither retain nor train on data.
OPENROUTER_ZDR = {"data_collection": "deny", "zdr": True}


def model_list(models: Mapping[str, Mapping[str, str]], output_caps: Mapping[str, int] = OUTPUT_CAPS,
               vision: frozenset[str] = VISION) -> list[dict]:
    out = []
    for name, ids in models.items():
        info = {"supports_vision": name in vision, **({"max_output_tokens": output_caps[name]} if name in output_caps else {})}
        for order, (label, prefix, key_var, base_var) in enumerate(PROVIDERS, start=1):
            if label not in ids:
                continue
            params = {
                "model": f"{prefix}/{ids[label]}",
                "api_key": f"os.environ/{key_var}",
                "api_base": f"os.environ/{base_var}",
                "order": order,
            }
            if label == "openrouter":
                params["extra_body"] = {"provider": OPENROUTER_ZDR}
            out.append({"model_name": name, "litellm_params": params, "model_info": {"id": f"{name}@{label}", **info}})
    for prefix, base_var in BYOK_PROVIDERS.items():
        out.append({
            "model_name": f"{prefix}/*",
            "litellm_params": {"model": f"{prefix}/*", "api_base": f"os.environ/{base_var}"},
            "model_info": {"id": f"byok@{prefix}"},
        })
    return out


def render(
    models: Mapping[str, Mapping[str, str]] = MODELS,
    *,
    aliases: Mapping[str, str] | None = None,
    vision_model: str | None = VISION_MODEL,
    output_caps: Mapping[str, int] | None = None,
    timeout_seconds: int = 60,
    cooldown_seconds: int = 30,
    allowed_fails: int = 3,
) -> str:
    """The config text. Aliases replace the defaults above (None: take them); output caps override
    them model by model. An alias, vision model or cap naming no model is a ValueError."""
    aliases = ALIASES if aliases is None else aliases
    output_caps = {**OUTPUT_CAPS, **(output_caps or {})}
    for what, names in (("alias", aliases.values()), ("vision model", [vision_model] if vision_model else []),
                        ("output cap", output_caps)):
        unknown = sorted(set(names) - set(models))
        if unknown:
            raise ValueError(f"proxy {what} names no model: {', '.join(unknown)} (models: {', '.join(models)})")
    if set(aliases) & set(models):
        raise ValueError(f"proxy alias is a model's own name: {', '.join(sorted(set(aliases) & set(models)))}")
    if vision_model and vision_model not in VISION:
        raise ValueError(f"proxy vision model {vision_model} does not take images (those that do: {', '.join(sorted(VISION))})")
    doc = {
        "model_list": model_list(models, output_caps),
        # Ours (LiteLLM's server ignores it): where a request with images goes when its model is text-only.
        "ciris_settings": {"vision_model": vision_model},
        "router_settings": {
            "model_group_alias": dict(aliases),
            "routing_strategy": "simple-shuffle",
            "num_retries": 0,  # the next provider is the retry
            "timeout": timeout_seconds,
            "allowed_fails": allowed_fails,  # provider-side failures a minute before a cooldown
            "cooldown_time": cooldown_seconds,
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)
