"""What crosses the Temporal boundary: workflow ids, task queue, activity names and the one typed
input / one typed result of every workflow, update and activity.

Imported by the API (to start and talk to workflows), by workflows, and by activities. Holds no
card data: card numbers end at the PSP token; only our ids and PSP tokens travel through Temporal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from temporalio.common import SearchAttributeKey

TASK_QUEUE = "paysaga"
CHECKOUT_WORKFLOW = "CheckoutWorkflow"

# Search attributes operators filter on in the Temporal UI. Never personal or card data here.
SA_PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
SA_MERCHANT_ID = SearchAttributeKey.for_keyword("MerchantId")
SA_AMOUNT_MINOR = SearchAttributeKey.for_int("AmountMinor")
SA_CURRENCY = SearchAttributeKey.for_keyword("Currency")
SEARCH_ATTRIBUTES = (SA_PAYMENT_STATUS, SA_MERCHANT_ID, SA_AMOUNT_MINOR, SA_CURRENCY)

CaptureMethod = Literal["automatic", "manual"]
FraudDecision = Literal["approve", "review", "decline"]
ReviewVerdict = Literal["approve", "reject"]


def checkout_workflow_id(payment_id: str) -> str:
    return f"checkout:{payment_id}"


# ---- activity names (workflows call activities by name; tests register mocks under them) ----


class Act:
    CREATE_PAYMENT = "create_payment"
    UPDATE_PAYMENT = "update_payment"
    RESERVE_STOCK = "reserve_stock"
    RELEASE_STOCK = "release_stock"
    CONFIRM_ORDER = "confirm_order"
    CHECK_FRAUD = "check_fraud"
    AUTHORIZE_PAYMENT = "authorize_payment"
    AUTHENTICATE_PAYMENT = "authenticate_payment"
    CAPTURE_PAYMENT = "capture_payment"
    VOID_PAYMENT = "void_payment"
    REFUND_PAYMENT = "refund_payment"
    LOOKUP_PSP_PAYMENT = "lookup_psp_payment"
    POST_CAPTURE = "post_capture"
    SEND_RECEIPT = "send_receipt"


class Upd:
    """CheckoutWorkflow update and query names (the API calls them by name)."""

    WAIT_FOR_STABLE = "wait_for_stable"  # Update-with-Start: answers at the first stable status
    AUTHENTICATE = "authenticate"
    CAPTURE = "capture"
    CANCEL = "cancel"
    REVIEW = "review"
    QUERY_STATE = "state"


# ---- CheckoutWorkflow ----


@dataclass
class CartLine:
    product_id: str
    quantity: int


@dataclass
class CheckoutInput:
    payment_id: str
    merchant_id: str
    customer_id: str
    payment_method_id: str
    psp: str
    psp_token: str  # the PSP's token for the saved card; never the card itself
    amount: int  # minor units
    currency: str  # lower-case ISO 4217
    capture_method: CaptureMethod = "automatic"
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    # cart checkouts only
    order_id: str | None = None
    items: list[CartLine] = field(default_factory=list)
    shipping_country: str | None = None


@dataclass
class NextAction:
    type: Literal["otp", "redirect_to_url"]
    url: str | None = None


@dataclass
class PaymentState:
    """What the workflow believes about its payment; returned by every update and the query."""

    payment_id: str
    status: str  # domain.states.PaymentStatus value
    review_pending: bool = False
    failure_code: str | None = None  # card_declined | fraud_declined | out_of_stock | ...
    decline_code: str | None = None  # generic_decline | insufficient_funds | fraudulent | ...
    message: str | None = None
    next_action: NextAction | None = None
    amount_capturable: int = 0
    amount_received: int = 0
    psp_payment_id: str | None = None


@dataclass
class CheckoutResult:
    payment_id: str
    status: str
    failure_code: str | None = None
    decline_code: str | None = None
    amount_received: int = 0


# Update / signal payloads


@dataclass
class AuthenticateRequest:
    otp: str


@dataclass
class CaptureRequest:
    amount: int | None = None  # None = the whole authorized amount


@dataclass
class CancelRequest:
    reason: str = "requested_by_customer"


@dataclass
class ReviewRequest:
    decision: ReviewVerdict
    operator_id: str


# ---- activity inputs / results ----


@dataclass
class CreatePaymentInput:
    payment_id: str
    merchant_id: str
    customer_id: str
    payment_method_id: str
    psp: str
    amount: int
    currency: str
    capture_method: CaptureMethod
    workflow_id: str
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    order_id: str | None = None
    idempotency_key: str | None = None


@dataclass
class PaymentUpdate:
    """A status change (or a note on the timeline when status is unchanged)."""

    payment_id: str
    status: str
    reason: str | None = None
    psp_payment_id: str | None = None
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None
    next_action: NextAction | None = None
    amount_capturable: int | None = None
    amount_received: int | None = None


@dataclass
class StockInput:
    order_id: str
    items: list[CartLine]


@dataclass
class ConfirmOrderInput:
    order_id: str
    payment_id: str
    confirmed: bool  # True: commit stock, order confirmed; False: order canceled (stock already released)


@dataclass
class FraudCheckInput:
    payment_id: str
    merchant_id: str
    customer_id: str
    payment_method_id: str
    amount: int
    currency: str
    shipping_country: str | None = None


@dataclass
class FraudCheckResult:
    decision: FraudDecision
    reasons: list[str] = field(default_factory=list)


@dataclass
class AuthorizeInput:
    payment_id: str
    psp: str
    psp_token: str
    amount: int
    currency: str
    description: str | None = None


@dataclass
class AuthenticateInput:
    payment_id: str
    psp: str
    psp_payment_id: str
    otp: str


@dataclass
class CaptureInput:
    payment_id: str
    psp: str
    psp_payment_id: str
    amount: int


@dataclass
class VoidInput:
    payment_id: str
    psp: str
    psp_payment_id: str


@dataclass
class RefundInput:
    payment_id: str
    psp: str
    psp_payment_id: str
    amount: int
    idempotency_key: str  # stable, e.g. "{payment_id}:compensate_refund"


@dataclass
class LookupInput:
    payment_id: str
    psp: str


@dataclass
class PSPResult:
    """A PSP's view of one payment after a call. A decline is a result, not an exception."""

    psp_payment_id: str
    status: Literal["requires_action", "authorized", "captured", "canceled", "failed", "refunded"]
    amount: int
    amount_captured: int = 0
    amount_refunded: int = 0
    decline_code: str | None = None
    message: str | None = None
    next_action: NextAction | None = None


@dataclass
class PostCaptureInput:
    payment_id: str
    merchant_id: str
    psp: str
    amount: int  # captured amount, minor units
    currency: str


@dataclass
class PostCaptureResult:
    transaction_key: str
    fee: int
    net: int


@dataclass
class ReceiptInput:
    payment_id: str
    kind: Literal["receipt", "payment_failed", "action_required"] = "receipt"
