"""Disputes in the sandbox PSP: a chargeback opened through the admin API, evidence, an outcome.

- `POST /admin/payments/{id}/dispute {amount?, reason?}` opens a dispute on a captured payment
  (the whole unrefunded amount by default) and sends `dispute.created`;
- `POST /v1/disputes/{id}/evidence {evidence: {...}}` (Idempotency-Key) moves it to under_review
  (`dispute.updated`) and the sandbox decides at once, deterministically, so tests know the outcome:
  any non-blank evidence field wins, empty evidence loses (`dispute.closed`). The answer is the
  dispute as submitted (under_review), as a real PSP answers before the issuer has decided;
- `POST /admin/disputes/{id}/close {outcome}` forces an outcome (a PSP that decides on its own, or
  a test that wants the outcome before any evidence);
- `GET /v1/disputes/{id}`.

The evidence due date is not enforced: a late submission is still decided, so a caller whose
deadline timer fires a little after the due date is not refused for clock skew.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from core.ids import new_id
from psp.sandbox.state import JSON, SandboxError, SandboxState, fingerprint

EVIDENCE_WINDOW_S = 7 * 24 * 3600
Reason = Literal[
    "fraudulent",
    "product_not_received",
    "product_unacceptable",
    "duplicate",
    "subscription_canceled",
    "credit_not_processed",
    "unrecognized",
    "general",
]
OPEN = ("needs_response", "under_review")
MAX_AMOUNT = 10**12


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DisputeCreate(_Body):
    amount: StrictInt | None = Field(default=None, gt=0, le=MAX_AMOUNT)
    reason: Reason | None = None


class DisputeClose(_Body):
    outcome: Literal["won", "lost"]


class EvidenceBody(_Body):
    evidence: dict[StrictStr, Annotated[StrictStr, Field(max_length=20_000)]] = Field(max_length=50)


def _now() -> int:
    return int(time.time())


def _missing(dispute_id: str) -> SandboxError:
    return SandboxError(
        404, "invalid_request_error", "resource_missing", f"No such dispute: '{dispute_id}'", "id"
    )


def _load(state: SandboxState, dispute_id: str) -> JSON:
    dispute = state.load("disputes", dispute_id)
    if dispute is None:
        raise _missing(dispute_id)
    return dispute


def _save(state: SandboxState, dispute: JSON, event: str | None) -> None:
    state.store("disputes", dispute["id"], dispute, ref=dispute["payment"])
    if event is not None:
        # a copy: events are delivered after the commit, and this dict may change before then
        state.emit(event, copy.deepcopy(dispute))


def _close(state: SandboxState, dispute: JSON, outcome: str) -> None:
    dispute.update(status=outcome, closed=_now())
    _save(state, dispute, "dispute.closed")


def decide(evidence: dict[str, Any]) -> str:
    """The sandbox issuer: defended (any non-blank field) wins, conceded (no evidence) loses."""
    return "won" if any(isinstance(v, str) and v.strip() for v in evidence.values()) else "lost"


def open_dispute(
    state: SandboxState, payment_id: str, amount: int | None = None, reason: str | None = None
) -> JSON:
    with state.transaction():
        payment = state.get_payment(payment_id)
        if payment["status"] != "captured":
            raise SandboxError(
                409,
                "invalid_request_error",
                "payment_unexpected_state",
                f"Only a captured payment can be disputed; this one is {payment['status']}.",
            )
        if state.find("disputes", payment_id):
            raise SandboxError(
                409, "invalid_request_error", "charge_already_disputed", "This payment is already disputed."
            )
        disputable = payment["amount_captured"] - payment["amount_refunded"]
        to_dispute = disputable if amount is None else amount
        if not 0 < to_dispute <= disputable:
            raise SandboxError(
                400,
                "invalid_request_error",
                "amount_too_large",
                f"A dispute amount must be between 1 and the unrefunded {disputable}.",
                "amount",
            )
        now = _now()
        dispute: JSON = {
            "id": new_id("dp"),
            "object": "dispute",
            "payment": payment_id,
            "amount": to_dispute,
            "currency": payment["currency"],
            "reason": reason or "fraudulent",
            "status": "needs_response",
            "evidence": {},
            "evidence_due_by": now + EVIDENCE_WINDOW_S,
            "created": now,
            "closed": None,
        }
        _save(state, dispute, "dispute.created")
        return dispute


def submit_evidence(state: SandboxState, dispute_id: str, evidence: dict[str, str]) -> JSON:
    with state.transaction():
        dispute = _load(state, dispute_id)
        if dispute["status"] != "needs_response":
            raise SandboxError(
                409,
                "invalid_request_error",
                "dispute_unexpected_state",
                f"This dispute is {dispute['status']}; evidence can no longer be submitted.",
            )
        dispute.update(evidence=dict(evidence), status="under_review")
        _save(state, dispute, "dispute.updated")
        submitted = copy.deepcopy(dispute)
        _close(state, dispute, decide(evidence))
        return submitted


def close_dispute(state: SandboxState, dispute_id: str, outcome: str) -> JSON:
    with state.transaction():
        dispute = _load(state, dispute_id)
        if dispute["status"] == outcome:
            return dispute  # forced twice: nothing new happens
        if dispute["status"] not in OPEN:
            raise SandboxError(
                409,
                "invalid_request_error",
                "dispute_unexpected_state",
                f"This dispute is already closed as {dispute['status']}.",
            )
        _close(state, dispute, outcome)
        return dispute


def get_dispute(state: SandboxState, dispute_id: str) -> JSON:
    with state.transaction():
        return _load(state, dispute_id)


def _require_idempotency_key(value: str | None) -> str:
    if not value or not value.strip() or len(value) > 255:
        raise SandboxError(
            400,
            "invalid_request_error",
            "idempotency_key_missing",
            "This request needs an Idempotency-Key header (1 to 255 characters).",
            "Idempotency-Key",
        )
    return value


def dispute_router(state: SandboxState, require_api_key: Callable[..., None]) -> APIRouter:
    """The dispute routes, behind the same API key as /v1."""
    router = APIRouter(dependencies=[Depends(require_api_key)])

    @router.post("/admin/payments/{payment_id}/dispute")
    def admin_open_dispute(payment_id: str, body: DisputeCreate | None = None) -> JSONResponse:
        body = body or DisputeCreate()
        return JSONResponse(open_dispute(state, payment_id, body.amount, body.reason))

    @router.post("/admin/disputes/{dispute_id}/close")
    def admin_close_dispute(dispute_id: str, body: DisputeClose) -> JSONResponse:
        return JSONResponse(close_dispute(state, dispute_id, body.outcome))

    @router.post("/v1/disputes/{dispute_id}/evidence")
    def submit_dispute_evidence(
        dispute_id: str,
        body: EvidenceBody,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        key = _require_idempotency_key(idempotency_key)
        route = f"POST /v1/disputes/{dispute_id}/evidence"
        status, answer, replayed = state.idempotent(
            key,
            fingerprint(route, body.model_dump()),
            lambda: submit_evidence(state, dispute_id, body.evidence),
        )
        return JSONResponse(
            answer, status_code=status, headers={"Idempotent-Replayed": "true"} if replayed else None
        )

    @router.get("/v1/disputes/{dispute_id}")
    def read_dispute(dispute_id: str) -> JSONResponse:
        return JSONResponse(get_dispute(state, dispute_id))

    return router
