"""Schema migrations (Alembic, scripts in core/migrations), run programmatically: no alembic.ini.

`upgrade(url)` brings a database to the newest revision; the API and the worker call it at start,
so it serialises concurrent callers (an advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite)
and runs all revisions in one transaction: a failed migration leaves the schema untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, pool

from core.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Any constant works; it only has to be the same in every process that migrates this database.
_PG_LOCK_ID = 0x70617973  # "pays"


class MigrationError(RuntimeError):
    pass


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would eat a '%' in a URL-encoded password.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def _engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite"):
        return make_engine(database_url, poolclass=pool.NullPool)
    return create_engine(database_url, poolclass=pool.NullPool)


def _migrate_on(conn: Connection, cfg: Config, step: Callable[[Config], None]) -> None:
    cfg.attributes["connection"] = conn
    if conn.dialect.name == "sqlite":
        # Batch mode recreates tables; with foreign keys enforced that could cascade or fail
        # halfway. The pragma is a no-op inside a transaction, so switch it off first and check
        # the foreign keys ourselves before committing.
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        # pysqlite does not open a transaction before DDL by itself: without this each
        # CREATE TABLE would autocommit. IMMEDIATE also takes the write lock up front.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        step(cfg)
        violations = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if violations:
            conn.rollback()
            raise MigrationError(f"foreign key violations after migration: {violations[:5]}")
        conn.commit()
        return
    if conn.dialect.name == "postgresql":
        # Released at commit/rollback; a second process waits here, then finds the work done.
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_ID})")
    step(cfg)
    conn.commit()


def _migrate(database_url: str, step: Callable[[Config], None]) -> None:
    engine = _engine(database_url)
    try:
        with engine.connect() as conn:
            _migrate_on(conn, alembic_config(database_url), step)
    finally:
        engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Run `alembic upgrade <revision>` against database_url (sqlite:/// or postgresql+psycopg://)."""
    _migrate(database_url, lambda cfg: command.upgrade(cfg, revision))


def downgrade(database_url: str, revision: str) -> None:
    """Run `alembic downgrade <revision>` ("base" drops the whole schema)."""
    _migrate(database_url, lambda cfg: command.downgrade(cfg, revision))


def head_revisions() -> set[str]:
    return set(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())


def current_revisions(database_url: str) -> set[str]:
    engine = _engine(database_url)
    try:
        with engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()


def check_current(database_url: str) -> bool:
    """True when the database is at the newest revision (nothing left to migrate)."""
    return current_revisions(database_url) == head_revisions()
