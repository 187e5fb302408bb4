"""Disputes: list, retrieve, and submit evidence (the submit_evidence Update on the dispute's
workflow). Disputes are opened by the PSP (webhook, api/routes/psp_webhooks.py), never by the API.

A merchant sees its own disputes (another merchant's id is a 404); operators see all.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api import idempotency as idem
from api.auth import Principal, any_principal, merchant_id_of, merchant_principal
from api.deps import Page, run_db, sessions_of, settings_of, temporal_of, unix
from api.errors import API_ERROR, ApiError, conflict, invalid, not_found
from api.schemas import DisputeEvidenceCreate, DisputePublic, ListPublic
from core.tables import Dispute
from domain.disputes import DisputeError, DisputeStatus, clean_evidence
from workflows.contracts import DisputeState, DisputeUpd, EvidenceRequest

router = APIRouter(prefix="/v1", tags=["disputes"])
log = structlog.get_logger("api.disputes")

_STATUSES = {s.value for s in DisputeStatus}


def dispute_public(row: Dispute) -> DisputePublic:
    return DisputePublic(
        id=row.id,
        amount=row.amount,
        currency=row.currency,
        payment=row.payment_id,
        reason=row.reason,
        status=DisputeStatus(row.status).value,
        evidence=dict(row.evidence or {}),
        evidence_due_by=unix(row.evidence_due_by),
        workflow_id=row.workflow_id,
        created=unix(row.created),
    )


def _scope(principal: Principal) -> str | None:
    return None if principal.is_operator else principal.merchant_id


def load_dispute(sessions: sessionmaker[Session], dispute_id: str, merchant_id: str | None) -> DisputePublic:
    with sessions() as session:
        row = session.get(Dispute, dispute_id)
        if row is None or (merchant_id is not None and row.merchant_id != merchant_id):
            raise not_found("dispute", dispute_id)
        return dispute_public(row)


def _list(
    sessions: sessionmaker[Session],
    merchant_id: str | None,
    payment: str | None,
    status: str | None,
    limit: int,
    starting_after: str | None,
) -> tuple[list[DisputePublic], bool]:
    with sessions() as session:
        query = select(Dispute)
        if merchant_id is not None:
            query = query.where(col(Dispute.merchant_id) == merchant_id)
        if payment is not None:
            query = query.where(col(Dispute.payment_id) == payment)
        if status is not None:
            query = query.where(col(Dispute.status) == status)
        if starting_after is not None:
            query = query.where(col(Dispute.id) < starting_after)
        rows = session.exec(query.order_by(col(Dispute.id).desc()).limit(limit + 1)).all()
        return [dispute_public(r) for r in rows[:limit]], len(rows) > limit


@router.get("/disputes", response_model=ListPublic[DisputePublic], summary="List disputes")
async def list_disputes(
    request: Request,
    page: Page = Depends(),
    payment: str | None = Query(None, max_length=64, description="only this payment's disputes"),
    status: str | None = Query(None, max_length=16, description="only disputes in this status"),
    principal: Principal = Depends(any_principal),
) -> ListPublic[DisputePublic]:
    if status is not None and status not in _STATUSES:
        raise invalid(
            "parameter_invalid", f"status must be one of: {', '.join(sorted(_STATUSES))}.", "status"
        )
    page.check_prefix("dp")
    data, has_more = await run_db(
        _list, sessions_of(request), _scope(principal), payment, status, page.limit, page.starting_after
    )
    return ListPublic[DisputePublic](data=data, has_more=has_more, url="/v1/disputes")


@router.get("/disputes/{dispute_id}", response_model=DisputePublic, summary="Retrieve a dispute")
async def read_dispute(
    dispute_id: str, request: Request, principal: Principal = Depends(any_principal)
) -> DisputePublic:
    return await run_db(load_dispute, sessions_of(request), dispute_id, _scope(principal))


# ---- evidence ----


def _closed(dispute: DisputePublic, detail: str | None = None) -> ApiError:
    return conflict(
        "dispute_unexpected_state",
        detail or f"This dispute is {dispute.status}; it no longer accepts evidence.",
    )


async def _submit(
    request: Request, merchant_id: str, dispute_id: str, evidence: dict[str, str]
) -> DisputePublic:
    sessions = sessions_of(request)
    before = await run_db(load_dispute, sessions, dispute_id, merchant_id)
    if before.status != DisputeStatus.NEEDS_RESPONSE:
        raise _closed(before)
    client = temporal_of(request)
    timer = asyncio.timeout(settings_of(request).update_wait_seconds)
    try:
        async with timer:
            await client.get_workflow_handle(before.workflow_id).execute_update(
                DisputeUpd.SUBMIT_EVIDENCE, EvidenceRequest(evidence=evidence), result_type=DisputeState
            )
    except Exception as exc:
        if timer.expired():
            pass  # accepted, still on its way to the PSP: answer with what the database says now
        elif isinstance(exc, WorkflowUpdateFailedError):
            cause = exc.cause
            detail = cause.message if isinstance(cause, ApplicationError) and cause.message else None
            if isinstance(cause, ApplicationError) and cause.type == "InvalidRequest":
                raise invalid("parameter_invalid", detail or "Invalid evidence.", "evidence") from None
            raise _closed(before, detail) from None
        elif isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND:
            # the workflow has finished (or never started): the dispute is closed, or not ours to change
            raise _closed(await run_db(load_dispute, sessions, dispute_id, merchant_id)) from None
        elif isinstance(exc, RPCError | WorkflowUpdateRPCTimeoutOrCancelledError):
            log.warning("temporal_unavailable", dispute_id=dispute_id, error=type(exc).__name__)
            raise ApiError(
                503, API_ERROR, "service_unavailable", "The workflow service is not available. Retry shortly."
            ) from None
        else:
            raise
    return await run_db(load_dispute, sessions, dispute_id, merchant_id)


@router.post(
    "/disputes/{dispute_id}/evidence",
    response_model=DisputePublic,
    responses={409: {"description": "The dispute no longer accepts evidence"}},
    summary="Submit evidence for a dispute (before its evidence_due_by)",
)
async def submit_evidence(
    dispute_id: str,
    body: DisputeEvidenceCreate,
    request: Request,
    principal: Principal = Depends(merchant_principal),
    idempotency_key: str | None = Depends(idem.idempotency_key_header),
) -> JSONResponse:
    merchant_id = merchant_id_of(principal)
    try:
        evidence = clean_evidence(body.evidence)
    except DisputeError as exc:
        raise invalid("parameter_invalid", f"Invalid evidence: {exc}.", "evidence") from None
    if not evidence:
        raise invalid("parameter_missing", "Evidence needs at least one non-empty field.", "evidence")
    sessions = sessions_of(request)
    path = f"/v1/disputes/{dispute_id}/evidence"
    if idempotency_key:
        req_hash = idem.request_hash("POST", path, {"evidence": evidence})
        got = await run_db(
            idem.claim, sessions, merchant_id, idempotency_key, f"POST {path}", req_hash, dispute_id
        )
        if isinstance(got, idem.Replay):
            return JSONResponse(got.body, status_code=got.status, headers={"Idempotent-Replayed": "true"})
    status: int
    payload: dict[str, Any]
    try:
        dispute = await _submit(request, merchant_id, dispute_id, evidence)
        status, payload = 200, dispute.model_dump(mode="json")
    except ApiError as err:
        if err.status >= 500:
            if idempotency_key:
                await run_db(idem.release, sessions, merchant_id, idempotency_key)
            raise
        status, payload = err.status, err.body()
    except Exception:
        if idempotency_key:
            await run_db(idem.release, sessions, merchant_id, idempotency_key)
        raise
    if idempotency_key:
        if status == 200 and payload["status"] == DisputeStatus.NEEDS_RESPONSE:
            # still on its way (the wait timed out): a retry should see where it got to instead
            await run_db(idem.release, sessions, merchant_id, idempotency_key)
        else:
            await run_db(idem.complete, sessions, merchant_id, idempotency_key, status, payload)
    return JSONResponse(payload, status_code=status)
