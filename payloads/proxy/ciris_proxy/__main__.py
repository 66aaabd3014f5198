"""python -m ciris_proxy [serve]        render LiteLLM's config and serve the gated proxy
   python -m ciris_proxy serve --bare  LiteLLM with the same models and no gate (bench/proxy only)
   python -m ciris_proxy render        print the rendered LiteLLM config (no secrets in it)

Environment: BILLING_URL, BILLING_SERVICE_TOKEN[_FILE], BILLING_PUBLIC_KEY[_FILE], LITELLM_MASTER_KEY,
TOGETHER_API_KEY, GROQ_API_KEY, OPENROUTER_API_KEY; optional PRICE_PER_INTERACTION_CENTS,
HOLD_TTL_SECONDS, CAPTURE_JOURNAL, HOST, PORT, PROXY_CONFIG (a rendered config file), and <PROVIDER>_API_BASE to point a provider elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from ciris_proxy import litellm_config, settings as settings_mod
from ciris_proxy.journal import Journal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciris_proxy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--bare", action="store_true", help="no credit gate (benchmark baseline)")
    sub.add_parser("render")
    args = parser.parse_args(argv)
    bare = getattr(args, "bare", False)
    if args.command == "render":
        print(litellm_config.render(), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = None if bare else settings_mod.from_env()
    except settings_mod.SettingsError as e:
        print(f"proxy: {e}", file=sys.stderr)
        return 2
    journal = None
    if settings is not None:  # owed captures must be writable before the first request is taken
        try:
            journal = Journal(settings.capture_journal)
        except OSError as e:
            print(f"proxy: CAPTURE_JOURNAL cannot be written ({e.strerror}: {settings.capture_journal})", file=sys.stderr)
            return 2
    if bare and not os.environ.get("LITELLM_MASTER_KEY"):
        print("proxy: LITELLM_MASTER_KEY is not set", file=sys.stderr)
        return 2
    # PROXY_CONFIG: the file the Pulumi program rendered (the container's). Otherwise render one,
    # outside the package directory so LiteLLM imports ciris_proxy.gate as the same module the
    # front door uses (one CreditGate, one journal).
    path = os.environ.get("PROXY_CONFIG", "").strip()
    if not path:
        path = os.path.join(tempfile.mkdtemp(prefix="ciris-proxy-"), "config.yaml")
        with open(path, "w") as f:
            f.write(litellm_config.render(gate=not bare))
    elif not os.path.isfile(path):
        print(f"proxy: PROXY_CONFIG names no file: {path}", file=sys.stderr)
        return 2
    for var, base in settings_mod.api_bases().items():
        os.environ[var] = base
    os.environ["CONFIG_FILE_PATH"] = path
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price map at start
    os.environ.setdefault("LITELLM_LOG", "WARNING")
    # Token counts for streams without a usage chunk: LiteLLM's bundled tiktoken, never a download
    # of a Hugging Face tokenizer on the request path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import uvicorn
    from litellm.proxy.proxy_server import app

    from ciris_proxy.server import Front

    if bare:
        front = Front(app, gate=None)
        host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "4000"))
    else:
        front = Front(app, settings=settings, journal=journal)
        host, port = settings.host, settings.port
    uvicorn.run(front, host=host, port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
