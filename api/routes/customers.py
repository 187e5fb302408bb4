"""Customers: POST /v1/customers, GET /v1/customers/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from api.auth import Principal, merchant_id_of, merchant_principal
from api.deps import run_db, sessions_of, unix
from api.errors import not_found
from api.schemas import CustomerCreate, CustomerPublic
from core.db import transaction
from core.ids import new_id
from core.tables import Customer

router = APIRouter(prefix="/v1", tags=["customers"])


def customer_public(row: Customer) -> CustomerPublic:
    return CustomerPublic(
        id=row.id,
        email=row.email,
        name=row.name,
        country=row.country,
        metadata=dict(row.metadata_ or {}),
        created=unix(row.created),
    )


def get_customer(session: Session, merchant_id: str, customer_id: str, param: str = "id") -> Customer:
    """The merchant's customer, or 404 (also for another merchant's customer)."""
    row = session.get(Customer, customer_id)
    if row is None or row.merchant_id != merchant_id:
        raise not_found("customer", customer_id, param)
    return row


def _create(sessions: sessionmaker[Session], merchant_id: str, body: CustomerCreate) -> CustomerPublic:
    with transaction(sessions) as session:
        row = Customer(
            id=new_id("cus"),
            merchant_id=merchant_id,
            email=body.email,
            name=body.name,
            country=body.country,
            metadata_=body.metadata,
        )
        session.add(row)
        session.flush()
        return customer_public(row)


def _read(sessions: sessionmaker[Session], merchant_id: str, customer_id: str) -> CustomerPublic:
    with sessions() as session:
        return customer_public(get_customer(session, merchant_id, customer_id))


@router.post("/customers", response_model=CustomerPublic, summary="Create a customer")
async def create_customer(
    body: CustomerCreate, request: Request, principal: Principal = Depends(merchant_principal)
) -> CustomerPublic:
    return await run_db(_create, sessions_of(request), merchant_id_of(principal), body)


@router.get("/customers/{customer_id}", response_model=CustomerPublic, summary="Retrieve a customer")
async def read_customer(
    customer_id: str, request: Request, principal: Principal = Depends(merchant_principal)
) -> CustomerPublic:
    return await run_db(_read, sessions_of(request), merchant_id_of(principal), customer_id)
