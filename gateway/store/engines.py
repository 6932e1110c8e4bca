"""Which engine holds the registry, from where it is named: a PostgreSQL URL
(`postgresql://USER@HOST:PORT/DB`) opens `PostgresRegistry`, a path `SQLiteRegistry` (the
embedded default, DATA/registry.sqlite3). Where the location comes from (--registry,
$DEVID_REGISTRY, devid.toml) is the data directory's business: gateway/app/datadir.py."""

from __future__ import annotations

from pathlib import Path

from devid.gateway.store.postgres import PostgresDatabase, is_postgres_url, redact
from devid.gateway.store.registry import RegistryQueries, SQLiteRegistry

__all__ = ["PostgresRegistry", "SQLiteRegistry", "open_registry", "is_postgres_url", "redact", "Registry"]


class PostgresRegistry(RegistryQueries, PostgresDatabase):
    """`ca.store.Registry` on PostgreSQL (gateway/store/postgres.py)."""


Registry = SQLiteRegistry | PostgresRegistry


def open_registry(location: str | Path, *, create: bool = False, readonly: bool = False,
                  password: str | None = None) -> Registry:
    if is_postgres_url(str(location)):
        return PostgresRegistry(str(location), create=create, readonly=readonly, password=password)
    return SQLiteRegistry(Path(location), create=create, readonly=readonly)
