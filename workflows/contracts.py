"""What crosses the Temporal boundary: workflow ids, task queue, activity names and the one typed
input / one typed result of every workflow, update and activity.

Imported by the API (to start and talk to workflows), by workflows, and by activities. Holds no
card data: card numbers end at the PSP token; only our ids and PSP tokens travel through Temporal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
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
    CHOOSE_PSP = "choose_psp"  # routing: the first candidate PSP whose circuit is not open


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
    # routing (workflows/failover.py): the card's token at each PSP that holds one, and the ordered
    # candidate PSPs from the merchant's rules. Fewer than two candidates: authorize at `psp`.
    psp_tokens: dict[str, str] = field(default_factory=dict)
    route: list[str] = field(default_factory=list)


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
    psp: str | None = None  # routing chose another PSP than the one the payment was created with


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
    psp_payment_id: str | None = None  # stored on the payment: refunds and webhooks find it by it


@dataclass
class PostCaptureResult:
    transaction_key: str
    fee: int
    net: int


@dataclass
class ReceiptInput:
    payment_id: str
    kind: Literal["receipt", "payment_failed", "action_required"] = "receipt"


# ---- disputes and PSP events ----

DISPUTE_WORKFLOW = "DisputeWorkflow"
# Signal into the workflow that owns a payment (checkout:{payment}) for each PSP webhook about it.
PSP_EVENT_SIGNAL = "psp_event"

DisputeStatusName = Literal["needs_response", "under_review", "won", "lost"]
DisputeOutcomeName = Literal["won", "lost"]


def dispute_workflow_id(dispute_id: str) -> str:
    return f"dispute:{dispute_id}"


class DisputeAct:
    """DisputeWorkflow activity names."""

    OPEN_DISPUTE = "open_dispute"  # dispute row + reserve posting + payment disputed, one DB transaction
    UPDATE_DISPUTE = "update_dispute"  # a status change without money (under_review)
    CLOSE_DISPUTE = "close_dispute"  # outcome posting + dispute and payment status, one DB transaction
    NOTIFY_DISPUTE = "notify_dispute"
    SUBMIT_DISPUTE_EVIDENCE = "submit_dispute_evidence"  # PSP
    LOOKUP_PSP_DISPUTE = "lookup_psp_dispute"  # PSP


class DisputeUpd:
    """DisputeWorkflow update, signal and query names."""

    SUBMIT_EVIDENCE = "submit_evidence"  # update: the merchant's evidence, until the deadline
    OUTCOME = "dispute_outcome"  # signal: the PSP's decision (webhook)
    QUERY_STATE = "state"


@dataclass
class PSPEvent:
    """One PSP webhook event, as signalled to the workflow that owns the object."""

    id: str  # the PSP's event id (evt_...)
    type: str  # payment.captured, refund.succeeded, dispute.closed, ...
    psp: str
    object_id: str  # the PSP's id of the object the event is about
    status: str | None = None  # that object's status in the event
    created: int = 0  # unix seconds, the PSP's clock


@dataclass
class DisputeInput:
    """Also the input of open_dispute: the workflow's first activity creates the dispute row if
    the webhook receiver has not committed it yet, so the workflow never depends on that commit."""

    dispute_id: str
    payment_id: str
    merchant_id: str
    psp: str
    psp_dispute_id: str
    amount: int  # minor units
    currency: str
    reason: str | None = None
    evidence_due_by: int = 0  # unix seconds; 0 = the default window from the start


@dataclass
class DisputeState:
    dispute_id: str
    status: DisputeStatusName
    evidence_submitted: bool = False
    evidence_due_by: int = 0  # unix seconds: when the deadline timer fires
    outcome: DisputeOutcomeName | None = None


@dataclass
class DisputeResult:
    dispute_id: str
    status: DisputeOutcomeName
    chargeback_fee: int = 0


@dataclass
class EvidenceRequest:
    evidence: dict[str, str]


@dataclass
class DisputeOutcome:
    status: DisputeOutcomeName
    event_id: str | None = None


@dataclass
class OpenDisputeResult:
    reserve_key: str
    payment_status: str


@dataclass
class DisputeStatusUpdate:
    dispute_id: str
    status: DisputeStatusName
    evidence: dict[str, str] | None = None  # stored with the status when given
    note: str | None = None  # payment timeline entry


@dataclass
class CloseDisputeInput:
    dispute_id: str
    outcome: DisputeOutcomeName


@dataclass
class CloseDisputeResult:
    transaction_key: str
    chargeback_fee: int
    payment_status: str


@dataclass
class DisputeNotice:
    dispute_id: str
    kind: Literal["dispute_opened", "dispute_won", "dispute_lost"]


@dataclass
class SubmitEvidenceInput:
    dispute_id: str
    psp: str
    psp_dispute_id: str
    evidence: dict[str, str]  # empty: conceded (no evidence by the deadline)


@dataclass
class LookupDisputeInput:
    psp: str
    psp_dispute_id: str


@dataclass
class PSPDisputeResult:
    psp_dispute_id: str
    status: DisputeStatusName
    amount: int


# ---- refunds and returns ----

REFUND_WORKFLOW = "RefundWorkflow"
RETURN_WORKFLOW = "ReturnWorkflow"
# How long a customer has to send an authorized return back; unreceived after that, it expires.
RETURN_WINDOW = timedelta(days=30)

RefundStatusName = Literal["pending", "succeeded", "failed"]
ReturnStatusName = Literal["authorized", "received", "refunded", "expired"]
RefundNoticeKind = Literal["refund_succeeded", "refund_failed"]


def refund_workflow_id(refund_id: str) -> str:
    return f"refund:{refund_id}"


def return_workflow_id(return_id: str) -> str:
    return f"return:{return_id}"


class RefundAct:
    """RefundWorkflow / ReturnWorkflow activity names (the PSP call itself is Act.REFUND_PAYMENT)."""

    COMPLETE_REFUND = "complete_refund"  # ledger reversal + refund succeeded + payment status, one DB txn
    FAIL_REFUND = "fail_refund"  # refund failed: its pending amount is released, ledger untouched
    SEND_REFUND_NOTICE = "send_refund_notice"
    RECEIVE_RETURN = "receive_return"  # return received + stock back, one DB txn
    CREATE_RETURN_REFUND = "create_return_refund"  # the return's refund row, under the payment lock
    FINISH_RETURN = "finish_return"
    EXPIRE_RETURN = "expire_return"


class ReturnUpd:
    """ReturnWorkflow update and query names."""

    RECEIVE = "receive"  # operator: the items arrived; answers once the refund is settled
    QUERY_STATE = "state"


@dataclass
class RefundWorkflowInput:
    """The refund row already exists (pending) when the workflow starts: whoever created it checked
    the refundable amount under the payment's row lock."""

    refund_id: str
    payment_id: str
    merchant_id: str
    psp: str
    psp_payment_id: str | None  # None: not recorded on the payment; the workflow looks it up at the PSP
    amount: int  # minor units
    currency: str
    return_id: str | None = None


