"""Run inside a venv holding the released `ciris-agent`: drives its own CIRISBillingProvider
against a billing URL and prints what the agent made of each answer, as JSON.

    python agent_driver.py '{"url", "api_key" | "id_token", "provider", "account_id", "key", "hosts"?}'

`hosts` ({name: address}) stands in for DNS: the local stack's names (and the agent's packaged
fallback name) resolve through the bridge's own nameservers only.
"""

import asyncio
import json
import socket
import sys

from ciris_engine.logic.services.infrastructure.resource_monitor.ciris_billing_provider import CIRISBillingProvider
from ciris_engine.schemas.services.credit_gate import CreditAccount, CreditContext, CreditSpendRequest


async def main(args: dict) -> dict:
    # As the agent's service initializer builds it: an API key (server) or an ID token (mobile).
    provider = CIRISBillingProvider(api_key=args.get("api_key", ""), google_id_token=args.get("id_token", ""),
                                    base_url=args["url"], cache_ttl_seconds=0)
    account = CreditAccount(provider=args["provider"], account_id=args["account_id"], customer_email="agent@example.org")
    context = CreditContext(agent_id="contract-test", channel_id="api", user_role="observer")
    spend = CreditSpendRequest(amount_minor=args.get("amount", 1), currency="USD", description="Message interaction",
                               metadata={"message_id": "m-1", "idempotency_key": args["key"]})
    out = {"check": (await provider.check_credit(account, context)).model_dump(mode="json"),
           "spend": (await provider.spend_credit(account, spend, context)).model_dump(mode="json"),
           "again": (await provider.spend_credit(account, spend, context)).model_dump(mode="json"),
           "after": (await provider.check_credit(account, context)).model_dump(mode="json")}
    await provider.stop()
    return out


def resolve_as(hosts: dict) -> None:
    lookup = socket.getaddrinfo
    def mapped(host, *args, **kwargs):  # anyio passes the name as IDNA bytes
        name = host.decode() if isinstance(host, bytes) else host
        return lookup(hosts.get(name, host), *args, **kwargs)

    socket.getaddrinfo = mapped


if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    resolve_as(given.get("hosts") or {})
    print(json.dumps(asyncio.run(main(given))))
