"""The database activities, run through temporalio's ActivityEnvironment on SQLite and PostgreSQL.

Every activity is run twice where a retry is possible: the second run must change nothing.
"""

from __future__ import annotations

import email
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, func, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.fraud import FraudActivities, velocity_query
from activities.ledger import LedgerActivities
from activities.notify import NotifyActivities
from activities.payments import PaymentActivities
from activities.stock import StockActivities
from core.config import Settings
from core.ledger_store import account_view, check_ledger
from core.tables import (
    BlocklistEntry,
    LedgerTransaction,
    Merchant,
    Notification,
    Order,
    Payment,
    PaymentEvent,
    Product,
    StockReservation,
    utcnow,
)
from tests.factories import (
    Seed,
    make_customer,
    make_order,
    make_payment,
    make_payment_method,
    make_product,
    seed,
)
from tests.ports import free_port
from workflows.contracts import (
    CartLine,
    ConfirmOrderInput,
    CreatePaymentInput,
    FraudCheckInput,
    NextAction,
    PaymentUpdate,
    PostCaptureInput,
    ReceiptInput,
    StockInput,
)


@pytest.fixture
def env() -> ActivityEnvironment:
    return ActivityEnvironment()


def _payment(sessions: sessionmaker[Session], payment_id: str) -> Payment:
    with sessions() as s:
        row = s.get(Payment, payment_id)
    assert row is not None
    return row


def _events(sessions: sessionmaker[Session], payment_id: str) -> list[tuple[str, str | None]]:
    with sessions() as s:
        rows = s.exec(
            select(PaymentEvent)
            .where(col(PaymentEvent.payment_id) == payment_id)
            .order_by(col(PaymentEvent.id))
        ).all()
    return [(r.status, r.reason) for r in rows]


def _app_error(excinfo: pytest.ExceptionInfo[ApplicationError], type_: str) -> ApplicationError:
    err = excinfo.value
    assert err.type == type_
    assert err.non_retryable is True
    return err


def _seed_payment(sessions: sessionmaker[Session], base: Seed, **kw: Any) -> Payment:
    with sessions() as s, s.begin():
        return make_payment(s, base.method, **kw)


# ---- payments ------------------------------------------------------------------------------


def _create_input(base: Seed, payment_id: str = "pay_test1") -> CreatePaymentInput:
    return CreatePaymentInput(
        payment_id=payment_id,
        merchant_id=base.merchant.id,
        customer_id=base.customer.id,
        payment_method_id=base.method.id,
        psp="sandbox",
        amount=2_500,
        currency="usd",
        capture_method="manual",
        workflow_id=f"checkout:{payment_id}",
        description="two books",
        metadata={"order": "42"},
        idempotency_key="idem-1",
    )


