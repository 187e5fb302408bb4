"""Shared fixtures: a fresh, migrated application database per test, on SQLite AND PostgreSQL.

PostgreSQL is not optional: if it is unreachable the PostgreSQL variants FAIL, so CI cannot
silently test only SQLite. Set PAYSAGA_SKIP_PG=1 to skip them on a machine without it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from core.db import make_engine, session_factory
from core.migrate import upgrade

PG_HOST = os.environ.get("PAYSAGA_TEST_PG_HOST", "127.0.0.1:5432")
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOST}/test"


def _pg_admin() -> psycopg.Connection:
    try:
        return psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {PG_HOST} is unreachable ({exc}); set PAYSAGA_SKIP_PG=1 to skip", pytrace=False
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `pytest -n 2 --dist loadgroup` (make test) each integration stack's tests stay on one
    xdist worker, so the SQLite and the PostgreSQL stacks run side by side, each started once;
    every other test goes wherever a worker is free."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        stack = callspec.params.get("stack") if callspec is not None else None
        if isinstance(stack, str):
            item.add_marker(pytest.mark.xdist_group(f"stack-{stack}"))


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of an empty database that only this test uses (not migrated)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'app.db'}"
        return
    if os.environ.get("PAYSAGA_SKIP_PG") == "1":
        pytest.skip("PAYSAGA_SKIP_PG=1")
    name = f"paysaga_t_{secrets.token_hex(6)}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOST}/{name}"
    finally:
        with _pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on the database, migrated to head."""
    upgrade(db_url)
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)
