"""Run inside a venv holding the released `ciris-agent`: builds its LLM service the way its own
service initializer does for a CIRIS proxy URL (OPENAI_API_BASE, OPENAI_API_KEY, INSTRUCTOR_MODE)
and makes the agent's structured calls, printing what came back as JSON.

    python agent_llm_driver.py '{"url", "api_key", "model", "task_id", "hosts"?, "reask"?}'

`url` must name a `ciris-services` host, as the agent's proxies are: only then does the agent attach
its interaction metadata. `hosts` ({name: address}) maps that name to the local proxy. `reask` (a
tag) asks the fake upstream to answer each mode's first call outside the schema (payloads/fake-llm),
so the agent's instructor asks again: a retry within the interaction.
"""

import asyncio
import json
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "billing")]
from agent_driver import resolve_as  # noqa: E402  (the billing driver's stand-in for DNS)
from agent_shapes import Decision  # noqa: E402

from ciris_engine.logic.runtime.service_initializer import ServiceInitializer  # noqa: E402


async def service(mode: str, args: dict):
    os.environ.update({"OPENAI_API_BASE": args["url"], "OPENAI_API_KEY": args["api_key"], "OPENAI_MODEL": args["model"],
                       "INSTRUCTOR_MODE": mode})
    initializer = ServiceInitializer()
    await initializer._initialize_llm_services(types.SimpleNamespace(services=None))
    if initializer.llm_service is None:
        raise SystemExit(f"the agent's initializer built no LLM service for {mode}")
    return initializer.llm_service


async def main(args: dict) -> dict:
    out = {}
    for mode in ("JSON", "TOOLS"):
        tag = f" [fake-llm:reask:{args['reask']}-{mode}]" if args.get("reask") else ""
        messages = [{"role": "system", "content": "You decide."}, {"role": "user", "content": f"What now?{tag}"}]
        llm = await service(mode, args)
        sent: list = []

        async def record(request):  # what went over the wire: the body's billing fields, not the key
            body = json.loads(request.content)
            sent.append({"metadata": body.get("metadata"), "max_tokens": body.get("max_tokens"),
                         "tool_choice": body.get("tool_choice"), "response_format": body.get("response_format"),
                         "auth_scheme": request.headers.get("authorization", "").split(" ")[0],
                         "tool_names": [m.get("name") for m in body.get("messages", []) if m.get("role") == "tool"]})

        llm.client._client.event_hooks["request"].append(record)
        decision, _ = await llm.call_llm_structured(messages, Decision, max_tokens=8192, temperature=0.0,
                                                    thought_id=f"thought-{mode}", task_id=args["task_id"])
        out[mode] = {"decision": decision.model_dump(mode="json"), "sent": sent}
        await llm.stop()
    return out


if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    resolve_as(given.get("hosts") or {})
    print(json.dumps(asyncio.run(main(given)), default=str))
