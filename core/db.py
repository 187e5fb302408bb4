"""Engine and sessions for the application database (SQLite file by default, PostgreSQL in prod).

Sync SQLAlchemy: activities that touch the database are sync and run in the worker's thread
pool; API handlers call into it through a thread as well. One engine per process.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

WAL_SWITCH_ATTEMPTS = 100


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # busy_timeout queues writers instead of failing with "database is locked" when two
    # processes write at once.
    cur.execute("PRAGMA busy_timeout=30000")
    # WAL lets the API read while the worker writes. While a new file is being switched to WAL by
    # one connection (the API and the worker migrate together at first start), another one's
    # switch can be refused as "locked" at once, busy handler or not (seen in
    # test_concurrent_upgrades_serialise): retry it, bounded (~5 s).
    for attempt in range(WAL_SWITCH_ATTEMPTS):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_SWITCH_ATTEMPTS - 1:
                raise
            time.sleep(0.025 + random.random() * 0.05)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str, **kw: Any) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kw)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kw.setdefault("pool_size", 20)
    kw.setdefault("max_overflow", 20)
    kw.setdefault("pool_pre_ping", True)
    return create_engine(url, **kw)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, class_=Session, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        yield session
