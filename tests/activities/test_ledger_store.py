"""core.ledger_store on SQLite and PostgreSQL: idempotent posting, DB-enforced balance, audit."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, func, select

import core.ledger_store as ledger_store
from core.ledger_store import (
    LedgerConflict,
    account_view,
    check_ledger,
    post_txn,
    write_transaction,
)
from core.tables import LedgerEntry, LedgerTransaction, utcnow
from domain.ledger import LedgerError, LedgerTxn, Posting, UnbalancedTransaction, build_txn, capture_txn
from domain.money import FeeSchedule, Money, allocate_fee

RECV = "psp_receivable:sandbox:usd"
PAYABLE = "merchant_payable:acct_1:usd"
FEES = "platform_fees:usd"


def _capture(payment_id: str = "pay_1", gross: int = 10_000) -> LedgerTxn:
    split = allocate_fee(Money(gross, "usd"), FeeSchedule(bps=290, fixed_minor=30))
    return capture_txn(payment_id, "acct_1", "sandbox", split)


def _counts(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions() as s:
        txns = s.exec(select(func.count()).select_from(LedgerTransaction)).one()
        entries = s.exec(select(func.count()).select_from(LedgerEntry)).one()
    return int(txns), int(entries)


def test_post_is_idempotent_by_key(sessions: sessionmaker[Session]) -> None:
    txn = _capture()
    with write_transaction(sessions) as s:
        assert post_txn(s, txn) is True
    with write_transaction(sessions) as s:
        assert post_txn(s, txn) is False  # a retry: nothing new
    assert _counts(sessions) == (1, 3)
    with sessions() as s:
        entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.transaction_key) == txn.key)).all()
    assert sorted((e.account, e.amount) for e in entries) == [(PAYABLE, -9_680), (FEES, -320), (RECV, 10_000)]


def test_conflicting_repost_raises_and_changes_nothing(sessions: sessionmaker[Session]) -> None:
    with write_transaction(sessions) as s:
        post_txn(s, _capture(gross=10_000))
    with pytest.raises(LedgerConflict), write_transaction(sessions) as s:
        post_txn(s, _capture(gross=20_000))  # same key, other amounts
    assert _counts(sessions) == (1, 3)
    with sessions() as s:
        assert account_view(s, RECV).balance == 10_000


def test_write_path_rejects_unbalanced_txn_built_by_hand(sessions: sessionmaker[Session]) -> None:
    txn = _capture()
    # LedgerTxn validates itself; forge one the way a buggy caller might, past every domain check.
    forged = (Posting(RECV, 10_000, "usd"), Posting(PAYABLE, -9_000, "usd"))
    object.__setattr__(txn, "postings", forged)
    with pytest.raises(UnbalancedTransaction) as info, write_transaction(sessions) as s:
        post_txn(s, txn)
    assert info.value.sums == {"usd": 1_000}
    assert _counts(sessions) == (0, 0)  # the whole DB transaction rolled back


def test_write_path_rejects_a_single_entry(sessions: sessionmaker[Session]) -> None:
    txn = _capture()
    object.__setattr__(txn, "postings", (Posting(RECV, 0, "usd"),))
    with pytest.raises(LedgerError, match="at least two"), write_transaction(sessions) as s:
        post_txn(s, txn)
    assert _counts(sessions) == (0, 0)


@pytest.mark.parametrize("plain_session", [False, True], ids=["write_transaction", "plain_session"])
def test_post_stays_inside_the_callers_transaction(
    sessions: sessionmaker[Session], plain_session: bool
) -> None:
    # The savepoint must not commit on its own (pysqlite would, without an explicit BEGIN): a
    # failure after the posting, in the same unit of work, must undo the posting too.
    with pytest.raises(RuntimeError, match="later step failed"):
        if plain_session:
            with sessions() as s, s.begin():
                post_txn(s, _capture())
                raise RuntimeError("later step failed")
        else:
            with write_transaction(sessions) as s:
                post_txn(s, _capture())
                raise RuntimeError("later step failed")
    assert _counts(sessions) == (0, 0)


def test_lost_race_for_the_key_counts_as_posted(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    txn = _capture()
    with write_transaction(sessions) as s:
        post_txn(s, txn)

    # Replay the race window: the existence check ran before the other worker committed.
    real_existing = ledger_store._existing
    calls = {"n": 0}

    def stale_first(session: Session, key: str) -> LedgerTransaction | None:
        calls["n"] += 1
        return None if calls["n"] == 1 else real_existing(session, key)

    monkeypatch.setattr(ledger_store, "_existing", stale_first)
    other = _capture("pay_2", 5_000)
    with write_transaction(sessions) as s:
        assert post_txn(s, txn) is False  # IntegrityError on the key -> already posted
        assert post_txn(s, other) is True  # the outer transaction survived the failed insert
    assert calls["n"] >= 2
    assert _counts(sessions) == (2, 6)


def test_concurrent_workers_post_once(sessions: sessionmaker[Session]) -> None:
    txn = _capture()
    results: list[bool] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        try:
            with write_transaction(sessions) as s:
                results.append(post_txn(s, txn))
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(results) == [False, False, False, True]
    assert _counts(sessions) == (1, 3)


def test_check_ledger_finds_hand_inserted_problems(sessions: sessionmaker[Session]) -> None:
    with write_transaction(sessions) as s:
        post_txn(s, _capture("pay_1"))
        post_txn(s, _capture("pay_2", 777))
    with sessions() as s:
        report = check_ledger(s)
    assert report.balanced is True
    assert report.transactions == 2
    assert report.unbalanced == []

    # Written straight to the tables, the way only a bug or a manual fix could.
    with sessions() as s, s.begin():
        s.add(LedgerTransaction(key="manual:bad", kind="adjustment", ref="x"))
        s.add(LedgerTransaction(key="manual:thin", kind="adjustment", ref="y"))
        s.flush()
        s.add(LedgerEntry(transaction_key="manual:bad", account=RECV, currency="usd", amount=500))
        s.add(LedgerEntry(transaction_key="manual:bad", account=FEES, currency="usd", amount=-400))
        s.add(LedgerEntry(transaction_key="manual:bad", account="bank:eur", currency="eur", amount=10))
        s.add(LedgerEntry(transaction_key="manual:thin", account=FEES, currency="usd", amount=0))
    with sessions() as s:
        report = check_ledger(s)
    assert report.balanced is False
    assert report.transactions == 4
    assert report.unbalanced == [
        {"transaction_key": "manual:bad", "reason": "unbalanced", "currency": "eur", "amount": 10},
        {"transaction_key": "manual:bad", "reason": "unbalanced", "currency": "usd", "amount": 100},
        {"transaction_key": "manual:thin", "reason": "too_few_entries", "entries": 1},
    ]


def test_account_view_balance_and_newest_first(sessions: sessionmaker[Session]) -> None:
    t0 = utcnow() - timedelta(minutes=10)
    txns = [_capture("pay_a", 10_000), _capture("pay_b", 2_000), _capture("pay_c", 500)]
    with write_transaction(sessions) as s:
        for txn in txns:
            post_txn(s, txn)
        # spread the timestamps so "newest first" is decided by created_at, not insertion luck
        for i, txn in enumerate(txns):
            row = s.get(LedgerTransaction, txn.key)
            assert row is not None
            row.created_at = t0 + timedelta(minutes=i)
    refund = build_txn(
        "payment:pay_a:refund",
        "refund",
        "pay_a",
        [Posting(RECV, -1_000, "usd"), Posting(PAYABLE, 1_000, "usd")],
    )
    with write_transaction(sessions) as s:
        post_txn(s, refund)

    with sessions() as s:
        recv = account_view(s, RECV)
        payable = account_view(s, PAYABLE, limit=2)
        fees = account_view(s, FEES)
        empty = account_view(s, "bank:jpy")
    assert recv.currency == "usd"
    assert recv.balance == 10_000 + 2_000 + 500 - 1_000
    assert [e.transaction_key for e in recv.entries] == [
        "payment:pay_a:refund",
        "payment:pay_c:capture",
        "payment:pay_b:capture",
        "payment:pay_a:capture",
    ]
    assert (
        recv.entries[0].kind == "refund"
        and recv.entries[0].ref == "pay_a"
        and recv.entries[0].amount == -1_000
    )
    assert recv.entries[0].created_at.tzinfo is not None
    # merchant net: 9680 + 1912 + 455 - 1000; only the newest two entries listed, balance over all
    assert payable.balance == -(9_680 + 1_912 + 455) + 1_000
    assert len(payable.entries) == 2
    assert fees.balance == -(320 + 88 + 45)
    assert recv.balance + payable.balance + fees.balance == 0
    assert (empty.balance, empty.entries, empty.currency) == (0, [], "jpy")
    with sessions() as s, pytest.raises(LedgerError):
        account_view(s, "not_an_account:usd")
