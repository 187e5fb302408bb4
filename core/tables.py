"""The application database schema (SQLModel). Alembic migrations in core/migrations create it.

Conventions: ids are prefixed strings made by core.ids.new_id (time-ordered, so ORDER BY id is
creation order); money is BIGINT minor units plus a lower-case currency; timestamps are UTC.
Balances are never stored: they are sums of ledger_entries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, String, TypeDecorator, UniqueConstraint
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite hands back naive datetimes otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False, **kw))


def _money() -> Any:
    return Field(sa_column=Column(BigInteger, nullable=False))


def _json(default: Any) -> Any:
    return Field(default_factory=default, sa_column=Column(JSON, nullable=False))


def _metadata() -> Any:
    return Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))


class Merchant(SQLModel, table=True):
    __tablename__ = "merchants"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    fee_bps: int = 290
    fee_fixed: int = 30
    # fraud settings (domain.fraud.FraudPolicy)
    review_amount_limit: int = Field(default=100_000, sa_column=Column(BigInteger, nullable=False))
    max_payments_per_hour: int = 20
    country_mismatch_threshold: int = Field(default=50_000, sa_column=Column(BigInteger, nullable=False))
    # refunds: "keep" (the platform keeps its processing fee, the merchant refunds the gross) or
    # "return" (the fee share of the refunded amount goes back to the merchant)
    refund_fee_policy: str = Field(default="keep", max_length=10)
    chargeback_fee: int = Field(default=1500, sa_column=Column(BigInteger, nullable=False))
    # PSP routing rules (domain.routing.RoutingRule.to_json, first match wins); empty: the
    # platform's default order
    routing_rules: list[dict[str, Any]] = _json(list)
    created: datetime = _ts()


class Operator(SQLModel, table=True):
    __tablename__ = "operators"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    created: datetime = _ts()


class ApiKey(SQLModel, table=True):
    """A secret key, stored as its SHA-256 hash; belongs to a merchant XOR an operator."""

    __tablename__ = "api_keys"
    key_hash: str = Field(primary_key=True, max_length=64)
    prefix: str = Field(max_length=16)  # first chars, to tell keys apart in listings
    merchant_id: str | None = Field(default=None, foreign_key="merchants.id", index=True)
    operator_id: str | None = Field(default=None, foreign_key="operators.id", index=True)
    created: datetime = _ts()
    revoked: bool = False


class Customer(SQLModel, table=True):
    __tablename__ = "customers"
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id", index=True)
    email: str = Field(max_length=320)
    name: str | None = Field(default=None, max_length=200)
    country: str | None = Field(default=None, max_length=2)
    metadata_: dict[str, str] = _metadata()
    created: datetime = _ts()


class PaymentMethod(SQLModel, table=True):
    """A tokenized card. Holds the PSP token and display fields; never the number or cvc."""

    __tablename__ = "payment_methods"
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id", index=True)
    customer_id: str = Field(foreign_key="customers.id", index=True)
    type: str = "card"
    psp: str = Field(max_length=20)  # the primary PSP: its token is psp_token
    psp_token: str = Field(max_length=100)
    # {psp: token} at every PSP that tokenized the card (the primary included): a token works only
    # at the PSP that issued it, so routing can send the payment only where the card has one
    psp_tokens: dict[str, str] = _json(dict)
    brand: str = Field(max_length=20)
    funding: str = Field(max_length=10)
    last4: str = Field(max_length=4)
    exp_month: int
    exp_year: int
    country: str = Field(max_length=2)
    fingerprint: str = Field(max_length=64, index=True)
    created: datetime = _ts()


class Product(SQLModel, table=True):
    __tablename__ = "products"
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id", index=True)
    name: str = Field(max_length=200)
    price: int = _money()
    currency: str = Field(max_length=3)
    stock: int  # available units: reservations take from it, releases give back
    created: datetime = _ts()


class Cart(SQLModel, table=True):
    __tablename__ = "carts"
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id", index=True)
    customer_id: str = Field(foreign_key="customers.id")
    status: str = "open"  # open | checked_out
    # set once, atomically, by the first checkout: the cart id is the natural idempotency key
    order_id: str | None = Field(default=None, max_length=40)
    payment_id: str | None = Field(default=None, max_length=40)
    created: datetime = _ts()


class CartItem(SQLModel, table=True):
    __tablename__ = "cart_items"
    cart_id: str = Field(foreign_key="carts.id", primary_key=True, max_length=40)
    product_id: str = Field(foreign_key="products.id", primary_key=True, max_length=40)
    quantity: int


class Order(SQLModel, table=True):
    __tablename__ = "orders"
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id", index=True)
    customer_id: str = Field(foreign_key="customers.id")
    cart_id: str = Field(foreign_key="carts.id", unique=True, max_length=40)
    payment_id: str = Field(max_length=40)
    amount: int = _money()
    currency: str = Field(max_length=3)
    status: str = "pending"  # pending | confirmed | canceled
    items: list[dict[str, Any]] = _json(list)  # [{product, name, quantity, unit_price}]
    shipping_address: dict[str, Any] = _json(dict)
    created: datetime = _ts()


class StockReservation(SQLModel, table=True):
    """One row per (order, product): makes reserve / release / commit idempotent."""

    __tablename__ = "stock_reservations"
    order_id: str = Field(primary_key=True, max_length=40)
    product_id: str = Field(foreign_key="products.id", primary_key=True, max_length=40)
    quantity: int
    status: str = "reserved"  # reserved | released | committed
    updated: datetime = _ts()


class Payment(SQLModel, table=True):
    __tablename__ = "payments"
    __table_args__ = (
        Index("ix_payments_merchant_customer", "merchant_id", "customer_id", "id"),
        Index("ix_payments_merchant_status", "merchant_id", "status", "id"),
        # a PSP's webhook names its own payment id (refunds, disputes): found without a scan
        Index("ix_payments_psp_payment", "psp", "psp_payment_id"),
    )
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id")
    customer_id: str = Field(foreign_key="customers.id")
    payment_method_id: str = Field(foreign_key="payment_methods.id")
    order_id: str | None = Field(default=None, max_length=40)
    amount: int = _money()
    currency: str = Field(max_length=3)
    status: str = Field(max_length=24)
    capture_method: str = Field(max_length=10)
    amount_capturable: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    amount_received: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    psp: str = Field(max_length=20)
    psp_payment_id: str | None = Field(default=None, max_length=100)
    failure_code: str | None = Field(default=None, max_length=40)
    decline_code: str | None = Field(default=None, max_length=40)
    failure_message: str | None = None
    next_action: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    description: str | None = Field(default=None, max_length=1000)
    metadata_: dict[str, str] = _metadata()
    workflow_id: str = Field(max_length=100)
    idempotency_key: str | None = Field(default=None, max_length=255)
    created: datetime = _ts()
    updated: datetime = _ts()


class PaymentEvent(SQLModel, table=True):
    """The payment timeline: each status change and notable step, in order."""

    __tablename__ = "payment_events"
    id: int | None = Field(default=None, primary_key=True)
    payment_id: str = Field(foreign_key="payments.id", index=True, max_length=40)
    status: str = Field(max_length=24)
    reason: str | None = None
    created: datetime = _ts()


class Notification(SQLModel, table=True):
    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("payment_id", "kind", name="uq_notifications_payment_kind"),)
    id: int | None = Field(default=None, primary_key=True)
    payment_id: str = Field(max_length=40, index=True)
    kind: str = Field(max_length=30)  # receipt | payment_failed | action_required
    channel: str = Field(default="email", max_length=10)
    recipient: str = Field(max_length=320)
    subject: str = Field(max_length=200)
    status: str = Field(max_length=10)  # sent | logged
    created: datetime = _ts()


class LedgerTransaction(SQLModel, table=True):
    __tablename__ = "ledger_transactions"
    # e.g. payment:{id}:capture; posting is idempotent by it
    key: str = Field(primary_key=True, max_length=200)
    kind: str = Field(max_length=30)
    ref: str = Field(max_length=100, index=True)
    created_at: datetime = _ts()


class LedgerEntry(SQLModel, table=True):
    __tablename__ = "ledger_entries"
    id: int | None = Field(default=None, primary_key=True)
    transaction_key: str = Field(foreign_key="ledger_transactions.key", index=True, max_length=200)
    account: str = Field(sa_column=Column(String(200), nullable=False, index=True))
    currency: str = Field(max_length=3)
    amount: int = _money()  # signed: debit positive, credit negative


class BlocklistEntry(SQLModel, table=True):
    __tablename__ = "blocklist"
    __table_args__ = (UniqueConstraint("merchant_id", "kind", "value", name="uq_blocklist"),)
    id: int | None = Field(default=None, primary_key=True)
    merchant_id: str | None = Field(default=None, max_length=40)  # None: platform-wide
    kind: str = Field(max_length=20)  # email | fingerprint
    value: str = Field(max_length=320)
    created: datetime = _ts()


class IdempotencyKey(SQLModel, table=True):
    """API-level idempotency: (merchant, key) -> the request's hash and its stored response."""

    __tablename__ = "idempotency_keys"
    merchant_id: str = Field(primary_key=True, max_length=40)
    key: str = Field(primary_key=True, max_length=255)
    request_hash: str = Field(max_length=64)
    method_path: str = Field(max_length=200)
    resource_id: str | None = Field(default=None, max_length=40)  # the payment id this key created
    status: str = Field(default="in_flight", max_length=10)  # in_flight | done
    response_status: int | None = None
    response_body: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created: datetime = _ts()
    locked_until: datetime = _ts()


