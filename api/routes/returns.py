"""Returns: POST /v1/orders/{id}/returns (merchant), POST /v1/returns/{id}/receive (operator),
GET /v1/returns/{id}.

A return is authorized for items of a confirmed order, at most the ordered quantities minus what
earlier returns (not expired) already cover; the order row is locked while that is checked, so two
concurrent returns cannot both take the last unit. The ReturnWorkflow (return:{id}) then waits for
the operator's receive for 30 days (else: expired). Received: the items go back in stock and their
value is refunded (at most what is still refundable on the payment) by a child RefundWorkflow.

The receive call is an Update-with-Start: if the workflow was never started (Temporal was down
when the return was created) it is started now, so an authorized return can always be received.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio.client import (
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api import idempotency as idem
from api.auth import Principal, any_principal, merchant_id_of, merchant_principal, operator_principal
from api.deps import run_db, sessions_of, settings_of, temporal_of, unix
from api.errors import API_ERROR, ApiError, conflict, invalid, not_found
from api.routes.refunds import refund_public
from api.schemas import ReturnCreate, ReturnItemPublic, ReturnPublic
from core.ids import new_id
from core.ledger_store import write_transaction
from core.tables import Order, Payment, Refund, Return, utcnow
from domain.refunds import REFUNDABLE_STATUSES, OrderLine, RefundError, plan_return
from domain.states import PaymentStatus
from workflows.contracts import (
    RETURN_WINDOW,
    RETURN_WORKFLOW,
    ReceiveRequest,
    ReturnState,
    ReturnUpd,
    ReturnWorkflowInput,
    return_workflow_id,
)

router = APIRouter(prefix="/v1", tags=["returns"])
log = structlog.get_logger("api.returns")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "return_quantity_exceeded, return_items_invalid, invalid parameters"},
    404: {"description": "No such order / return"},
    409: {"description": "The order or return is not in a state that allows it"},
    503: {"description": "The workflow service is unavailable (`api_error`)"},
}


# ---- reading ----------------------------------------------------------------------------------


def return_public(row: Return, refund: Refund | None) -> ReturnPublic:
    return ReturnPublic(
        id=row.id,
        order=row.order_id,
        status=row.status,  # type: ignore[arg-type]  # one of the four, by construction
        items=[
            ReturnItemPublic(
                product=str(i["product"]), quantity=int(i["quantity"]), unit_price=int(i["unit_price"])
            )
            for i in row.items or []
        ],
        amount=row.amount,
        currency=row.currency,
        refund=refund_public(refund) if refund is not None else None,
        expires_at=unix(row.expires_at),
        workflow_id=row.workflow_id,
        created=unix(row.created),
    )


def dump(ret: ReturnPublic) -> dict[str, Any]:
    return ret.model_dump(mode="json", by_alias=True)


def _get(session: Session, return_id: str, merchant_id: str | None) -> Return:
    row = session.get(Return, return_id)
    if row is None or (merchant_id is not None and row.merchant_id != merchant_id):
        raise not_found("return", return_id)
    return row


def load_return(sessions: sessionmaker[Session], return_id: str, merchant_id: str | None) -> ReturnPublic:
    with sessions() as session:
        row = _get(session, return_id, merchant_id)
        refund = session.get(Refund, row.refund_id) if row.refund_id else None
        return return_public(row, refund)


def _scope(principal: Principal) -> str | None:
    return None if principal.is_operator else principal.merchant_id


def _workflow_input(row: Return) -> ReturnWorkflowInput:
    return ReturnWorkflowInput(
        return_id=row.id, order_id=row.order_id, merchant_id=row.merchant_id, expires_at=row.expires_at
    )


def _unavailable() -> ApiError:
    return ApiError(
        503, API_ERROR, "service_unavailable", "The workflow service is not available. Retry shortly."
    )


# ---- POST /v1/orders/{id}/returns -------------------------------------------------------------


def _authorize(
    sessions: sessionmaker[Session], merchant_id: str, order_id: str, return_id: str, body: ReturnCreate
) -> Return:
    """Insert the return (authorized) in one transaction holding the order's row lock."""
    with write_transaction(sessions) as session:
        existing = session.get(Return, return_id)
        if existing is not None:  # a retried request (same Idempotency-Key): already authorized
            return existing
        order = session.exec(select(Order).where(col(Order.id) == order_id).with_for_update()).first()
        if order is None or order.merchant_id != merchant_id:
            raise not_found("order", order_id)
        if order.status != "confirmed":
            raise conflict(
                "order_unexpected_state",
                f"This order is {order.status}; only a confirmed order can be returned.",
            )
        payment = session.get(Payment, order.payment_id)
        if payment is None or PaymentStatus(payment.status) not in REFUNDABLE_STATUSES:
            status = payment.status if payment is not None else "missing"
            raise conflict(
                "payment_unexpected_state", f"The order's payment is {status}; its items cannot be returned."
            )
        returned: dict[str, int] = defaultdict(int)
        for earlier in session.exec(
            select(Return).where(col(Return.order_id) == order.id, col(Return.status) != "expired")
        ).all():
            for item in earlier.items:
                returned[str(item["product"])] += int(item["quantity"])
        ordered = [
            OrderLine(str(i["product"]), int(i["quantity"]), int(i["unit_price"])) for i in order.items or []
        ]
        try:
            lines = plan_return(ordered, returned, [(i.product, i.quantity) for i in body.items])
        except RefundError as exc:
            raise invalid(exc.code, exc.message, "items") from None
        now = utcnow()
        row = Return(
            id=return_id,
            merchant_id=merchant_id,
            order_id=order.id,
            status="authorized",
            items=[
                {"product": ln.product_id, "quantity": ln.quantity, "unit_price": ln.unit_price}
                for ln in lines
            ],
            amount=sum(ln.amount for ln in lines),
            currency=order.currency,
            workflow_id=return_workflow_id(return_id),
            expires_at=now + RETURN_WINDOW,
            created=now,
            updated=now,
        )
        session.add(row)
        session.flush()
        return row


