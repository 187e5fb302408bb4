"""The double-entry ledger in the database: idempotent posting, account views, a consistency check.

Rules (domain/ledger.py) decide what a transaction is; this module writes it. The write path
re-checks the balance in SQL after inserting, so even a LedgerTxn that slipped past the domain
checks cannot leave an unbalanced transaction behind: the error rolls the surrounding DB
transaction back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from core.tables import LedgerEntry, LedgerTransaction
from domain.ledger import Account, LedgerError, LedgerTxn, UnbalancedTransaction


class LedgerConflict(LedgerError):
    """The key is already posted with different postings: a bug in the caller, never a retry."""


# ---- write transactions --------------------------------------------------------------------


def begin_write(session: Session) -> None:
    """Open the session's DB transaction now, as a writer.

    pysqlite opens its transaction lazily, right before the first INSERT/UPDATE/DELETE. Until
    then reads see whatever another process commits in between (a read-modify-write would lose
    updates) and a SAVEPOINT would itself become the outermost transaction, so releasing it
    would commit early. BEGIN IMMEDIATE takes SQLite's write lock up front (waiting up to
    busy_timeout), which serialises writers. PostgreSQL needs nothing here: callers lock the
    rows they change with SELECT ... FOR UPDATE.
    """
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        return
    dbapi_conn = conn.connection.dbapi_connection
    if not getattr(dbapi_conn, "in_transaction", True):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def write_transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One write unit of work: commit on success, roll back on any exception."""
    with sessions() as session, session.begin():
        begin_write(session)
        yield session


# ---- posting -------------------------------------------------------------------------------


def _lines(postings: Any) -> Counter[tuple[str, str, int]]:
    return Counter((p.account, p.currency, int(p.amount)) for p in postings)


def _ensure_same(session: Session, stored: LedgerTransaction, txn: LedgerTxn) -> None:
    entries = session.exec(select(LedgerEntry).where(col(LedgerEntry.transaction_key) == txn.key)).all()
    if stored.kind != txn.kind or stored.ref != txn.ref or _lines(entries) != _lines(txn.postings):
        raise LedgerConflict(f"ledger transaction {txn.key!r} is already posted with different postings")


def _existing(session: Session, key: str) -> LedgerTransaction | None:
    return session.exec(select(LedgerTransaction).where(col(LedgerTransaction.key) == key)).first()


def post_txn(session: Session, txn: LedgerTxn) -> bool:
    """Post txn inside the caller's DB transaction. True: posted now; False: the key was already
    posted with the same postings (a retry). Raises LedgerConflict if it was posted differently,
    UnbalancedTransaction / LedgerError if the postings do not balance."""
    begin_write(session)
    stored = _existing(session, txn.key)
    if stored is not None:
        _ensure_same(session, stored, txn)
        return False
    try:
        # A savepoint, so that losing a race for the key (IntegrityError on the primary key)
        # or an unbalanced posting undoes only this posting and the caller decides what next.
        with session.begin_nested():
            session.add(LedgerTransaction(key=txn.key, kind=txn.kind, ref=txn.ref))
            session.flush()
            session.add_all(
                LedgerEntry(transaction_key=txn.key, account=p.account, currency=p.currency, amount=p.amount)
                for p in txn.postings
            )
            session.flush()
            _check_written(session, txn.key)
    except IntegrityError:
        stored = _existing(session, txn.key)
        if stored is None:
            raise  # some other constraint: not a concurrent post of the same key
        _ensure_same(session, stored, txn)
        return False
    return True


def _check_written(session: Session, key: str) -> None:
    """The database's own word on what was just written (not the Python objects)."""
    rows = session.exec(
        select(col(LedgerEntry.currency), func.sum(col(LedgerEntry.amount)), func.count())
        .where(col(LedgerEntry.transaction_key) == key)
        .group_by(col(LedgerEntry.currency))
    ).all()
    unbalanced = {ccy: int(total) for ccy, total, _n in rows if int(total) != 0}
    if unbalanced:
        raise UnbalancedTransaction(key, unbalanced)
    if sum(n for _c, _t, n in rows) < 2:
        raise LedgerError(f"transaction {key!r} needs at least two entries")


# ---- reading -------------------------------------------------------------------------------


@dataclass
class EntryView:
    transaction_key: str
    kind: str
    ref: str
    amount: int
    created_at: datetime


@dataclass
class AccountView:
    account: str
    currency: str
    balance: int
    entries: list[EntryView] = field(default_factory=list)


def account_view(session: Session, account: str, limit: int = 100) -> AccountView:
    """Balance over all of the account's entries, and its newest `limit` entries first.
    Raises LedgerError for a malformed account name."""
    parsed = Account.parse(account)
    balance = session.exec(
        select(func.coalesce(func.sum(col(LedgerEntry.amount)), 0)).where(col(LedgerEntry.account) == account)
    ).one()
    rows = session.exec(
        select(LedgerEntry, LedgerTransaction)
        .join(LedgerTransaction, col(LedgerTransaction.key) == col(LedgerEntry.transaction_key))
        .where(col(LedgerEntry.account) == account)
        .order_by(col(LedgerTransaction.created_at).desc(), col(LedgerEntry.id).desc())
        .limit(limit)
    ).all()
    return AccountView(
        account=account,
        currency=parsed.currency,
        balance=int(balance),
        entries=[EntryView(e.transaction_key, t.kind, t.ref, int(e.amount), t.created_at) for e, t in rows],
    )


@dataclass
class LedgerCheck:
    balanced: bool
    transactions: int
    # {"transaction_key", "reason": "unbalanced", "currency", "amount"} or
    # {"transaction_key", "reason": "too_few_entries", "entries"}
    unbalanced: list[dict[str, Any]] = field(default_factory=list)


def check_ledger(session: Session) -> LedgerCheck:
    """Whole-ledger audit: every transaction sums to zero per currency and has >= 2 entries."""
    total = session.exec(select(func.count()).select_from(LedgerTransaction)).one()
    amount_sum = func.sum(col(LedgerEntry.amount))
    sums = session.exec(
        select(col(LedgerEntry.transaction_key), col(LedgerEntry.currency), amount_sum)
        .group_by(col(LedgerEntry.transaction_key), col(LedgerEntry.currency))
        .having(amount_sum != 0)
        .order_by(col(LedgerEntry.transaction_key), col(LedgerEntry.currency))
    ).all()
    problems: list[dict[str, Any]] = [
        {"transaction_key": key, "reason": "unbalanced", "currency": ccy, "amount": int(amount)}
        for key, ccy, amount in sums
    ]
    n_entries = func.count(col(LedgerEntry.id))
    thin = session.exec(
        select(col(LedgerTransaction.key), n_entries)
        .outerjoin(LedgerEntry, col(LedgerEntry.transaction_key) == col(LedgerTransaction.key))
        .group_by(col(LedgerTransaction.key))
        .having(n_entries < 2)
        .order_by(col(LedgerTransaction.key))
    ).all()
    problems.extend(
        {"transaction_key": key, "reason": "too_few_entries", "entries": int(n)} for key, n in thin
    )
    return LedgerCheck(balanced=not problems, transactions=int(total), unbalanced=problems)
