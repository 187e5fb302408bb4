"""Request (``XxxCreate``) and response (``XxxPublic``) models, Stripe conventions.

Inputs forbid unknown fields and use strict types: an amount sent as 12.5 or "1250" is a 400,
never silently coerced (a coerced float is how 0.1 + 0.2 ends up on someone's card statement).
Outputs carry ``id`` with a type prefix, ``object``, ``created`` (unix seconds), ``livemode``
and ``metadata``; amounts are integer minor units with a lower-case currency.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from domain.money import MAX_AMOUNT_MINOR, MoneyError, normalize_currency

# ISO 3166-1 alpha-2, all officially assigned codes (from the tz database's iso3166.tab).
ISO_COUNTRIES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS
    BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG
    EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR
    HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR
    LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG
    NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE
    SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA
    UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW""".split()
)

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")

METADATA_MAX_KEYS = 50
METADATA_KEY_MAX = 40
METADATA_VALUE_MAX = 500


# ---- field validators (messages never quote the submitted value) ----


def _currency(value: str) -> str:
    try:
        return normalize_currency(value)
    except MoneyError:
        raise ValueError("must be a supported ISO 4217 currency code") from None


def _country(value: str) -> str:
    code = value.strip().upper()
    if code not in ISO_COUNTRIES:
        raise ValueError("must be an ISO 3166-1 alpha-2 country code")
    return code


def _amount(value: int) -> int:
    if value <= 0:
        raise ValueError("must be a positive integer in the currency's minor unit")
    if value > MAX_AMOUNT_MINOR:
        raise ValueError("is too large")
    return value


def _price(value: int) -> int:
    if value < 0:
        raise ValueError("must be zero or a positive integer in the currency's minor unit")
    if value > MAX_AMOUNT_MINOR:
        raise ValueError("is too large")
    return value


def _email(value: str) -> str:
    value = value.strip()
    if len(value) > 320 or not _EMAIL.match(value):
        raise ValueError("must be an email address")
    return value


def _metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"may have at most {METADATA_MAX_KEYS} keys")
    for key, item in value.items():
        if not key or len(key) > METADATA_KEY_MAX:
            raise ValueError(f"keys must be 1 to {METADATA_KEY_MAX} characters")
        if len(item) > METADATA_VALUE_MAX:
            raise ValueError(f"values must be at most {METADATA_VALUE_MAX} characters")
    return value


Currency = Annotated[StrictStr, AfterValidator(_currency)]
Country = Annotated[StrictStr, AfterValidator(_country)]
Amount = Annotated[StrictInt, AfterValidator(_amount)]
Price = Annotated[StrictInt, AfterValidator(_price)]
Email = Annotated[StrictStr, AfterValidator(_email)]
Metadata = Annotated[dict[StrictStr, StrictStr], AfterValidator(_metadata)]
ObjectId = Annotated[StrictStr, Field(min_length=1, max_length=64)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=200)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- inputs ----


class CustomerCreate(_In):
    email: Email
    name: Text | None = None
    country: Country | None = None
    metadata: Metadata = Field(default_factory=dict)


class CardCreate(_In):
    # repr=False: a model printed in a traceback or debug log must not show the card.
    number: StrictStr = Field(min_length=1, max_length=64, repr=False)
    exp_month: StrictInt
    exp_year: StrictInt
    cvc: StrictStr = Field(min_length=1, max_length=16, repr=False)
    name: Text | None = None


class NetbankingCreate(_In):
    bank: Annotated[StrictStr, Field(pattern=r"^[a-z0-9_]{2,20}$", description="the bank's code")]


PaymentMethodType = Literal["card", "wallet", "netbanking"]


class PaymentMethodCreate(_In):
    """`card` for type card, `netbanking` for type netbanking, neither for a wallet (the customer
    approves each payment on the wallet's page)."""

    type: PaymentMethodType
    customer: ObjectId
    card: CardCreate | None = None
    netbanking: NetbankingCreate | None = None


class ProductCreate(_In):
    name: Text
    price: Price
    currency: Currency
    stock: StrictInt = Field(ge=0, le=10_000_000)


class CartCreate(_In):
    customer: ObjectId


class CartItemCreate(_In):
    product: ObjectId
    quantity: StrictInt = Field(gt=0, le=10_000)


class ShippingAddress(_In):
    line1: Text
    line2: Text | None = None
    city: Text
    postal_code: Annotated[StrictStr, Field(min_length=1, max_length=20)]
    country: Country


class CheckoutCreate(_In):
    payment_method: ObjectId
    shipping_address: ShippingAddress


class PaymentCreate(_In):
    amount: Amount
    currency: Currency
    customer: ObjectId
    payment_method: ObjectId
    capture_method: Literal["automatic", "manual"] = "automatic"
    description: Annotated[StrictStr, Field(max_length=1000)] | None = None
    metadata: Metadata = Field(default_factory=dict)


class AuthenticateCreate(_In):
    otp: Annotated[StrictStr, Field(min_length=1, max_length=32)]


class CaptureCreate(_In):
    amount: Amount | None = None


class CancelCreate(_In):
    cancellation_reason: Literal["duplicate", "fraudulent", "requested_by_customer", "abandoned"] | None = (
        None
    )


class ReviewCreate(_In):
    decision: Literal["approve", "reject"]


# ---- outputs ----