@dataclass
class RefundWorkflowResult:
    refund_id: str
    status: RefundStatusName
    failure_reason: str | None = None
    payment_status: str | None = None  # the payment's status after a successful refund


@dataclass
class CompleteRefundInput:
    refund_id: str


@dataclass
class CompleteRefundResult:
    transaction_key: str
    fee_returned: int
    payment_status: str


@dataclass
class FailRefundInput:
    refund_id: str
    reason: str  # short code stored as the refund's failure_reason (declined, unknown, ...)
    message: str | None = None  # the PSP's words, for the payment timeline


@dataclass
class RefundNoticeInput:
    refund_id: str
    kind: RefundNoticeKind


@dataclass
class ReturnWorkflowInput:
    return_id: str
    order_id: str
    merchant_id: str
    expires_at: datetime  # UTC; the workflow's timer fires then


@dataclass
class ReceiveRequest:
    operator_id: str


@dataclass
class ReturnState:
    """What the ReturnWorkflow knows; returned by the receive update, the query and the run."""

    return_id: str
    status: ReturnStatusName
    refund_id: str | None = None
    refund_status: RefundStatusName | None = None
    note: str | None = None  # why a received return was not refunded, if it was not


@dataclass
class ReturnStepInput:
    return_id: str


@dataclass
class ReturnRefundResult:
    """The return's refund (created now, or by an earlier attempt), or None with the reason when
    nothing can be refunded (fully refunded by hand meanwhile, disputed)."""

    refund: RefundWorkflowInput | None = None
    reason: str | None = None


@dataclass
class FinishReturnInput:
    return_id: str
    refunded: bool


# ---- PSP routing ----


@dataclass
class ChoosePspInput:
    payment_id: str
    candidates: list[str]  # in preference order


@dataclass
class ChoosePspResult:
    psp: str | None  # None: every candidate's circuit is open
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was passed over


# ---- PSP truth for the CheckoutWorkflow: return-URL nudges ----

# CheckoutWorkflow update (no argument): the customer's browser came back from a wallet or bank page
# (GET /v1/payments/{id}/return), so look the payment up at the PSP now rather than at the next
# poll. Accepted only while the workflow waits for the PSP; answers with the state after the look-up.
RECHECK_UPDATE = "recheck_psp"
