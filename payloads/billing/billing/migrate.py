"""Versioned schema migrations with yoyo-migrations (billing/migrations/*.sql, applied in order,
recorded in _yoyo_migration, under yoyo's lock so two starting instances never race)."""

from __future__ import annotations

from pathlib import Path

from yoyo import get_backend, read_migrations

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def yoyo_url(database_url: str) -> str:
    """Migrations commit without waiting for the synchronous standby: the primary region starts
    before any replica exists (its first deploy), and a migration lost in a failover is simply
    applied again at the next start."""
    sep = "&" if "?" in database_url else "?"
    return "postgresql+psycopg://" + database_url.split("://", 1)[1] + f"{sep}options=-c%20synchronous_commit%3Dlocal"


def apply(database_url: str) -> list[str]:
    backend = get_backend(yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]