class _Out(BaseModel):
    livemode: bool = False


class CustomerPublic(_Out):
    id: str
    object: Literal["customer"] = "customer"
    email: str
    name: str | None
    country: str | None
    metadata: dict[str, str]
    created: int


class CardPublic(BaseModel):
    brand: str
    funding: str
    last4: str
    exp_month: int
    exp_year: int
    country: str
    fingerprint: str


class WalletPublic(BaseModel):
    provider: str


class NetbankingPublic(BaseModel):
    bank: str


class PaymentMethodPublic(_Out):
    """The sub-object named by `type` is set (`card`, `wallet` or `netbanking`); the others are null."""

    id: str
    object: Literal["payment_method"] = "payment_method"
    type: PaymentMethodType = "card"
    customer: str
    card: CardPublic | None = None
    wallet: WalletPublic | None = None
    netbanking: NetbankingPublic | None = None
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)


class ProductPublic(_Out):
    id: str
    object: Literal["product"] = "product"
    name: str
    price: int
    currency: str
    stock: int
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)


class CartItemPublic(BaseModel):
    product: str
    name: str
    quantity: int
    unit_price: int
    amount: int
    currency: str


class CartPublic(_Out):
    id: str
    object: Literal["cart"] = "cart"
    customer: str
    status: str
    items: list[CartItemPublic]
    amount: int
    currency: str | None
    order: str | None
    payment: str | None
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)


class NextActionPublic(BaseModel):
    type: Literal["otp", "redirect_to_url"]
    url: str | None = None


class PaymentErrorPublic(BaseModel):
    code: str
    decline_code: str | None
    message: str | None


class TimelineEntry(BaseModel):
    status: str
    time: int
    reason: str | None


class PaymentPublic(_Out):
    id: str
    object: Literal["payment"] = "payment"
    amount: int
    amount_capturable: int
    amount_received: int
    currency: str
    status: str
    capture_method: str
    customer: str
    payment_method: str
    order: str | None
    description: str | None
    metadata: dict[str, str]
    next_action: NextActionPublic | None
    last_payment_error: PaymentErrorPublic | None
    workflow_id: str
    timeline: list[TimelineEntry]
    created: int


class OrderItemPublic(BaseModel):
    product: str
    name: str
    quantity: int
    unit_price: int


class OrderPublic(_Out):
    id: str
    object: Literal["order"] = "order"
    cart: str
    customer: str
    status: str
    amount: int
    currency: str
    items: list[OrderItemPublic]
    shipping_address: dict[str, Any]
    payment: PaymentPublic | None
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)


T = TypeVar("T")


class ListPublic(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    url: str


class LedgerEntryPublic(BaseModel):
    transaction_key: str
    kind: str
    ref: str
    amount: int
    created: int


class LedgerAccountPublic(BaseModel):
    object: Literal["ledger_account"] = "ledger_account"
    account: str
    currency: str
    balance: int
    entries: list[LedgerEntryPublic]


class LedgerCheckPublic(BaseModel):
    object: Literal["ledger_check"] = "ledger_check"
    balanced: bool
    transactions: int
    unbalanced: list[dict[str, Any]]


class HealthPublic(BaseModel):
    status: Literal["ok", "degraded"]
    database: str
    temporal: str


# ---- disputes ----


class DisputeEvidenceCreate(_In):
    # the text fields of domain.disputes.EVIDENCE_FIELDS; checked there (unknown keys are a 400)
    evidence: Annotated[dict[StrictStr, Annotated[StrictStr, Field(max_length=20_000)]], Field(max_length=50)]


class DisputePublic(_Out):
    id: str
    object: Literal["dispute"] = "dispute"
    amount: int
    currency: str
    payment: str
    reason: str | None
    status: Literal["needs_response", "under_review", "won", "lost"]
    evidence: dict[str, Any]
    evidence_due_by: int
    workflow_id: str
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)


# ---- refunds and returns ----

RefundReason = Literal["duplicate", "fraudulent", "requested_by_customer"]


class RefundCreate(_In):
    payment: ObjectId
    amount: Amount | None = None  # None: everything still refundable
    reason: RefundReason | None = None
    metadata: Metadata = Field(default_factory=dict)


class RefundPublic(_Out):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    object: Literal["refund"] = "refund"
    amount: int
    currency: str
    payment: str
    status: Literal["pending", "succeeded", "failed"]
    reason: str | None
    failure_reason: str | None
    # the return this refund pays back, if any ("return" is a Python keyword)
    return_: str | None = Field(default=None, alias="return")
    workflow_id: str
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)


class ReturnItemCreate(_In):
    product: ObjectId
    quantity: StrictInt = Field(gt=0, le=10_000)


class ReturnCreate(_In):
    items: list[ReturnItemCreate] = Field(min_length=1, max_length=100)


class ReturnItemPublic(BaseModel):
    product: str
    quantity: int
    unit_price: int


class ReturnPublic(_Out):
    id: str
    object: Literal["return"] = "return"
    order: str
    status: Literal["authorized", "received", "refunded", "expired"]
    items: list[ReturnItemPublic]
    amount: int  # value of the items at the order's prices; the refund is at most what is refundable
    currency: str
    refund: RefundPublic | None
    expires_at: int  # unix seconds: not received by then, the return expires
    workflow_id: str
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)
