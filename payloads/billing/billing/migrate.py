"""Versioned schema migrations with yoyo-migrations (billing/migrations/*.sql, applied in order,
recorded in _yoyo_migration, under yoyo's lock so two starting instances never race)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlencode

from psycopg.conninfo import conninfo_to_dict
from yoyo import get_backend, read_migrations

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def yoyo_url(database_url: str) -> str:
    """Migrations commit without waiting for the synchronous standby: the primary region starts
    before any replica exists (its first deploy), and a migration lost in a failover is simply
    applied again at the next start. Every parameter goes in the query string, which yoyo hands to
    psycopg as they are: yoyo's own URL parsing knows one host only, DATABASE_URL lists every
    member (`host=a,b&port=5432,5432` reaches libpq unchanged)."""
    params = conninfo_to_dict(database_url)
    dbname = params.pop("dbname", "")
    params["options"] = "-c synchronous_commit=local"
    params.setdefault("target_session_attrs", "read-write")
    return f"postgresql+psycopg:///{quote(dbname, safe='')}?{urlencode(params)}"


def apply(database_url: str) -> list[str]:
    backend = get_backend(yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]