def test_create_payment_twice_makes_one_row(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    acts = PaymentActivities(sessions)
    inp = _create_input(base)
    env.run(acts.create_payment, inp)
    env.run(acts.create_payment, inp)  # a retry after a lost completion
    with sessions() as s:
        count = s.exec(select(func.count()).select_from(Payment)).one()
    assert count == 1
    row = _payment(sessions, inp.payment_id)
    assert (row.status, row.amount, row.capture_method, row.metadata_) == (
        "processing",
        2_500,
        "manual",
        {"order": "42"},
    )
    assert (row.workflow_id, row.idempotency_key, row.amount_received) == ("checkout:pay_test1", "idem-1", 0)
    assert _events(sessions, inp.payment_id) == [("processing", "created")]


def test_update_payment_transitions_and_retries(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    acts = PaymentActivities(sessions)
    env.run(acts.create_payment, _create_input(base))
    pid = "pay_test1"
    before = _payment(sessions, pid).updated

    otp = PaymentUpdate(
        pid, "requires_action", reason="3ds", psp_payment_id="psp_1", next_action=NextAction(type="otp")
    )
    env.run(acts.update_payment, otp)
    env.run(acts.update_payment, otp)  # retried: same status + reason -> no second event
    row = _payment(sessions, pid)
    assert row.status == "requires_action"
    assert row.next_action == {"type": "otp", "url": None}
    assert row.psp_payment_id == "psp_1"
    assert row.updated > before

    env.run(
        acts.update_payment,
        PaymentUpdate(pid, "requires_capture", reason="authorized", amount_capturable=2_500),
    )
    row = _payment(sessions, pid)
    assert row.status == "requires_capture"
    assert row.next_action is None  # cleared once the action is over
    assert row.amount_capturable == 2_500
    assert row.psp_payment_id == "psp_1"  # None in the update = unchanged

    env.run(acts.update_payment, PaymentUpdate(pid, "requires_capture", reason="capture requested"))
    env.run(
        acts.update_payment,
        PaymentUpdate(
            pid, "canceled", reason="expired", failure_code="authorization_expired", amount_capturable=0
        ),
    )
    row = _payment(sessions, pid)
    assert (row.status, row.failure_code, row.amount_capturable) == ("canceled", "authorization_expired", 0)
    assert _events(sessions, pid) == [
        ("processing", "created"),
        ("requires_action", "3ds"),
        ("requires_capture", "authorized"),
        ("requires_capture", "capture requested"),
        ("canceled", "expired"),
    ]

    # canceled is terminal
    with pytest.raises(ApplicationError) as info:
        env.run(acts.update_payment, PaymentUpdate(pid, "succeeded", reason="late"))
    _app_error(info, "InvalidTransition")
    with pytest.raises(ApplicationError) as info:
        env.run(acts.update_payment, PaymentUpdate(pid, "nonsense"))
    _app_error(info, "InvalidTransition")
    assert _payment(sessions, pid).status == "canceled"
    assert len(_events(sessions, pid)) == 5

    with pytest.raises(ApplicationError) as info:
        env.run(acts.update_payment, PaymentUpdate("pay_missing", "failed"))
    _app_error(info, "NotFound")


# ---- stock ---------------------------------------------------------------------------------


def _stock(sessions: sessionmaker[Session], product_id: str) -> int:
    with sessions() as s:
        product = s.get(Product, product_id)
    assert product is not None
    return product.stock


def _reservations(sessions: sessionmaker[Session], order_id: str) -> dict[str, tuple[int, str]]:
    with sessions() as s:
        rows = s.exec(select(StockReservation).where(col(StockReservation.order_id) == order_id)).all()
    return {r.product_id: (r.quantity, r.status) for r in rows}


@pytest.fixture
def shop(sessions: sessionmaker[Session]) -> tuple[Seed, Product, Product, Order]:
    base = seed(sessions)
    with sessions() as s, s.begin():
        a = make_product(s, base.merchant.id, stock=5, name="Lamp")
        b = make_product(s, base.merchant.id, stock=2, name="Shade")
        order = make_order(s, base.customer, payment_id="pay_shop")
    return base, a, b, order


def test_reserve_release_idempotent(
    sessions: sessionmaker[Session], env: ActivityEnvironment, shop: tuple[Seed, Product, Product, Order]
) -> None:
    _, a, b, order = shop
    acts = StockActivities(sessions)
    inp = StockInput(order.id, [CartLine(a.id, 2), CartLine(b.id, 1), CartLine(a.id, 1)])
    env.run(acts.reserve_stock, inp)
    env.run(acts.reserve_stock, inp)  # retry: already reserved lines are skipped
    assert (_stock(sessions, a.id), _stock(sessions, b.id)) == (2, 1)
    assert _reservations(sessions, order.id) == {a.id: (3, "reserved"), b.id: (1, "reserved")}

    env.run(acts.release_stock, inp)
    env.run(acts.release_stock, inp)  # undo retried: gives back once
    assert (_stock(sessions, a.id), _stock(sessions, b.id)) == (5, 2)
    assert _reservations(sessions, order.id) == {a.id: (3, "released"), b.id: (1, "released")}

    # a reserve retried after the release must not take the stock again
    env.run(acts.reserve_stock, inp)
    assert (_stock(sessions, a.id), _stock(sessions, b.id)) == (5, 2)


def test_out_of_stock_reserves_nothing(
    sessions: sessionmaker[Session], env: ActivityEnvironment, shop: tuple[Seed, Product, Product, Order]
) -> None:
    _, a, b, order = shop
    acts = StockActivities(sessions)
    # sorted by product id the lamp may be taken first: it must be given back with the rollback
    with pytest.raises(ApplicationError) as info:
        env.run(acts.reserve_stock, StockInput(order.id, [CartLine(a.id, 4), CartLine(b.id, 3)]))
    err = _app_error(info, "OutOfStock")
    assert b.id in str(err) and "Shade" in str(err)
    assert (_stock(sessions, a.id), _stock(sessions, b.id)) == (5, 2)
    assert _reservations(sessions, order.id) == {}

    with pytest.raises(ApplicationError) as info:
        env.run(acts.reserve_stock, StockInput(order.id, [CartLine(a.id, 0)]))
    _app_error(info, "InvalidInput")
    with pytest.raises(ApplicationError) as info:
        env.run(acts.reserve_stock, StockInput(order.id, [CartLine("prod_missing", 1)]))
    _app_error(info, "NotFound")
    assert _stock(sessions, a.id) == 5


def test_confirm_commits_and_blocks_release(
    sessions: sessionmaker[Session], env: ActivityEnvironment, shop: tuple[Seed, Product, Product, Order]
) -> None:
    _, a, b, order = shop
    acts = StockActivities(sessions)
    inp = StockInput(order.id, [CartLine(a.id, 2), CartLine(b.id, 2)])
    env.run(acts.reserve_stock, inp)
    confirm = ConfirmOrderInput(order.id, "pay_shop", confirmed=True)
    env.run(acts.confirm_order, confirm)
    env.run(acts.confirm_order, confirm)
    assert _reservations(sessions, order.id) == {a.id: (2, "committed"), b.id: (2, "committed")}
    with sessions() as s:
        row = s.get(Order, order.id)
        assert row is not None and row.status == "confirmed"

    env.run(acts.release_stock, inp)  # a committed reservation is sold: not given back
    assert (_stock(sessions, a.id), _stock(sessions, b.id)) == (3, 0)

    with pytest.raises(ApplicationError) as info:
        env.run(acts.confirm_order, ConfirmOrderInput(order.id, "pay_shop", confirmed=False))
    _app_error(info, "InvalidOrderState")
    with pytest.raises(ApplicationError) as info:
        env.run(acts.confirm_order, ConfirmOrderInput(order.id, "pay_other", confirmed=True))
    _app_error(info, "InvalidOrderState")


def test_cancel_releases_still_reserved(
    sessions: sessionmaker[Session], env: ActivityEnvironment, shop: tuple[Seed, Product, Product, Order]
) -> None:
    _, a, b, order = shop
    acts = StockActivities(sessions)
    env.run(acts.reserve_stock, StockInput(order.id, [CartLine(a.id, 1), CartLine(b.id, 2)]))
    cancel = ConfirmOrderInput(order.id, "pay_shop", confirmed=False)
    env.run(acts.confirm_order, cancel)
    env.run(acts.confirm_order, cancel)
    assert (_stock(sessions, a.id), _stock(sessions, b.id)) == (5, 2)
    assert _reservations(sessions, order.id) == {a.id: (1, "released"), b.id: (2, "released")}
    with sessions() as s:
        row = s.get(Order, order.id)
        assert row is not None and row.status == "canceled"
    # released stock cannot be confirmed afterwards
    with pytest.raises(ApplicationError) as info:
        env.run(acts.confirm_order, ConfirmOrderInput(order.id, "pay_shop", confirmed=True))
    _app_error(info, "InvalidOrderState")
    with pytest.raises(ApplicationError) as info:
        env.run(acts.confirm_order, ConfirmOrderInput("ord_missing", "pay_shop", confirmed=True))
    _app_error(info, "NotFound")


# ---- fraud ---------------------------------------------------------------------------------


def _fraud_input(
    base: Seed, payment_id: str, amount: int = 5_000, shipping: str | None = "US"
) -> FraudCheckInput:
    return FraudCheckInput(
        payment_id=payment_id,
        merchant_id=base.merchant.id,
        customer_id=base.customer.id,
        payment_method_id=base.method.id,
        amount=amount,
        currency="usd",
        shipping_country=shipping,
    )


def test_fraud_velocity_counts_other_recent_payments(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions, max_payments_per_hour=3)
    acts = FraudActivities(sessions)
    current = _seed_payment(sessions, base)
    _seed_payment(sessions, base, created=utcnow() - timedelta(hours=2))  # outside the window
    for _ in range(2):
        _seed_payment(sessions, base)
    result = env.run(acts.check_fraud, _fraud_input(base, current.id))
    assert (result.decision, result.reasons) == ("approve", [])  # 2 others < 3

    _seed_payment(sessions, base)
    result = env.run(acts.check_fraud, _fraud_input(base, current.id))
    assert (result.decision, result.reasons) == ("decline", ["velocity"])

    # another customer's payments do not count against this one
    with sessions() as s, s.begin():
        other = make_customer(s, base.merchant.id)
        other_card = make_payment_method(s, other)
        other_pay = make_payment(s, other_card)
    result = env.run(
        acts.check_fraud,
        FraudCheckInput(other_pay.id, base.merchant.id, other.id, other_card.id, 5_000, "usd", "US"),
    )
    assert result.decision == "approve"


def test_fraud_velocity_lookup_uses_an_index(engine: Engine) -> None:
    """The velocity count runs on every checkout: it must not scan the payments table (with
    50,000 stored payments a scan cost make bench a tenth of its throughput)."""
    query = velocity_query("mer_1", "cus_1", "pay_1")
    compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
            assert "ix_payments_merchant_customer" in plan, plan
        else:  # PostgreSQL scans a tiny table unless told not to; the index must bound the lookup
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(str(r[0]) for r in conn.exec_driver_sql(f"EXPLAIN {compiled}"))
            assert "Index Cond: ((merchant_id)" in plan, plan


def test_fraud_blocklist_platform_and_merchant(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    elsewhere = seed(sessions)
    acts = FraudActivities(sessions)
    pay = _seed_payment(sessions, base)
    inp = _fraud_input(base, pay.id)
    assert env.run(acts.check_fraud, inp).decision == "approve"

    with sessions() as s, s.begin():
        # another merchant's list does not apply here
        s.add(BlocklistEntry(merchant_id=elsewhere.merchant.id, kind="email", value=base.customer.email))
    assert env.run(acts.check_fraud, inp).decision == "approve"

    with sessions() as s, s.begin():
        s.add(BlocklistEntry(merchant_id=None, kind="email", value=base.customer.email.upper()))
    result = env.run(acts.check_fraud, inp)
    assert (result.decision, result.reasons) == ("decline", ["email_blocklisted"])

    with sessions() as s, s.begin():
        s.add(BlocklistEntry(merchant_id=base.merchant.id, kind="fingerprint", value=base.method.fingerprint))
    result = env.run(acts.check_fraud, inp)
    assert (result.decision, result.reasons) == ("decline", ["email_blocklisted", "card_blocklisted"])


def test_fraud_review_amount_and_country(sessions: sessionmaker[Session], env: ActivityEnvironment) -> None:
    base = seed(sessions, review_amount_limit=50_000, country_mismatch_threshold=10_000)
    acts = FraudActivities(sessions)
    pay = _seed_payment(sessions, base)
    assert (
        env.run(acts.check_fraud, _fraud_input(base, pay.id, amount=20_000, shipping="US")).decision
        == "approve"
    )
    result = env.run(acts.check_fraud, _fraud_input(base, pay.id, amount=20_000, shipping="DE"))
    assert (result.decision, result.reasons) == ("review", ["country_mismatch"])
    result = env.run(acts.check_fraud, _fraud_input(base, pay.id, amount=60_000, shipping=None))
    assert (result.decision, result.reasons) == ("review", ["amount_over_limit"])

    with pytest.raises(ApplicationError) as info:
        env.run(
            acts.check_fraud,
            FraudCheckInput(pay.id, "acct_missing", base.customer.id, base.method.id, 1, "usd"),
        )
    _app_error(info, "NotFound")


# ---- ledger --------------------------------------------------------------------------------


def _capture_input(base: Seed, payment: Payment, amount: int | None = None) -> PostCaptureInput:
    return PostCaptureInput(
        payment_id=payment.id,
        merchant_id=base.merchant.id,
        psp="sandbox",
        amount=payment.amount if amount is None else amount,
        currency=payment.currency,
    )


def test_post_capture_succeeds_and_balances_once(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions, fee_bps=290, fee_fixed=30)
    pay = _seed_payment(sessions, base, amount=10_000, status="requires_capture", amount_capturable=10_000)
    acts = LedgerActivities(sessions)
    first = env.run(acts.post_capture, _capture_input(base, pay))
    assert (first.transaction_key, first.fee, first.net) == (f"payment:{pay.id}:capture", 320, 9_680)

    with sessions() as s, s.begin():
        # the merchant's fee changes before a late retry: the retry reports what was posted
        merchant = s.get(Merchant, base.merchant.id)
        assert merchant is not None
        merchant.fee_bps = 100
    again = env.run(acts.post_capture, _capture_input(base, pay))
    assert again == first

    row = _payment(sessions, pay.id)
    assert (row.status, row.amount_received, row.amount_capturable) == ("succeeded", 10_000, 0)
    assert _events(sessions, pay.id) == [("succeeded", "captured and posted to ledger")]
    with sessions() as s:
        assert s.exec(select(func.count()).select_from(LedgerTransaction)).one() == 1
        report = check_ledger(s)
        assert (report.balanced, report.transactions) == (True, 1)
        assert account_view(s, "psp_receivable:sandbox:usd").balance == 10_000
        assert account_view(s, f"merchant_payable:{base.merchant.id}:usd").balance == -9_680
        assert account_view(s, "platform_fees:usd").balance == -320


def test_post_capture_rejects_and_posts_nothing(
    sessions: sessionmaker[Session], env: ActivityEnvironment
) -> None:
    base = seed(sessions)
    acts = LedgerActivities(sessions)
    failed = _seed_payment(sessions, base, status="failed")
    with pytest.raises(ApplicationError) as info:
        env.run(acts.post_capture, _capture_input(base, failed))
    _app_error(info, "LedgerPostingFailed")

    with pytest.raises(ApplicationError) as info:
        env.run(acts.post_capture, PostCaptureInput("pay_missing", base.merchant.id, "sandbox", 100, "usd"))
    _app_error(info, "LedgerPostingFailed")

    ok = _seed_payment(sessions, base, amount=1_000)
    with pytest.raises(ApplicationError) as info:
        env.run(acts.post_capture, _capture_input(base, ok, amount=1_001))  # more than the payment
    _app_error(info, "LedgerPostingFailed")

    with sessions() as s:
        assert s.exec(select(func.count()).select_from(LedgerTransaction)).one() == 0
    assert _payment(sessions, failed.id).status == "failed"
    assert _payment(sessions, ok.id).status == "processing"


# ---- notifications -------------------------------------------------------------------------


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # the name aiosmtpd calls
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp() -> Iterator[tuple[_Inbox, str]]:
    inbox = _Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


def _notifications(sessions: sessionmaker[Session], payment_id: str) -> list[tuple[str, str, str]]:
    with sessions() as s:
        rows = s.exec(select(Notification).where(col(Notification.payment_id) == payment_id)).all()
    return [(r.kind, r.status, r.recipient) for r in rows]


def test_send_receipt_over_smtp_once(
    sessions: sessionmaker[Session], env: ActivityEnvironment, smtp: tuple[_Inbox, str]
) -> None:
    inbox, url = smtp
    base = seed(sessions, name="Acme Books")
    pay = _seed_payment(sessions, base, amount=12_345, status="succeeded", description="The Hobbit")
    acts = NotifyActivities(
        sessions, Settings.model_validate({"smtp_url": url, "mail_from": "receipts@test.local"})
    )

    env.run(acts.send_receipt, ReceiptInput(pay.id))
    env.run(acts.send_receipt, ReceiptInput(pay.id))  # retried: not sent twice

    assert len(inbox.messages) == 1
    mail_from, rcpts, raw = inbox.messages[0]
    assert (mail_from, rcpts) == ("receipts@test.local", [base.customer.email])
    msg = email.message_from_bytes(raw)
    body = msg.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "123.45 USD" in msg["Subject"] and "Acme Books" in msg["Subject"]
    assert "123.45 USD" in body and pay.id in body and "succeeded" in body and "The Hobbit" in body
    assert "4242" in body and "424242" not in body  # last4 only, never more of the card
    assert _notifications(sessions, pay.id) == [("receipt", "sent", base.customer.email)]
    assert _events(sessions, pay.id) == [("succeeded", "receipt emailed")]

    # another kind is its own notification
    env.run(acts.send_receipt, ReceiptInput(pay.id, kind="payment_failed"))
    assert len(inbox.messages) == 2
    assert "failed" in email.message_from_bytes(inbox.messages[1][2])["Subject"]


def test_send_receipt_logged_without_smtp(
    sessions: sessionmaker[Session], env: ActivityEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    base = seed(sessions)
    pay = _seed_payment(sessions, base, amount=500, currency="jpy", status="succeeded")
    acts = NotifyActivities(sessions, Settings.model_validate({"smtp_url": ""}))
    with caplog.at_level(logging.INFO, logger="paysaga.notify"):
        env.run(acts.send_receipt, ReceiptInput(pay.id))
        env.run(acts.send_receipt, ReceiptInput(pay.id))
    logged = [r for r in caplog.records if r.name == "paysaga.notify"]
    assert len(logged) == 1
    text = logged[0].getMessage()
    assert pay.id in text and "500 JPY" in text  # the subject
    assert "4242" not in text and "Status:" not in text  # no body
    assert base.customer.email not in text  # the address is masked
    assert _notifications(sessions, pay.id) == [("receipt", "logged", base.customer.email)]
    assert _events(sessions, pay.id) == [("succeeded", "receipt logged")]

    with pytest.raises(ApplicationError) as info:
        env.run(acts.send_receipt, ReceiptInput("pay_missing"))
    _app_error(info, "NotFound")