@router.post(
    "/orders/{order_id}/returns",
    response_model=ReturnPublic,
    responses=ERROR_RESPONSES,
    summary="Authorize the return of items of a confirmed order",
)
async def create_return(
    order_id: str,
    body: ReturnCreate,
    request: Request,
    principal: Principal = Depends(merchant_principal),
    idempotency_key: str | None = Depends(idem.idempotency_key_header),
) -> JSONResponse:
    merchant_id = merchant_id_of(principal)
    sessions = sessions_of(request)
    path = f"/v1/orders/{order_id}/returns"
    req_hash = idem.request_hash("POST", path, body.model_dump(mode="json"))
    return_id = new_id("ret")
    if idempotency_key:
        got = await run_db(
            idem.claim, sessions, merchant_id, idempotency_key, f"POST {path}", req_hash, return_id
        )
        if isinstance(got, idem.Replay):
            return got.response()
        return_id = got.resource_id
    try:
        try:
            row = await run_db(_authorize, sessions, merchant_id, order_id, return_id, body)
        except ApiError as exc:
            if idempotency_key and exc.status < 500:
                await run_db(idem.complete, sessions, merchant_id, idempotency_key, exc.status, exc.body())
                idempotency_key = None  # stored: nothing to release
            raise
        settings = settings_of(request)
        try:
            await temporal_of(request).start_workflow(
                RETURN_WORKFLOW,
                _workflow_input(row),
                id=row.workflow_id,
                task_queue=settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        except WorkflowAlreadyStartedError:
            pass  # finished already (a very late retry): the row says how
        except RPCError as exc:
            # the return stays authorized; a retry with the key, or the receive, starts the workflow
            log.warning("temporal_unavailable", return_id=row.id, error=exc.message)
            raise _unavailable() from None
        payload = dump(await run_db(load_return, sessions, row.id, merchant_id))
    except Exception:
        if idempotency_key:
            await run_db(idem.release, sessions, merchant_id, idempotency_key)
        raise
    if idempotency_key:
        await run_db(idem.complete, sessions, merchant_id, idempotency_key, 200, payload)
    return JSONResponse(payload)


# ---- POST /v1/returns/{id}/receive ------------------------------------------------------------


@router.post(
    "/returns/{return_id}/receive",
    response_model=ReturnPublic,
    responses=ERROR_RESPONSES,
    summary="Operator: the returned items arrived; restock them and refund their value",
)
async def receive_return(
    return_id: str, request: Request, principal: Principal = Depends(operator_principal)
) -> JSONResponse:
    assert principal.operator_id is not None
    sessions = sessions_of(request)
    before = await run_db(_read_row, sessions, return_id)
    if before.status != "authorized":
        raise conflict(
            "return_unexpected_state", f"This return is {before.status}; it cannot be received again."
        )
    settings = settings_of(request)
    op: WithStartWorkflowOperation[Any, ReturnState] = WithStartWorkflowOperation(
        RETURN_WORKFLOW,
        _workflow_input(before),
        id=before.workflow_id,
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        result_type=ReturnState,
    )
    timer = asyncio.timeout(settings.update_wait_seconds)
    try:
        async with timer:
            await temporal_of(request).execute_update_with_start_workflow(
                ReturnUpd.RECEIVE,
                ReceiveRequest(operator_id=principal.operator_id),
                start_workflow_operation=op,
                result_type=ReturnState,
            )
    except Exception as exc:
        _drain(op)
        if timer.expired():
            pass  # restock / refund still running: answer with what the database says now
        elif isinstance(exc, WorkflowUpdateFailedError):
            cause = exc.cause
            detail = cause.message if isinstance(cause, ApplicationError) else None
            if isinstance(cause, ApplicationError) and cause.type == "InvalidRequest":
                raise invalid("parameter_invalid", detail or "Invalid request.") from None
            raise conflict("return_unexpected_state", detail or "This return cannot be received.") from None
        elif isinstance(exc, WorkflowAlreadyStartedError):
            # closed already (expired at this very moment): the row says how
            after = await run_db(load_return, sessions, return_id, None)
            raise conflict("return_unexpected_state", f"This return is {after.status}.") from None
        elif isinstance(exc, RPCError | WorkflowUpdateRPCTimeoutOrCancelledError):
            log.warning("temporal_unavailable", return_id=return_id, error=type(exc).__name__)
            raise _unavailable() from None
        else:
            raise
    return JSONResponse(dump(await run_db(load_return, sessions, return_id, None)))


def _drain(op: WithStartWorkflowOperation[Any, Any]) -> None:
    """Consume the operation's start outcome after a failed call, or asyncio logs "exception was
    never retrieved" at garbage collection (same as api/routes/payments.py)."""
    future = getattr(op, "_workflow_handle", None)  # SDK internal; skipped if it ever moves
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()


def _read_row(sessions: sessionmaker[Session], return_id: str) -> Return:
    with sessions() as session:
        return _get(session, return_id, None)


# ---- GET /v1/returns/{id} ---------------------------------------------------------------------


@router.get("/returns/{return_id}", response_model=ReturnPublic, summary="Retrieve a return")
async def read_return_route(
    return_id: str, request: Request, principal: Principal = Depends(any_principal)
) -> JSONResponse:
    return JSONResponse(dump(await run_db(load_return, sessions_of(request), return_id, _scope(principal))))