class Refund(SQLModel, table=True):
    """A refund of (part of) a captured payment. Created pending inside the transaction that
    checks refundable = captured - refunded - pending under the payment's row lock, so concurrent
    refunds can never exceed the captured amount."""

    __tablename__ = "refunds"
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id", index=True)
    payment_id: str = Field(foreign_key="payments.id", index=True, max_length=40)
    amount: int = _money()
    currency: str = Field(max_length=3)
    reason: str | None = Field(default=None, max_length=40)
    status: str = Field(default="pending", max_length=10)  # pending | succeeded | failed
    psp_refund_id: str | None = Field(default=None, max_length=100)
    failure_reason: str | None = None
    return_id: str | None = Field(default=None, max_length=40)
    workflow_id: str = Field(max_length=100)
    metadata_: dict[str, str] = _metadata()
    created: datetime = _ts()
    updated: datetime = _ts()


class Return(SQLModel, table=True):
    __tablename__ = "returns"
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id", index=True)
    order_id: str = Field(foreign_key="orders.id", index=True, max_length=40)
    status: str = Field(default="authorized", max_length=12)  # authorized | received | refunded | expired
    items: list[dict[str, Any]] = _json(list)  # [{product, quantity, unit_price}]
    amount: int = _money()
    currency: str = Field(max_length=3)
    refund_id: str | None = Field(default=None, max_length=40)
    workflow_id: str = Field(max_length=100)
    expires_at: datetime = _ts()
    created: datetime = _ts()
    updated: datetime = _ts()


class Dispute(SQLModel, table=True):
    __tablename__ = "disputes"
    id: str = Field(primary_key=True, max_length=40)
    merchant_id: str = Field(foreign_key="merchants.id", index=True)
    payment_id: str = Field(foreign_key="payments.id", index=True, max_length=40)
    psp: str = Field(max_length=20)
    psp_dispute_id: str = Field(max_length=100, unique=True)
    amount: int = _money()
    currency: str = Field(max_length=3)
    reason: str | None = Field(default=None, max_length=40)
    # needs_response | under_review | won | lost
    status: str = Field(default="needs_response", max_length=16)
    evidence: dict[str, Any] = _json(dict)
    evidence_due_by: datetime = _ts()
    workflow_id: str = Field(max_length=100)
    created: datetime = _ts()
    updated: datetime = _ts()


class PspEvent(SQLModel, table=True):
    """PSP webhook events already applied: deduplicates redelivered events by their id."""

    __tablename__ = "psp_events"
    id: str = Field(primary_key=True, max_length=100)
    psp: str = Field(max_length=20)
    type: str = Field(max_length=60)
    received: datetime = _ts()
