"""ReturnWorkflow on the time-skipping server with the real database activities: received (stock
back, the items refunded through a child RefundWorkflow) and expired (30 days, nothing moves)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from core.ids import new_id
from core.tables import Order, Product, Refund, Return
from tests.factories import make_order, make_product, seed
from tests.workflows import test_refund
from tests.workflows.conftest import TEST_SERVER, register_search_attributes
from tests.workflows.test_refund import (
    FakePsp,
    assert_books_agree,
    assert_replays,
    captured_payment,
    payment_status,
    refund_rows,
)
from workflows.contracts import (
    RETURN_WINDOW,
    RETURN_WORKFLOW,
    ReceiveRequest,
    ReturnState,
    ReturnUpd,
    ReturnWorkflowInput,
    return_workflow_id,
)

PRICE = 1_500

# the same worker set-up as the refund tests (RefundWorkflow + ReturnWorkflow, real DB activities)
psp = test_refund.psp
executor = test_refund.executor
task_queue = test_refund.task_queue
client = test_refund.client


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """This module's own time-skipping server: skipping 30 days on the session's shared server also
    has to fire every other module's long timers and can time out."""
    environment = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=str(TEST_SERVER)
    )
    try:
        await register_search_attributes(environment.client)
        yield environment
    finally:
        await environment.shutdown()


def shop(sessions: sessionmaker[Session]) -> tuple[Any, Order, Product]:
    """A confirmed, captured order of 2 x 15.00 and 1 x 2.50 (the product's stock after the sale)."""
    base = seed(sessions)
    pay = captured_payment(sessions, base, amount=2 * PRICE + 250)
    with sessions() as s, s.begin():
        widget = make_product(s, base.merchant.id, stock=3, price=PRICE)
        other = make_product(s, base.merchant.id, stock=7, price=250)
        order = make_order(
            s,
            base.customer,
            pay.id,
            amount=2 * PRICE + 250,
            status="confirmed",
            items=[
                {"product": widget.id, "name": "Widget", "quantity": 2, "unit_price": PRICE},
                {"product": other.id, "name": "Gadget", "quantity": 1, "unit_price": 250},
            ],
        )
    return pay, order, widget


async def authorize_return(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], order: Order, product: Product, quantity: int
) -> Return:
    """The row POST /v1/orders/{id}/returns writes. The window counts on the test server's clock,
    which runs ahead of the wall clock once a test has skipped time."""
    rid = new_id("ret")
    row = Return(
        id=rid,
        merchant_id=order.merchant_id,
        order_id=order.id,
        items=[{"product": product.id, "quantity": quantity, "unit_price": product.price}],
        amount=quantity * product.price,
        currency="usd",
        workflow_id=return_workflow_id(rid),
        expires_at=await env.get_current_time() + RETURN_WINDOW,
    )
    with sessions() as s, s.begin():
        s.add(row)
    return row


async def start_return(client: Client, row: Return, task_queue: str) -> WorkflowHandle[Any, ReturnState]:
    return await client.start_workflow(
        RETURN_WORKFLOW,
        ReturnWorkflowInput(
            return_id=row.id, order_id=row.order_id, merchant_id=row.merchant_id, expires_at=row.expires_at
        ),
        id=return_workflow_id(row.id),
        task_queue=task_queue,
        result_type=ReturnState,
        execution_timeout=timedelta(days=60),
    )


def load(sessions: sessionmaker[Session], model: Any, key: str) -> Any:
    with sessions() as s:
        row = s.get(model, key)
    assert row is not None
    return row


async def test_return_received_restocks_and_refunds_the_items(
    env: WorkflowEnvironment, client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    pay, order, widget = shop(sessions)
    row = await authorize_return(env, sessions, order, widget, 1)
    handle = await start_return(client, row, task_queue)

    state = await handle.execute_update(
        ReturnUpd.RECEIVE, ReceiveRequest(operator_id="opr_1"), result_type=ReturnState
    )

    assert (state.status, state.refund_status, state.note) == ("refunded", "succeeded", None)
    assert state.refund_id is not None
    assert (await handle.result()) == state
    await assert_replays(handle)  # child workflow included
    ret = load(sessions, Return, row.id)
    assert (ret.status, ret.refund_id) == ("refunded", state.refund_id)
    assert load(sessions, Product, widget.id).stock == 4  # the returned unit is back
    refund = load(sessions, Refund, state.refund_id)
    assert (refund.amount, refund.status, refund.return_id) == (PRICE, "succeeded", row.id)
    assert [c.idempotency_key for c in psp.calls] == [f"refund:{state.refund_id}"]
    assert payment_status(sessions, pay.id) == "partially_refunded"
    assert_books_agree(sessions, psp, pay)

    # received once: a second receive is refused (the workflow has finished)
    with pytest.raises((WorkflowUpdateFailedError, RPCError)):
        await handle.execute_update(
            ReturnUpd.RECEIVE, ReceiveRequest(operator_id="opr_1"), result_type=ReturnState
        )
    assert load(sessions, Product, widget.id).stock == 4


async def test_return_not_received_within_30_days_expires(
    env: WorkflowEnvironment, client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    pay, order, widget = shop(sessions)
    row = await authorize_return(env, sessions, order, widget, 2)
    handle = await start_return(client, row, task_queue)

    before = await client.get_workflow_handle(handle.id).describe()
    await env.sleep(RETURN_WINDOW + timedelta(seconds=1))  # the test server skips the 30 days
    state = await handle.result()
    after = await client.get_workflow_handle(handle.id).describe()

    assert (state.status, state.refund_id) == ("expired", None)
    assert after.close_time is not None and after.close_time - before.start_time >= RETURN_WINDOW - timedelta(
        minutes=1
    )
    assert load(sessions, Return, row.id).status == "expired"
    assert load(sessions, Product, widget.id).stock == 3  # nothing came back
    assert refund_rows(sessions, pay.id) == []
    assert psp.calls == []
    assert payment_status(sessions, pay.id) == "succeeded"
    assert_books_agree(sessions, psp, pay)
    await assert_replays(handle)


async def test_receive_validator_refuses_a_missing_operator(
    env: WorkflowEnvironment, client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    _pay, order, widget = shop(sessions)
    row = await authorize_return(env, sessions, order, widget, 1)
    handle = await start_return(client, row, task_queue)
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(
            ReturnUpd.RECEIVE, ReceiveRequest(operator_id=""), result_type=ReturnState
        )
    assert isinstance(info.value.cause, ApplicationError) and info.value.cause.type == "InvalidRequest"
    state = await handle.query(ReturnUpd.QUERY_STATE, result_type=ReturnState)
    assert state.status == "authorized"
    await handle.terminate("test over")
