"""Operator-only ledger views: one account's balance and entries, and the whole-ledger check."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from api.auth import Principal, operator_principal
from api.deps import run_db, sessions_of, unix
from api.errors import invalid
from api.schemas import LedgerAccountPublic, LedgerCheckPublic, LedgerEntryPublic
from core.ledger_store import account_view, check_ledger
from domain.ledger import Account, LedgerError

router = APIRouter(prefix="/v1/ledger", tags=["ledger"])


def _account(sessions: sessionmaker[Session], account: str, limit: int) -> LedgerAccountPublic:
    with sessions() as session:
        view = account_view(session, account, limit=limit)
    return LedgerAccountPublic(
        account=view.account,
        currency=view.currency,
        balance=view.balance,
        entries=[
            LedgerEntryPublic(
                transaction_key=e.transaction_key,
                kind=e.kind,
                ref=e.ref,
                amount=e.amount,
                created=unix(e.created_at),
            )
            for e in view.entries
        ],
    )


def _check(sessions: sessionmaker[Session]) -> LedgerCheckPublic:
    with sessions() as session:
        result = check_ledger(session)
    return LedgerCheckPublic(
        balanced=result.balanced, transactions=result.transactions, unbalanced=result.unbalanced
    )


@router.get(
    "/accounts/{account}",
    response_model=LedgerAccountPublic,
    summary="An account's balance and newest entries (operators)",
)
async def read_account(
    account: str,
    request: Request,
    limit: int = Query(100, ge=1, le=1000),
    principal: Principal = Depends(operator_principal),
) -> LedgerAccountPublic:
    try:
        Account.parse(account)
    except LedgerError:
        raise invalid(
            "parameter_invalid",
            "account must be a ledger account name such as merchant_payable:<merchant>:usd.",
            "account",
        ) from None
    return await run_db(_account, sessions_of(request), account, limit)


@router.get(
    "/check", response_model=LedgerCheckPublic, summary="Check that every transaction balances (operators)"
)
async def ledger_check(
    request: Request, principal: Principal = Depends(operator_principal)
) -> LedgerCheckPublic:
    return await run_db(_check, sessions_of(request))
