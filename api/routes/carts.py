"""Carts: create, add items, read, and checkout (which creates the order and starts the payment).

The cart id is the checkout's natural idempotency key: the first checkout assigns the order and
payment ids to the cart with ``UPDATE ... WHERE payment_id IS NULL`` in the same transaction
that inserts the order; a concurrent or later checkout of the same cart loses that update and
re-uses the winner's ids, so it answers with the same order and attaches to the same workflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from api.auth import Principal, merchant_id_of, merchant_principal
from api.deps import run_db, sessions_of, unix
from api.errors import ApiError, conflict, invalid, not_found
from api.routes.customers import get_customer
from api.routes.orders import read_order
from api.routes.payment_methods import get_payment_method, routing_for
from api.routes.payments import ERROR_RESPONSES, failure_error, read_payment, run_checkout
from api.schemas import CartCreate, CartItemCreate, CartItemPublic, CartPublic, CheckoutCreate, OrderPublic
from core.db import transaction
from core.ids import new_id
from core.ledger_store import write_transaction
from core.tables import Cart, CartItem, Order, PaymentMethod, Product
from domain.money import MAX_AMOUNT_MINOR
from domain.states import PaymentStatus
from workflows.contracts import CartLine, CheckoutInput

router = APIRouter(prefix="/v1", tags=["carts"])

MAX_QUANTITY = 10_000


def _cart_closed(cart_id: str) -> ApiError:
    return conflict("cart_checked_out", f"Cart {cart_id} is already checked out; it cannot be changed.")


def get_cart(session: Session, merchant_id: str, cart_id: str) -> Cart:
    row = session.get(Cart, cart_id)
    if row is None or row.merchant_id != merchant_id:
        raise not_found("cart", cart_id)
    return row


def _lines(session: Session, cart_id: str) -> list[tuple[CartItem, Product]]:
    rows = session.exec(
        select(CartItem, Product)
        .join(Product, col(Product.id) == col(CartItem.product_id))
        .where(col(CartItem.cart_id) == cart_id)
        .order_by(col(CartItem.product_id))
    ).all()
    return [(item, product) for item, product in rows]


def cart_public(session: Session, cart: Cart) -> CartPublic:
    lines = _lines(session, cart.id)
    items = [
        CartItemPublic(
            product=product.id,
            name=product.name,
            quantity=item.quantity,
            unit_price=product.price,
            amount=product.price * item.quantity,
            currency=product.currency,
        )
        for item, product in lines
    ]
    return CartPublic(
        id=cart.id,
        customer=cart.customer_id,
        status=cart.status,
        items=items,
        amount=sum(i.amount for i in items),
        currency=items[0].currency if items else None,
        order=cart.order_id,
        payment=cart.payment_id,
        created=unix(cart.created),
    )


# ---- create / read ----------------------------------------------------------------------------


def _create(sessions: sessionmaker[Session], merchant_id: str, customer_id: str) -> CartPublic:
    with sessions() as session:
        get_customer(session, merchant_id, customer_id, param="customer")
    with transaction(sessions) as session:
        cart = Cart(id=new_id("cart"), merchant_id=merchant_id, customer_id=customer_id, status="open")
        session.add(cart)
        session.flush()
        return cart_public(session, cart)


def _read(sessions: sessionmaker[Session], merchant_id: str, cart_id: str) -> CartPublic:
    with sessions() as session:
        return cart_public(session, get_cart(session, merchant_id, cart_id))


@router.post("/carts", response_model=CartPublic, summary="Create a cart")
async def create_cart(
    body: CartCreate, request: Request, principal: Principal = Depends(merchant_principal)
) -> CartPublic:
    return await run_db(_create, sessions_of(request), merchant_id_of(principal), body.customer)


@router.get("/carts/{cart_id}", response_model=CartPublic, summary="Retrieve a cart")
async def read_cart(
    cart_id: str, request: Request, principal: Principal = Depends(merchant_principal)
) -> CartPublic:
    return await run_db(_read, sessions_of(request), merchant_id_of(principal), cart_id)


# ---- items ------------------------------------------------------------------------------------


def _check_currency(session: Session, cart_id: str, product: Product) -> None:
    for _item, other in _lines(session, cart_id):
        if other.id != product.id and other.currency != product.currency:
            raise invalid(
                "currency_mismatch",
                f"All items of a cart must be in one currency; this cart is in {other.currency}.",
                "product",
            )


def _add_item(
    sessions: sessionmaker[Session], merchant_id: str, cart_id: str, product_id: str, quantity: int
) -> CartPublic:
    # Validate without writing first: bad input writes nothing.
    with sessions() as session:
        cart = get_cart(session, merchant_id, cart_id)
        product = get_product_for(session, merchant_id, product_id)
        if cart.status != "open" or cart.payment_id is not None:
            raise _cart_closed(cart_id)
        _check_currency(session, cart_id, product)
    with write_transaction(sessions) as session:
        # Touch the cart row first: on PostgreSQL this locks it against a concurrent checkout
        # (which updates the same row), so an item cannot slip in after the order snapshot.
        touched = session.execute(
            update(Cart)
            .where(col(Cart.id) == cart_id, col(Cart.status) == "open", col(Cart.payment_id).is_(None))
            .values(status="open")
        )
        if getattr(touched, "rowcount", 0) != 1:
            raise _cart_closed(cart_id)
        _check_currency(session, cart_id, product)  # again, under the lock
        item = session.get(CartItem, (cart_id, product_id))
        total = quantity + (item.quantity if item is not None else 0)
        if total > MAX_QUANTITY:
            raise invalid(
                "parameter_invalid", f"A cart holds at most {MAX_QUANTITY} of one product.", "quantity"
            )
        if item is None:
            session.add(CartItem(cart_id=cart_id, product_id=product_id, quantity=quantity))
        else:
            item.quantity = total
            session.add(item)
        session.flush()
        cart = get_cart(session, merchant_id, cart_id)
        return cart_public(session, cart)


def get_product_for(session: Session, merchant_id: str, product_id: str) -> Product:
    row = session.get(Product, product_id)
    if row is None or row.merchant_id != merchant_id:
        raise not_found("product", product_id, "product")
    return row


@router.post("/carts/{cart_id}/items", response_model=CartPublic, summary="Add a product to a cart")
async def add_item(
    cart_id: str, body: CartItemCreate, request: Request, principal: Principal = Depends(merchant_principal)
) -> CartPublic:
    return await run_db(
        _add_item, sessions_of(request), merchant_id_of(principal), cart_id, body.product, body.quantity
    )


# ---- checkout ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    order_id: str
    payment_id: str
    customer_id: str
    amount: int
    currency: str
    items: list[CartLine]
    shipping_country: str | None
    payment_method: PaymentMethod
    payment: Any  # PaymentPublic | None: the payment row, once the workflow wrote it


def _assign(sessions: sessionmaker[Session], merchant_id: str, cart: Cart, shipping: dict[str, Any]) -> None:
    """First checkout wins: assign ids and insert the order in one transaction."""
    order_id, payment_id = new_id("ord"), new_id("pay")
    try:
        with write_transaction(sessions) as session:
            won = session.execute(
                update(Cart)
                .where(col(Cart.id) == cart.id, col(Cart.payment_id).is_(None))
                .values(order_id=order_id, payment_id=payment_id, status="checked_out")
            )
            if getattr(won, "rowcount", 0) != 1:
                return  # another checkout got there first; its ids are read below
            lines = _lines(session, cart.id)  # read under the cart lock: the final contents
            if not lines:
                raise invalid("cart_empty", "The cart has no items.")
            currencies = {product.currency for _item, product in lines}
            if len(currencies) != 1:
                raise invalid("currency_mismatch", "All items of a cart must be in one currency.")
            amount = sum(product.price * item.quantity for item, product in lines)
            if amount <= 0:
                raise invalid("amount_too_small", "The cart total must be positive.")
            if amount > MAX_AMOUNT_MINOR:
                raise invalid("amount_too_large", "The cart total is too large.")
            session.add(
                Order(
                    id=order_id,
                    merchant_id=merchant_id,
                    customer_id=cart.customer_id,
                    cart_id=cart.id,
                    payment_id=payment_id,
                    amount=amount,
                    currency=currencies.pop(),
                    status="pending",
                    items=[
                        {
                            "product": product.id,
                            "name": product.name,
                            "quantity": item.quantity,
                            "unit_price": product.price,
                        }
                        for item, product in lines
                    ],
                    shipping_address=shipping,
                )
            )
            session.flush()
    except IntegrityError:
        pass  # orders.cart_id is unique: the other checkout inserted it


def _plan_checkout(
    sessions: sessionmaker[Session], merchant_id: str, cart_id: str, pm_id: str, shipping: dict[str, Any]
) -> _Plan:
    with sessions() as session:
        cart = get_cart(session, merchant_id, cart_id)
        pm = get_payment_method(session, merchant_id, pm_id, param="payment_method")
        if pm.customer_id != cart.customer_id:
            raise not_found("payment_method", pm_id, "payment_method")
        if cart.payment_id is None and not _lines(session, cart_id):
            raise invalid("cart_empty", "The cart has no items.")
    if cart.payment_id is None:
        _assign(sessions, merchant_id, cart, shipping)
    with sessions() as session:
        cart = get_cart(session, merchant_id, cart_id)
        order = session.get(Order, cart.order_id) if cart.order_id else None
        if order is None or cart.payment_id is None:
            raise RuntimeError(f"cart {cart_id} has no order after checkout")
        payment = read_payment(session, cart.payment_id, merchant_id)
        if payment is not None:
            # the payment exists: its own card, not this request's, is the one being charged
            pm = session.get(PaymentMethod, payment.payment_method) or pm
        return _Plan(
            order_id=order.id,
            payment_id=order.payment_id,
            customer_id=order.customer_id,
            amount=order.amount,
            currency=order.currency,
            items=[CartLine(product_id=i["product"], quantity=int(i["quantity"])) for i in order.items],
            shipping_country=(order.shipping_address or {}).get("country"),
            payment_method=pm,
            payment=payment,
        )


@router.post(
    "/carts/{cart_id}/checkout",
    response_model=OrderPublic,
    responses=ERROR_RESPONSES,
    summary="Check out a cart: create the order and pay for it",
)
async def checkout(
    cart_id: str, body: CheckoutCreate, request: Request, principal: Principal = Depends(merchant_principal)
) -> JSONResponse:
    merchant_id = merchant_id_of(principal)
    sessions = sessions_of(request)
    shipping = body.shipping_address.model_dump(mode="json")
    plan = await run_db(_plan_checkout, sessions, merchant_id, cart_id, body.payment_method, shipping)
    payment = plan.payment
    if payment is None or payment.status == PaymentStatus.PROCESSING:
        pm = plan.payment_method
        routing = await routing_for(request, merchant_id, pm, plan.currency, plan.amount)
        payment = await run_checkout(
            request,
            CheckoutInput(
                payment_id=plan.payment_id,
                merchant_id=merchant_id,
                customer_id=plan.customer_id,
                payment_method_id=pm.id,
                psp=routing.psp,
                psp_token=routing.psp_token,
                psp_tokens=routing.psp_tokens,
                route=routing.route,
                amount=plan.amount,
                currency=plan.currency,
                order_id=plan.order_id,
                items=plan.items,
                shipping_country=plan.shipping_country,
            ),
        )
    if payment.status == PaymentStatus.FAILED:
        return failure_error(payment).response()
    order = await run_db(read_order, sessions, merchant_id, plan.order_id, payment)
    return JSONResponse(order.model_dump(mode="json"))
