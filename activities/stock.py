"""Stock reservations for cart checkouts: reserve (saga step), release (its undo), confirm.

One stock_reservations row per (order, product) makes every step idempotent. The products.stock
column only moves by atomic `stock = stock -/+ q` UPDATEs guarded in SQL, never read-modify-write,
so two checkouts racing for the last unit cannot both get it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.payments import not_found
from core.ledger_store import write_transaction
from core.tables import Order, Product, StockReservation, utcnow
from workflows.contracts import Act, CartLine, ConfirmOrderInput, StockInput

RESERVED, RELEASED, COMMITTED = "reserved", "released", "committed"


def _quantities(items: list[CartLine]) -> dict[str, int]:
    """product -> total quantity; a product listed twice is one reservation row."""
    totals: Counter[str] = Counter()
    for line in items:
        if not isinstance(line.quantity, int) or line.quantity <= 0:
            # a non-positive quantity would add stock instead of taking it
            raise ApplicationError(
                f"invalid quantity {line.quantity!r} for product {line.product_id}",
                type="InvalidInput",
                non_retryable=True,
            )
        totals[line.product_id] += line.quantity
    # sorted: concurrent reservations lock product rows in the same order (no deadlock)
    return dict(sorted(totals.items()))


def _release_reserved(session: Session, order_id: str) -> int:
    """Give back every still-reserved line of the order; returns how many lines were released."""
    rows = session.exec(
        select(StockReservation).where(
            col(StockReservation.order_id) == order_id, col(StockReservation.status) == RESERVED
        )
    ).all()
    released = 0
    for row in rows:
        # The status guard in SQL makes the give-back happen at most once, even if two releases race.
        flipped = session.exec(
            update(StockReservation)
            .where(
                col(StockReservation.order_id) == order_id,
                col(StockReservation.product_id) == row.product_id,
                col(StockReservation.status) == RESERVED,
            )
            .values(status=RELEASED, updated=utcnow())
        )
        if flipped.rowcount == 1:
            session.exec(
                update(Product)
                .where(col(Product.id) == row.product_id)
                .values(stock=col(Product.stock) + row.quantity)
            )
            released += 1
    return released


class StockActivities:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def activities(self) -> list[Any]:
        return [self.reserve_stock, self.release_stock, self.confirm_order]

    @activity.defn(name=Act.RESERVE_STOCK)
    def reserve_stock(self, inp: StockInput) -> None:
        """All lines or none: a missing unit rolls the whole reservation back (OutOfStock)."""
        wanted = _quantities(inp.items)
        with write_transaction(self.sessions) as session:
            for product_id, quantity in wanted.items():
                if session.get(StockReservation, (inp.order_id, product_id)) is not None:
                    continue  # reserved by an earlier attempt (or already released/committed)
                taken = session.exec(
                    update(Product)
                    .where(col(Product.id) == product_id, col(Product.stock) >= quantity)
                    .values(stock=col(Product.stock) - quantity)
                )
                if taken.rowcount != 1:
                    product = session.get(Product, product_id)
                    if product is None:
                        raise not_found(f"product {product_id}")
                    # raising inside the transaction undoes the lines already taken
                    raise ApplicationError(
                        f"out of stock: product {product_id} ({product.name}): "
                        f"{quantity} wanted, {product.stock} available",
                        {"product_id": product_id, "wanted": quantity, "available": product.stock},
                        type="OutOfStock",
                        non_retryable=True,
                    )
                session.add(StockReservation(order_id=inp.order_id, product_id=product_id, quantity=quantity))

    @activity.defn(name=Act.RELEASE_STOCK)
    def release_stock(self, inp: StockInput) -> None:
        """Saga undo of reserve_stock: gives back the order's still-reserved lines, once.
        Committed lines stay committed; lines never reserved have nothing to give back."""
        with write_transaction(self.sessions) as session:
            _release_reserved(session, inp.order_id)

    @activity.defn(name=Act.CONFIRM_ORDER)
    def confirm_order(self, inp: ConfirmOrderInput) -> None:
        """confirmed: commit the reservations, order confirmed; else: release, order canceled."""
        with write_transaction(self.sessions) as session:
            order = session.exec(select(Order).where(col(Order.id) == inp.order_id).with_for_update()).first()
            if order is None:
                raise not_found(f"order {inp.order_id}")
            if order.payment_id != inp.payment_id:
                raise ApplicationError(
                    f"order {order.id} belongs to payment {order.payment_id}, not {inp.payment_id}",
                    type="InvalidOrderState",
                    non_retryable=True,
                )
            target = "confirmed" if inp.confirmed else "canceled"
            if order.status not in ("pending", target):
                raise ApplicationError(
                    f"order {order.id} is {order.status}, cannot become {target}",
                    type="InvalidOrderState",
                    non_retryable=True,
                )
            if inp.confirmed:
                lines = session.exec(
                    select(StockReservation).where(col(StockReservation.order_id) == order.id)
                ).all()
                given_back = [r.product_id for r in lines if r.status == RELEASED]
                if given_back:
                    # the stock went back to the shelf: confirming would sell units we no longer hold
                    raise ApplicationError(
                        f"order {order.id}: reservations already released for {', '.join(given_back)}",
                        type="InvalidOrderState",
                        non_retryable=True,
                    )
                for row in lines:
                    if row.status == RESERVED:
                        row.status = COMMITTED
                        row.updated = utcnow()
            else:
                _release_reserved(session, order.id)
            order.status = target
