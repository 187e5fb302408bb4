"""Refund reservation, settlement and the return steps on SQLite and PostgreSQL.

The concurrency test races real threads for one payment's row lock: whatever the interleaving,
the pending + succeeded refunds never add up to more than was captured.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, func, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.ledger import LedgerActivities
from activities.notify import NotifyActivities
from activities.refunds import RefundActivities
from core.config import Settings
from core.ids import new_id
from core.ledger_store import account_view, check_ledger, write_transaction
from core.refunds import RefundRejected, reserve_refund
from core.tables import (
    LedgerTransaction,
    Merchant,
    Notification,
    Order,
    Payment,
    PaymentEvent,
    Product,
    Refund,
    Return,
    utcnow,
)
from tests.factories import Seed, make_order, make_payment, make_product, seed
from workflows.contracts import (
    CompleteRefundInput,
    FailRefundInput,
    FinishReturnInput,
    PostCaptureInput,
    RefundNoticeInput,
    RefundWorkflowInput,
    ReturnStepInput,
)

CAPTURED = 10_000


@pytest.fixture
def env() -> ActivityEnvironment:
    return ActivityEnvironment()


def captured_payment(
    sessions: sessionmaker[Session], base: Seed, env: ActivityEnvironment, amount: int = CAPTURED, **kw: Any
) -> Payment:
    """A payment captured the real way: post_capture posts the capture and marks it succeeded."""
    with sessions() as s, s.begin():
        pay = make_payment(
            s,
            base.method,
            amount=amount,
            status="requires_capture",
            psp_payment_id=f"psp_{new_id('x')}",
            **kw,
        )
    env.run(
        LedgerActivities(sessions).post_capture,
        PostCaptureInput(
            payment_id=pay.id, merchant_id=base.merchant.id, psp="sandbox", amount=amount, currency="usd"
        ),
    )
    return pay


def reserve(
    sessions: sessionmaker[Session], pay: Payment, amount: int | None, refund_id: str | None = None
) -> RefundWorkflowInput:
    with write_transaction(sessions) as s:
        return reserve_refund(
            s,
            refund_id=refund_id or new_id("re"),
            merchant_id=pay.merchant_id,
            payment_id=pay.id,
            amount=amount,
            reason="requested_by_customer",
        )


def rejected(fn: Callable[[], Any]) -> RefundRejected:
    with pytest.raises(RefundRejected) as info:
        fn()
    return info.value


def refunds(sessions: sessionmaker[Session], payment_id: str) -> list[tuple[int, str]]:
    with sessions() as s:
        rows = s.exec(
            select(Refund).where(col(Refund.payment_id) == payment_id).order_by(col(Refund.id))
        ).all()
    return [(r.amount, r.status) for r in rows]


def payment(sessions: sessionmaker[Session], payment_id: str) -> Payment:
    with sessions() as s:
        row = s.get(Payment, payment_id)
    assert row is not None
    return row


def events(sessions: sessionmaker[Session], payment_id: str) -> list[tuple[str, str | None]]:
    with sessions() as s:
        rows = s.exec(
            select(PaymentEvent)
            .where(col(PaymentEvent.payment_id) == payment_id)
            .order_by(col(PaymentEvent.id))
        ).all()
    return [(e.status, e.reason) for e in rows]


def balance(sessions: sessionmaker[Session], account: str) -> int:
    with sessions() as s:
        return account_view(s, account).balance


def ledger_refunds(sessions: sessionmaker[Session], payment_id: str) -> int:
    """What the ledger says went back to customers for the payment (credits to psp_receivable)."""
    with sessions() as s:
        view = account_view(s, "psp_receivable:sandbox:usd", limit=10_000)
    return -sum(e.amount for e in view.entries if e.kind == "refund" and e.ref == payment_id)


def assert_balanced(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        report = check_ledger(s)
    assert report.balanced, report.unbalanced


# ---- reservation ------------------------------------------------------------------------------


def test_reserve_refund_holds_the_amount_until_settled(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    pay = captured_payment(sessions, base, env)
    first = reserve(sessions, pay, 6_000)
    assert (first.amount, first.psp_payment_id, first.currency) == (6_000, pay.psp_payment_id, "usd")
    # the pending 6_000 counts: 5_000 more would exceed the capture
    err = rejected(lambda: reserve(sessions, pay, 5_000))
    assert (err.status, err.code, err.param) == (400, "amount_too_large", "amount")
    assert refunds(sessions, pay.id) == [(6_000, "pending")]  # nothing written by the rejection

    rest = reserve(sessions, pay, None)  # no amount: everything still refundable
    assert rest.amount == 4_000
    assert rejected(lambda: reserve(sessions, pay, None)).code == "amount_too_large"

    # the same refund id again (a retried request) is answered as it is, not reserved twice
    again = reserve(sessions, pay, 1, refund_id=first.refund_id)
    assert again == first
    assert sorted(refunds(sessions, pay.id)) == [(4_000, "pending"), (6_000, "pending")]
    with sessions() as s:
        row = s.get(Refund, first.refund_id)
        assert row is not None and row.workflow_id == f"refund:{first.refund_id}"


def test_reserve_refund_refuses_what_is_not_refundable(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    other = seed(sessions)
    pay = captured_payment(sessions, base, env)
    with write_transaction(sessions) as s:
        # another merchant's payment does not exist for this merchant
        err = rejected(
            lambda: reserve_refund(
                s, refund_id=new_id("re"), merchant_id=other.merchant.id, payment_id=pay.id, amount=1
            )
        )
    assert (err.status, err.code) == (404, "resource_missing")
    for status, code in [
        ("requires_capture", "payment_unexpected_state"),
        ("failed", "payment_unexpected_state"),
        ("disputed", "charge_disputed"),
        ("refunded", "charge_already_refunded"),
    ]:
        with sessions() as s, s.begin():
            row = make_payment(s, base.method, status=status, amount_received=1_000, psp_payment_id="psp_z")
        assert rejected(functools.partial(reserve, sessions, row, 100)).code == code
    with sessions() as s:
        assert s.exec(select(func.count()).select_from(Refund)).one() == 0


def test_concurrent_reservations_never_exceed_the_capture(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    pay = captured_payment(sessions, base, env)
    n, each = 20, 1_500  # 20 x 15.00 asked of 100.00: exactly 6 fit
    start = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        start.wait()
        try:
            reserve(sessions, pay, each)
            result = "ok"
        except RefundRejected as exc:
            result = exc.code
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == n
    assert outcomes.count("ok") == CAPTURED // each
    assert outcomes.count("amount_too_large") == n - CAPTURED // each
    assert sum(a for a, _ in refunds(sessions, pay.id)) == 6 * each <= CAPTURED


# ---- settlement -------------------------------------------------------------------------------


def test_complete_refund_keep_policy_posts_once_and_moves_the_payment(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)  # refund_fee_policy defaults to "keep"
    pay = captured_payment(sessions, base, env)
    acts = RefundActivities(sessions)
    payable = f"merchant_payable:{base.merchant.id}:usd"
    assert balance(sessions, payable) == -9_680  # 10_000 less the 2.9% + 30 fee

    part = reserve(sessions, pay, 2_500)
    done = env.run(acts.complete_refund, CompleteRefundInput(part.refund_id))
    again = env.run(acts.complete_refund, CompleteRefundInput(part.refund_id))  # a retry
    assert done == again
    assert (done.transaction_key, done.fee_returned, done.payment_status) == (
        f"refund:{part.refund_id}",
        0,
        "partially_refunded",
    )
    with sessions() as s:
        assert s.exec(select(func.count()).select_from(LedgerTransaction)).one() == 2
    assert balance(sessions, payable) == -9_680 + 2_500  # the merchant bears the whole refund
    assert balance(sessions, "platform_fees:usd") == -320  # the platform keeps its fee
    assert balance(sessions, "psp_receivable:sandbox:usd") == 7_500

    rest = reserve(sessions, pay, None)
    assert env.run(acts.complete_refund, CompleteRefundInput(rest.refund_id)).payment_status == "refunded"
    assert payment(sessions, pay.id).status == "refunded"
    assert refunds(sessions, pay.id) == [(2_500, "succeeded"), (7_500, "succeeded")]
    assert ledger_refunds(sessions, pay.id) == CAPTURED
    assert balance(sessions, "psp_receivable:sandbox:usd") == 0
    assert balance(sessions, payable) == 320  # the merchant owes the kept fee
    reasons = [r for _s, r in events(sessions, pay.id)]
    assert f"refund {part.refund_id} of 25.00 USD succeeded" in reasons
    assert [s for s, _r in events(sessions, pay.id)][-1] == "refunded"
    assert_balanced(sessions)


def test_complete_refund_return_policy_gives_the_fee_back_exactly(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions, refund_fee_policy="return", fee_bps=290, fee_fixed=30)
    pay = captured_payment(sessions, base, env, amount=999)  # fee: round(28.97) + 30 = 59
    acts = RefundActivities(sessions)
    shares = []
    for amount in (333, 333, 333):
        r = reserve(sessions, pay, amount)
        shares.append(env.run(acts.complete_refund, CompleteRefundInput(r.refund_id)).fee_returned)
    assert shares == [20, 19, 20] and sum(shares) == 59
    # everything reversed: every account of this payment is back to zero
    assert balance(sessions, f"merchant_payable:{base.merchant.id}:usd") == 0
    assert balance(sessions, "platform_fees:usd") == 0
    assert balance(sessions, "psp_receivable:sandbox:usd") == 0
    assert payment(sessions, pay.id).status == "refunded"
    assert_balanced(sessions)


def test_unknown_fee_policy_is_retried_not_failed(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    pay = captured_payment(sessions, base, env)
    r = reserve(sessions, pay, 100)
    with sessions() as s, s.begin():
        merchant = s.get(Merchant, base.merchant.id)
        assert merchant is not None
        merchant.refund_fee_policy = "half"
    with pytest.raises(ApplicationError) as info:
        env.run(RefundActivities(sessions).complete_refund, CompleteRefundInput(r.refund_id))
    assert info.value.type == "InvalidFeePolicy" and not info.value.non_retryable
    assert refunds(sessions, pay.id) == [(100, "pending")]  # rolled back, still reserved


def test_fail_refund_releases_the_reservation_and_leaves_the_ledger(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    pay = captured_payment(sessions, base, env)
    acts = RefundActivities(sessions)
    r = reserve(sessions, pay, None)
    env.run(acts.fail_refund, FailRefundInput(r.refund_id, reason="declined", message="card closed"))
    env.run(acts.fail_refund, FailRefundInput(r.refund_id, reason="declined"))  # a retry: no-op
    with sessions() as s:
        row = s.get(Refund, r.refund_id)
        assert row is not None and (row.status, row.failure_reason) == ("failed", "declined")
        assert s.exec(select(func.count()).select_from(LedgerTransaction)).one() == 1  # the capture only
    assert payment(sessions, pay.id).status == "succeeded"
    assert events(sessions, pay.id)[-1] == (
        "succeeded",
        f"refund {r.refund_id} of 100.00 USD failed: declined (card closed)",
    )
    # a failed refund cannot succeed afterwards
    with pytest.raises(ApplicationError) as info:
        env.run(acts.complete_refund, CompleteRefundInput(r.refund_id))
    assert info.value.type == "InvalidTransition" and info.value.non_retryable
    # the whole amount is refundable again
    assert reserve(sessions, pay, None).amount == CAPTURED


def test_refund_notice_is_sent_once_per_refund(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions, name="Acme Books")
    pay = captured_payment(sessions, base, env)
    acts = RefundActivities(sessions)
    notify = NotifyActivities(sessions, Settings.model_validate({"smtp_url": ""}))
    first, second = reserve(sessions, pay, 1_000), reserve(sessions, pay, 2_000)
    for r in (first, second):
        env.run(acts.complete_refund, CompleteRefundInput(r.refund_id))
        env.run(notify.send_refund_notice, RefundNoticeInput(r.refund_id, "refund_succeeded"))
        env.run(notify.send_refund_notice, RefundNoticeInput(r.refund_id, "refund_succeeded"))  # retry
    with sessions() as s:
        rows = s.exec(select(Notification).order_by(col(Notification.id))).all()
    assert [(n.payment_id, n.kind, n.recipient) for n in rows] == [
        (first.refund_id, "refund_succeeded", base.customer.email),
        (second.refund_id, "refund_succeeded", base.customer.email),
    ]
    assert "10.00 USD" in rows[0].subject and "Acme Books" in rows[0].subject
    assert ("partially_refunded", f"refund notice for {first.refund_id} logged") in events(sessions, pay.id)


# ---- returns ----------------------------------------------------------------------------------


def shop_order(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> tuple[Seed, Payment, Order, Product]:
    """A confirmed order of 2 x 1_500 whose payment was captured."""
    base = seed(sessions)
    pay = captured_payment(sessions, base, env, amount=3_000)
    with sessions() as s, s.begin():
        product = make_product(s, base.merchant.id, stock=5, price=1_500)
        order = make_order(
            s,
            base.customer,
            pay.id,
            amount=3_000,
            status="confirmed",
            items=[{"product": product.id, "name": "Widget", "quantity": 2, "unit_price": 1_500}],
        )
    return base, pay, order, product


def make_return(sessions: sessionmaker[Session], order: Order, product: Product, quantity: int) -> str:
    rid = new_id("ret")
    with sessions() as s, s.begin():
        s.add(
            Return(
                id=rid,
                merchant_id=order.merchant_id,
                order_id=order.id,
                items=[{"product": product.id, "quantity": quantity, "unit_price": product.price}],
                amount=quantity * product.price,
                currency="usd",
                workflow_id=f"return:{rid}",
                expires_at=utcnow() + timedelta(days=30),
            )
        )
    return rid


def ret_row(sessions: sessionmaker[Session], rid: str) -> Return:
    with sessions() as s:
        row = s.get(Return, rid)
    assert row is not None
    return row


def stock(sessions: sessionmaker[Session], product_id: str) -> int:
    with sessions() as s:
        row = s.get(Product, product_id)
    assert row is not None
    return row.stock


def test_receive_return_restocks_once_and_refunds_its_value(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    _base, pay, order, product = shop_order(sessions, env)
    rid = make_return(sessions, order, product, 1)
    acts = RefundActivities(sessions)
    step = ReturnStepInput(rid)

    env.run(acts.receive_return, step)
    env.run(acts.receive_return, step)  # a retry: the stock goes back once
    assert stock(sessions, product.id) == 6
    assert ret_row(sessions, rid).status == "received"

    planned = env.run(acts.create_return_refund, step)
    again = env.run(acts.create_return_refund, step)
    assert planned.refund is not None and again == planned
    assert (planned.refund.amount, planned.refund.return_id) == (1_500, rid)
    assert refunds(sessions, pay.id) == [(1_500, "pending")]
    assert ret_row(sessions, rid).refund_id == planned.refund.refund_id

    env.run(acts.complete_refund, CompleteRefundInput(planned.refund.refund_id))
    env.run(acts.finish_return, FinishReturnInput(rid, refunded=True))
    env.run(acts.finish_return, FinishReturnInput(rid, refunded=True))
    assert ret_row(sessions, rid).status == "refunded"
    assert payment(sessions, pay.id).status == "partially_refunded"
    # refunded is final: it cannot expire any more
    assert env.run(acts.expire_return, step) == "refunded"
    assert_balanced(sessions)


def test_return_refund_is_capped_by_what_is_still_refundable(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    _base, pay, order, product = shop_order(sessions, env)
    acts = RefundActivities(sessions)
    reserve(sessions, pay, 2_000)  # the merchant refunded part by hand meanwhile
    rid = make_return(sessions, order, product, 2)  # worth 3_000
    env.run(acts.receive_return, ReturnStepInput(rid))
    planned = env.run(acts.create_return_refund, ReturnStepInput(rid))
    assert planned.refund is not None and planned.refund.amount == 1_000

    nothing_left = make_return(sessions, order, product, 1)
    env.run(acts.receive_return, ReturnStepInput(nothing_left))
    empty = env.run(acts.create_return_refund, ReturnStepInput(nothing_left))
    assert empty.refund is None and empty.reason and "nothing left" in empty.reason
    assert sum(a for a, _ in refunds(sessions, pay.id)) == 3_000


def test_expire_return_only_from_authorized(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    _base, _pay, order, product = shop_order(sessions, env)
    acts = RefundActivities(sessions)
    rid = make_return(sessions, order, product, 1)
    assert env.run(acts.expire_return, ReturnStepInput(rid)) == "expired"
    assert env.run(acts.expire_return, ReturnStepInput(rid)) == "expired"
    with pytest.raises(ApplicationError) as info:
        env.run(acts.receive_return, ReturnStepInput(rid))
    assert info.value.type == "InvalidTransition"
    assert stock(sessions, product.id) == 5  # an expired return puts nothing back
