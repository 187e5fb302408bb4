"""Seed rows for tests. Each make_* adds one row to the session and flushes; commit is yours.

`seed(sessions)` commits a merchant + customer + card, the usual start of a payment test.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from core.ids import new_id
from core.tables import Cart, Customer, Merchant, Order, Payment, PaymentMethod, Product, utcnow
from workflows.contracts import checkout_workflow_id


def make_merchant(session: Session, **kw: Any) -> Merchant:
    row = Merchant(**{"id": new_id("acct"), "name": "Acme Books", **kw})
    session.add(row)
    session.flush()
    return row


def make_customer(session: Session, merchant_id: str, **kw: Any) -> Customer:
    cid = kw.pop("id", new_id("cus"))
    values = {"email": f"{cid}@example.com", "name": "Ada Buyer", "country": "US", **kw}
    row = Customer(id=cid, merchant_id=merchant_id, **values)
    session.add(row)
    session.flush()
    return row


def make_payment_method(session: Session, customer: Customer, **kw: Any) -> PaymentMethod:
    pid = kw.pop("id", new_id("pm"))
    values = {
        "psp": "sandbox",
        "psp_token": f"tok_{pid}",
        "brand": "visa",
        "funding": "credit",
        "last4": "4242",
        "exp_month": 12,
        "exp_year": 2034,
        "country": "US",
        "fingerprint": f"fp_{pid}",
        **kw,
    }
    row = PaymentMethod(id=pid, merchant_id=customer.merchant_id, customer_id=customer.id, **values)
    session.add(row)
    session.flush()
    return row


def make_product(session: Session, merchant_id: str, stock: int = 10, **kw: Any) -> Product:
    values = {"id": new_id("prod"), "name": "Widget", "price": 1_500, "currency": "usd", **kw}
    row = Product(merchant_id=merchant_id, stock=stock, **values)
    session.add(row)
    session.flush()
    return row


def make_payment(
    session: Session,
    method: PaymentMethod,
    amount: int = 10_000,
    currency: str = "usd",
    status: str = "processing",
    created: datetime | None = None,
    **kw: Any,
) -> Payment:
    pid = kw.pop("id", new_id("pay"))
    values = {
        "capture_method": "automatic",
        "psp": method.psp,
        "workflow_id": checkout_workflow_id(pid),
        **kw,
    }
    now = created or utcnow()
    row = Payment(
        id=pid,
        merchant_id=method.merchant_id,
        customer_id=method.customer_id,
        payment_method_id=method.id,
        amount=amount,
        currency=currency,
        status=status,
        created=now,
        updated=now,
        **values,
    )
    session.add(row)
    session.flush()
    return row


def make_order(
    session: Session,
    customer: Customer,
    payment_id: str,
    amount: int = 3_000,
    currency: str = "usd",
    **kw: Any,
) -> Order:
    """An order with its (checked-out) cart, as the cart checkout creates them."""
    cart = Cart(
        id=new_id("cart"), merchant_id=customer.merchant_id, customer_id=customer.id, status="checked_out"
    )
    session.add(cart)
    session.flush()
    row = Order(
        id=kw.pop("id", new_id("ord")),
        merchant_id=customer.merchant_id,
        customer_id=customer.id,
        cart_id=cart.id,
        payment_id=payment_id,
        amount=amount,
        currency=currency,
        **kw,
    )
    cart.order_id, cart.payment_id = row.id, payment_id
    session.add(row)
    session.flush()
    return row


@dataclass
class Seed:
    merchant: Merchant
    customer: Customer
    method: PaymentMethod


def seed(sessions: sessionmaker[Session], **merchant_kw: Any) -> Seed:
    """Commit a merchant (merchant_kw override its columns), a customer and a card."""
    with sessions() as session, session.begin():
        merchant = make_merchant(session, **merchant_kw)
        customer = make_customer(session, merchant.id)
        method = make_payment_method(session, customer)
    return Seed(merchant, customer, method)
