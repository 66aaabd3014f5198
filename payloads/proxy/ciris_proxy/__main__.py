"""python -m ciris_proxy [serve]   serve the proxy (the lean front on litellm.Router)
   python -m ciris_proxy render    print the rendered upstream config (no secrets in it)
   python -m ciris_proxy reconcile [--since YYYY-MM-DD]
                                   check every logged paid call against billing's ledger (exit 1 on a problem)

Environment: BILLING_URL, BILLING_SERVICE_TOKEN[_FILE], BILLING_JWKS[_FILE], TOGETHER_API_KEY,
GROQ_API_KEY, OPENROUTER_API_KEY; optional PRICE_PER_INTERACTION_CENTS, HOLD_TTL_SECONDS,
MAX_OUTPUT_TOKENS, MAX_N, MAX_MESSAGES, MAX_BODY_BYTES, CAPTURE_JOURNAL, HOST, PORT, PROXY_CONFIG
(a rendered config file), HOLD_PLACEMENT_TIMEOUT_MS, STANDIN_BALANCE_MAX_AGE_SECONDS,
STANDIN_USER_CAP_CENTS, STANDIN_INSTANCE_CAP_CENTS, INTERACTION_WINDOW_SECONDS, INTERACTION_MAX_CALLS,
INTERACTION_MAX_TOKENS, CALL_LOG_DAYS, and <PROVIDER>_API_BASE to point a provider elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from ciris_proxy import litellm_config, settings as settings_mod
from ciris_proxy.calls import CallLog
from ciris_proxy.journal import Journal, JournalInUse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciris_proxy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve")
    sub.add_parser("render")
    rec = sub.add_parser("reconcile")
    rec.add_argument("--since", default="", help="the first UTC day (YYYY-MM-DD) to check; default: every logged day")
    args = parser.parse_args(argv)
    if args.command == "render":
        print(litellm_config.render(), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings_mod.load_env_file()
        settings = settings_mod.from_env()
    except settings_mod.SettingsError as e:
        print(f"proxy: {e}", file=sys.stderr)
        return 2
    if args.command == "reconcile":
        from ciris_proxy import reconcile

        return reconcile.main(settings, args.since)
    try:  # owed settlements (and the call log beside them) must be writable before the first request
        journal = Journal(settings.capture_journal)
        calls = CallLog(os.path.join(os.path.dirname(settings.capture_journal) or ".", "calls"), settings.call_log_days)
    except OSError as e:
        print(f"proxy: CAPTURE_JOURNAL cannot be written ({e.strerror}: {settings.capture_journal})", file=sys.stderr)
        return 2
    except JournalInUse as e:  # an older process still running on this volume: it owes what is in there
        print(f"proxy: CAPTURE_JOURNAL {e}; stop the other proxy first", file=sys.stderr)
        return 2
    # PROXY_CONFIG: the file the Pulumi program rendered (the container's); otherwise the built-in one.
    path = os.environ.get("PROXY_CONFIG", "").strip()
    if path and not os.path.isfile(path):
        print(f"proxy: PROXY_CONFIG names no file: {path}", file=sys.stderr)
        return 2
    if path:
        with open(path) as f:
            doc = yaml.safe_load(f)
    else:
        doc = yaml.safe_load(litellm_config.render())
    env = {**os.environ, **settings_mod.api_bases()}
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price map at start
    # Token counts for streams without a usage chunk: LiteLLM's bundled tiktoken, never a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import uvicorn

    from ciris_proxy.server import App
    from ciris_proxy.upstream import Upstreams, quiet_litellm

    quiet_litellm()
    app = App(settings, journal, Upstreams(doc, env), calls)
    # Behind the edge: no forwarded-address rewriting (nothing here uses the client's address).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                lifespan="on", loop="uvloop", http="httptools", proxy_headers=False, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
