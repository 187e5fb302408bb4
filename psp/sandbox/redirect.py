"""Redirect payment methods of the sandbox PSP: a digital wallet and net banking.

Tokenizing one (POST /v1/tokens {"type": "wallet"} or {"type": "netbanking", "bank": "..."}) needs
no secret data. Authorizing its token answers requires_action with next_action redirect_to_url:
the customer's browser opens GET /redirect/<payment id>, a tiny page standing in for the wallet's
or the bank's, and approves or declines there. The decision moves the payment to authorized or
failed (wallet_declined / bank_declined), emits the payment.<status> webhook, and sends the
browser back (303) to the return_url given at authorize time, if there was one.

The /redirect pages take no API key: they are the customer's browser, and the payment id in the
URL (unguessable) is the capability, as with a real PSP's hosted page.
"""

from __future__ import annotations

from html import escape
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from psp.sandbox.state import JSON, SandboxError, SandboxState

METHOD_TYPES = ("wallet", "netbanking")
DECLINE_CODES = {"wallet": "wallet_declined", "netbanking": "bank_declined"}
DECLINE_MESSAGES = {
    "wallet_declined": "The customer declined the payment in their wallet.",
    "bank_declined": "The bank declined the payment.",
}

BankCode = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{2,20}$")]


class MethodTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["wallet", "netbanking"]
    bank: BankCode | None = Field(default=None, description="netbanking only: the bank's code")


def is_method_token_request(body: Any) -> bool:
    """Whether a POST /v1/tokens body asks for a wallet or netbanking token (else: a card)."""
    return isinstance(body, dict) and body.get("type") in METHOD_TYPES


def create_method_token(state: SandboxState, body: dict[str, Any]) -> JSON:
    try:
        req = MethodTokenCreate.model_validate(body)
    except ValidationError as exc:
        # Reported like any request validation error (loc under "body", no input echoed).
        raise RequestValidationError(
            [{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        ) from None
    if req.type == "netbanking" and req.bank is None:
        raise SandboxError(
            400, "invalid_request_error", "parameter_missing", "bank: required for netbanking", "bank"
        )
    if req.type == "wallet" and req.bank is not None:
        raise SandboxError(
            400, "invalid_request_error", "parameter_unknown", "bank: only for netbanking", "bank"
        )
    return state.create_method_token(type=req.type, bank=req.bank)


# ---- the customer's pages ----


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title></head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status)


def _redirect_payment(state: SandboxState, payment_id: str) -> JSON | None:
    payment = state.load("payments", payment_id)
    if payment is None or payment.get("method") not in METHOD_TYPES:
        return None
    return payment


def _label(payment: JSON) -> str:
    if payment["method"] == "wallet":
        return "Sandbox Wallet"
    return f"Sandbox Bank ({payment.get('bank') or 'unknown bank'})"


def _amount(payment: JSON) -> str:
    return f"{payment['amount']} {payment['currency'].upper()} (minor units)"


def decide(state: SandboxState, payment_id: str, approve: bool) -> JSON:
    """The customer's decision on the redirect page. Repeating the same decision (a double click,
    a reload) answers the payment unchanged; a different one after the first is refused."""
    with state.transaction():
        payment = _redirect_payment(state, payment_id)
        if payment is None:
            raise SandboxError(404, "invalid_request_error", "resource_missing", "No such redirect payment.")
        previous = payment["status"]
        if previous != "requires_action":
            same = (approve and previous in ("authorized", "captured", "refunded")) or (
                not approve and previous == "failed"
            )
            if same:
                return payment
            raise SandboxError(
                409,
                "invalid_request_error",
                "payment_unexpected_state",
                f"This payment is {previous}; it can no longer be {'approved' if approve else 'declined'}.",
            )
        payment["next_action"] = None
        if approve:
            payment.update(status="authorized", authorizations=1)
        else:
            code = DECLINE_CODES[payment["method"]]
            payment.update(status="failed", decline_code=code, message=DECLINE_MESSAGES[code])
        state.save_payment(payment, previous)
        return payment


def redirect_router(state: SandboxState) -> APIRouter:
    router = APIRouter(prefix="/redirect", include_in_schema=False)

    @router.get("/{payment_id}")
    def page(payment_id: str) -> Response:
        with state.transaction():
            payment = _redirect_payment(state, payment_id)
        if payment is None:
            return _page("Payment not found", "<p>There is no such payment.</p>", 404)
        pid = escape(payment_id, quote=True)
        info = f"<p>{escape(_label(payment))}: pay {escape(_amount(payment))}.</p>"
        if payment["status"] != "requires_action":
            return _page("Payment", f"{info}<p>This payment is {escape(payment['status'])}.</p>")
        forms = (
            f"<form method='post' action='/redirect/{pid}/approve'><button>Approve</button></form>"
            f"<form method='post' action='/redirect/{pid}/decline'><button>Decline</button></form>"
        )
        return _page("Confirm your payment", info + forms)

    def finish(payment_id: str, approve: bool) -> Response:
        try:
            payment = decide(state, payment_id, approve)
        except SandboxError as exc:
            return _page("Payment", f"<p>{escape(exc.message)}</p>", exc.status)
        if payment.get("return_url"):
            return RedirectResponse(payment["return_url"], status_code=303)
        return _page("Payment", f"<p>This payment is {escape(payment['status'])}.</p>")

    @router.post("/{payment_id}/approve")
    def approve(payment_id: str) -> Response:
        return finish(payment_id, True)

    @router.post("/{payment_id}/decline")
    def decline(payment_id: str) -> Response:
        return finish(payment_id, False)

    return router
