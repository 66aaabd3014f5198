"""python -m billing [serve]        apply pending migrations, then serve the API
   python -m billing migrate        apply pending migrations only
   python -m billing verify-ledger  check every hash chain and balance (exit 1 on the first break)
                                    [--json: the report as one JSON line, for the metrics' background check]
   python -m billing mint-token --role service --sub proxy [--ttl-seconds N]   (operators)
                                    [--generation G: required with --role proxy, ADR 25]
   python -m billing public-key     the signing key's public half (PEM)
   python -m billing jwks           the keys billing's tokens verify with (JWK Set), for the proxy"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import sys

import psycopg

from billing import auth, jwks, migrate, settings as settings_mod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m billing", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve")
    sub.add_parser("migrate")
    sub.add_parser("verify-ledger").add_argument("--json", action="store_true")
    sub.add_parser("public-key")
    sub.add_parser("jwks")
    mint = sub.add_parser("mint-token")
    mint.add_argument("--role", choices=auth.ROLES, required=True)
    mint.add_argument("--sub", required=True)
    mint.add_argument("--ttl-seconds", type=int, default=3600)
    mint.add_argument("--generation", help="the proxy role's generation (one of PROXY_TOKEN_GENERATIONS)")
    args = parser.parse_args(argv)
    command = args.command or "serve"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        settings_mod.load_env_file()
        settings = settings_mod.from_env()
    except settings_mod.SettingsError as e:
        print(f"billing: {e}", file=sys.stderr)
        return 2

    if command == "public-key":
        print(auth.public_pem(settings.jwt_private_key), end="")
        return 0
    if command == "jwks":
        print(jwks.render(settings.jwt_keys.values()), end="")
        return 0
    if command == "mint-token":
        try:
            token, _ = auth.mint(settings.jwt_private_key, args.sub, args.role, args.ttl_seconds, generation=args.generation)
        except ValueError:  # auth.mint's rule: a generation with the proxy role, and only with it
            print("billing: mint-token: --generation goes with --role proxy, and only with it", file=sys.stderr)
            return 2
        print(token)
        return 0
    try:
        if command == "verify-ledger":
            from billing.verify import verify

            report = verify(settings.database_url)
            if args.json:
                print(json.dumps({**dataclasses.asdict(report), "ok": report.problem is None}))
                return 1 if report.problem else 0
            if report.problem:
                print(f"ledger broken: {report.problem}", file=sys.stderr)
                return 1
            print(f"ledger ok: {report.users} users, {report.transactions} transactions checked; "
                  f"{report.forced} forced debits, {report.shortfall} cents short")
            return 0
        applied = migrate.apply(settings.database_url)
        if applied:
            logging.getLogger("billing").info("applied migrations: %s", ", ".join(applied))
    except psycopg.OperationalError as e:
        print(f"billing: cannot reach the database at DATABASE_URL ({_first_line(e)})", file=sys.stderr)
        return 1
    if command == "migrate":
        return 0

    # What the workers share, fresh for each start (no earlier result or count is served): the
    # ledger check's result (ledger_check.py) and every worker's metric values (metrics.py). Set
    # before prometheus_client is first imported: it picks its multiprocess mode then.
    state_dir = tempfile.mkdtemp(prefix="ciris-billing-")
    os.environ[settings_mod.STATE_DIR_VAR] = state_dir
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(state_dir, "metrics")
    os.mkdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])

    import uvicorn

    from billing.app import create_app

    if settings.workers > 1:  # each worker process reads the same environment
        uvicorn.run("billing.app:from_environment", factory=True, workers=settings.workers, host=settings.host,
                    port=settings.port, log_level="info", access_log=False)
    else:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
