"""Products: POST /v1/products, GET /v1/products/{id} (stock is the current available count)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from api.auth import Principal, merchant_id_of, merchant_principal
from api.deps import run_db, sessions_of, unix
from api.errors import not_found
from api.schemas import ProductCreate, ProductPublic
from core.db import transaction
from core.ids import new_id
from core.tables import Product

router = APIRouter(prefix="/v1", tags=["products"])


def product_public(row: Product) -> ProductPublic:
    return ProductPublic(
        id=row.id,
        name=row.name,
        price=row.price,
        currency=row.currency,
        stock=row.stock,
        created=unix(row.created),
    )


def get_product(session: Session, merchant_id: str, product_id: str, param: str = "id") -> Product:
    row = session.get(Product, product_id)
    if row is None or row.merchant_id != merchant_id:
        raise not_found("product", product_id, param)
    return row


def _create(sessions: sessionmaker[Session], merchant_id: str, body: ProductCreate) -> ProductPublic:
    with transaction(sessions) as session:
        row = Product(
            id=new_id("prod"),
            merchant_id=merchant_id,
            name=body.name,
            price=body.price,
            currency=body.currency,
            stock=body.stock,
        )
        session.add(row)
        session.flush()
        return product_public(row)


def _read(sessions: sessionmaker[Session], merchant_id: str, product_id: str) -> ProductPublic:
    with sessions() as session:
        return product_public(get_product(session, merchant_id, product_id))


@router.post("/products", response_model=ProductPublic, summary="Create a product")
async def create_product(
    body: ProductCreate, request: Request, principal: Principal = Depends(merchant_principal)
) -> ProductPublic:
    return await run_db(_create, sessions_of(request), merchant_id_of(principal), body)


@router.get("/products/{product_id}", response_model=ProductPublic, summary="Retrieve a product")
async def read_product(
    product_id: str, request: Request, principal: Principal = Depends(merchant_principal)
) -> ProductPublic:
    return await run_db(_read, sessions_of(request), merchant_id_of(principal), product_id)
