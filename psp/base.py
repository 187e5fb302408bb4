"""The PSP protocol every adapter implements (sandbox now, Stripe later), with typed requests and
results. A decline is a result (status "failed" + decline_code), never an exception; exceptions
are for transport trouble, split by whether the PSP may have acted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

PSPStatus = Literal["requires_action", "authorized", "captured", "canceled", "failed", "refunded"]


class PSPError(Exception):
    """Base for transport-level PSP failures."""


class PSPUnavailable(PSPError):
    """The PSP certainly did not act (connection refused, 5xx before processing, 429). Safe to retry."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PSPAmbiguous(PSPError):
    """The PSP may have acted (timeout after sending the request). Look it up before retrying."""


class PSPRejected(PSPError):
    """The PSP refused the request itself (4xx: bad token, bad state). Retrying will not help."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CardDetails:
    """Raw card data: exists only inside the tokenize request, never stored or logged."""

    number: str
    exp_month: int
    exp_year: int
    cvc: str
    name: str | None = None

    def __repr__(self) -> str:  # keep card data out of tracebacks and logs
        return f"CardDetails(last4={self.number[-4:]}, exp={self.exp_month}/{self.exp_year})"

    __str__ = __repr__


@dataclass(frozen=True)
class CardToken:
    token: str
    brand: str  # visa | mastercard | amex | ...
    funding: str  # credit | debit | prepaid | unknown
    country: str  # ISO 3166 alpha-2, upper-case
    last4: str
    exp_month: int
    exp_year: int


MethodType = Literal["wallet", "netbanking"]


@dataclass(frozen=True)
class MethodDetails:
    """A payment method that is not a card: approved by the customer on a redirect page (the wallet
    provider's or the bank's), so there is nothing secret to carry here."""

    type: MethodType
    bank: str | None = None  # netbanking: the bank's code


@dataclass(frozen=True)
class MethodToken:
    token: str
    type: MethodType
    provider: str | None = None  # wallet: which wallet
    bank: str | None = None  # netbanking: the bank's code


@dataclass(frozen=True)
class AuthorizeRequest:
    reference: str  # our payment id
    token: str
    amount: int
    currency: str
    idempotency_key: str
    description: str | None = None


@dataclass(frozen=True)
class PSPNextAction:
    type: Literal["otp", "redirect_to_url"]
    url: str | None = None


@dataclass(frozen=True)
class PSPPayment:
    id: str
    reference: str
    status: PSPStatus
    amount: int
    currency: str
    amount_captured: int = 0
    amount_refunded: int = 0
    decline_code: str | None = None
    message: str | None = None
    next_action: PSPNextAction | None = None


@dataclass(frozen=True)
class PSPRefund:
    id: str
    payment_id: str
    amount: int
    status: Literal["pending", "succeeded", "failed"]


@dataclass(frozen=True)
class PSPDispute:
    id: str
    payment_id: str  # the PSP's payment id
    amount: int
    currency: str
    status: Literal["needs_response", "under_review", "won", "lost"]
    reason: str | None = None
    evidence_due_by: int | None = None  # unix seconds
    created: int = 0  # unix seconds


class PSP(Protocol):
    name: str

    async def tokenize_card(self, card: CardDetails) -> CardToken: ...

    async def tokenize_method(self, method: MethodDetails) -> MethodToken:
        """A wallet or bank token; raises PSPRejected for a type this PSP does not offer."""
        ...

    async def authorize(self, req: AuthorizeRequest) -> PSPPayment: ...

    async def authenticate(self, psp_payment_id: str, otp: str, *, idempotency_key: str) -> PSPPayment: ...

    async def capture(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPPayment: ...

    async def void(self, psp_payment_id: str, *, idempotency_key: str) -> PSPPayment: ...

    async def refund(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPRefund: ...

    async def get_payment(self, psp_payment_id: str) -> PSPPayment: ...

    async def find_payments(self, reference: str) -> list[PSPPayment]: ...

    async def submit_dispute_evidence(
        self, psp_dispute_id: str, evidence: dict[str, str], *, idempotency_key: str
    ) -> PSPDispute: ...

    async def get_dispute(self, psp_dispute_id: str) -> PSPDispute: ...
