"""Orders: GET /v1/orders/{id}. Orders are created by a cart checkout (api/routes/carts.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from api.auth import Principal, merchant_id_of, merchant_principal
from api.deps import run_db, sessions_of, unix
from api.errors import not_found
from api.routes.payments import read_payment
from api.schemas import OrderItemPublic, OrderPublic, PaymentPublic
from core.tables import Order

router = APIRouter(prefix="/v1", tags=["orders"])


def order_public(row: Order, payment: PaymentPublic | None) -> OrderPublic:
    return OrderPublic(
        id=row.id,
        cart=row.cart_id,
        customer=row.customer_id,
        status=row.status,
        amount=row.amount,
        currency=row.currency,
        items=[
            OrderItemPublic(
                product=str(item["product"]),
                name=str(item.get("name", "")),
                quantity=int(item["quantity"]),
                unit_price=int(item["unit_price"]),
            )
            for item in row.items or []
        ],
        shipping_address=dict(row.shipping_address or {}),
        payment=payment,
        created=unix(row.created),
    )


def get_order(session: Session, merchant_id: str, order_id: str) -> Order:
    row = session.get(Order, order_id)
    if row is None or row.merchant_id != merchant_id:
        raise not_found("order", order_id)
    return row


def read_order(
    sessions: sessionmaker[Session], merchant_id: str, order_id: str, payment: PaymentPublic | None = None
) -> OrderPublic:
    """The order with its payment (read from the database unless the caller already has it)."""
    with sessions() as session:
        row = get_order(session, merchant_id, order_id)
        if payment is None:
            payment = read_payment(session, row.payment_id, merchant_id)
        return order_public(row, payment)


@router.get("/orders/{order_id}", response_model=OrderPublic, summary="Retrieve an order")
async def read_order_route(
    order_id: str, request: Request, principal: Principal = Depends(merchant_principal)
) -> OrderPublic:
    return await run_db(read_order, sessions_of(request), merchant_id_of(principal), order_id)
