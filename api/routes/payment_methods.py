"""Cards: POST /v1/payment_methods (tokenized at the PSP inside the request) and the customer's list.

The card number and cvc exist only in this request's memory and in the PSP call. We keep the
PSP token, display fields and a keyed fingerprint (same card -> same fingerprint, for fraud
rules and blocklists, without storing anything that could be turned back into the number).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from api.auth import Principal, merchant_id_of, merchant_principal
from api.deps import Page, psp_of, run_db, sessions_of, settings_of, unix
from api.errors import API_ERROR, CARD_ERROR, ApiError, not_found
from api.routes.customers import get_customer
from api.schemas import CardCreate, CardPublic, ListPublic, PaymentMethodCreate, PaymentMethodPublic
from core.db import transaction
from core.ids import new_id
from core.tables import PaymentMethod
from psp.base import CardDetails, CardToken, PSPAmbiguous, PSPRejected, PSPUnavailable

router = APIRouter(prefix="/v1", tags=["payment_methods"])
log = structlog.get_logger("api.payment_methods")

# PSP refusal codes that mean "this card's data is wrong" (400) rather than "declined" (402).
_CARD_INPUT_CODES: dict[str, tuple[str, str]] = {
    "invalid_number": ("incorrect_number", "card.number"),
    "incorrect_number": ("incorrect_number", "card.number"),
    "invalid_expiry_month": ("invalid_expiry_month", "card.exp_month"),
    "invalid_expiry_year": ("invalid_expiry_year", "card.exp_year"),
    "invalid_cvc": ("invalid_cvc", "card.cvc"),
    "incorrect_cvc": ("invalid_cvc", "card.cvc"),
}


def _card_error(code: str, message: str, param: str) -> ApiError:
    return ApiError(400, CARD_ERROR, code, message, param)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def check_card(card: CardCreate, today: datetime | None = None) -> tuple[str, int]:
    """Validate before anything is written or sent; returns (digits, 4-digit expiry year).
    Messages never contain the submitted values."""
    today = today or datetime.now(UTC)
    digits = card.number.replace(" ", "").replace("-", "")
    if not (digits.isascii() and digits.isdigit() and 12 <= len(digits) <= 19 and luhn_ok(digits)):
        raise _card_error("incorrect_number", "Your card number is incorrect.", "card.number")
    if not 1 <= card.exp_month <= 12:
        raise _card_error(
            "invalid_expiry_month", "Your card's expiration month is invalid.", "card.exp_month"
        )
    year = card.exp_year + 2000 if 0 <= card.exp_year < 100 else card.exp_year
    if year < today.year or year > today.year + 50:
        raise _card_error("invalid_expiry_year", "Your card's expiration year is invalid.", "card.exp_year")
    if (year, card.exp_month) < (today.year, today.month):
        raise _card_error(
            "invalid_expiry_month", "Your card's expiration month is in the past.", "card.exp_month"
        )
    cvc = card.cvc.strip()
    if not (cvc.isascii() and cvc.isdigit() and 3 <= len(cvc) <= 4):
        raise _card_error("invalid_cvc", "Your card's security code is invalid.", "card.cvc")
    return digits, year


def fingerprint(key: str, digits: str) -> str:
    return hmac.new(key.encode(), digits.encode(), hashlib.sha256).hexdigest()[:32]


def payment_method_public(row: PaymentMethod) -> PaymentMethodPublic:
    return PaymentMethodPublic(
        id=row.id,
        customer=row.customer_id,
        card=CardPublic(
            brand=row.brand,
            funding=row.funding,
            last4=row.last4,
            exp_month=row.exp_month,
            exp_year=row.exp_year,
            country=row.country,
            fingerprint=row.fingerprint,
        ),
        created=unix(row.created),
    )


def get_payment_method(session: Session, merchant_id: str, pm_id: str, param: str = "id") -> PaymentMethod:
    row = session.get(PaymentMethod, pm_id)
    if row is None or row.merchant_id != merchant_id:
        raise not_found("payment_method", pm_id, param)
    return row


def _check_customer(sessions: sessionmaker[Session], merchant_id: str, customer_id: str) -> None:
    with sessions() as session:
        get_customer(session, merchant_id, customer_id, param="customer")


def _store(
    sessions: sessionmaker[Session],
    merchant_id: str,
    customer_id: str,
    psp_name: str,
    token: CardToken,
    fp: str,
) -> PaymentMethodPublic:
    with transaction(sessions) as session:
        row = PaymentMethod(
            id=new_id("pm"),
            merchant_id=merchant_id,
            customer_id=customer_id,
            type="card",
            psp=psp_name,
            psp_token=token.token,
            brand=token.brand,
            funding=token.funding,
            last4=token.last4,
            exp_month=token.exp_month,
            exp_year=token.exp_year,
            country=(token.country or "").upper()[:2],
            fingerprint=fp,
        )
        session.add(row)
        session.flush()
        return payment_method_public(row)


async def _tokenize(request: Request, details: CardDetails) -> tuple[str, CardToken]:
    settings = settings_of(request)
    psp = psp_of(request, settings.psp_default)
    try:
        return psp.name, await psp.tokenize_card(details)
    except PSPRejected as exc:
        code = exc.code or "card_declined"
        if code in _CARD_INPUT_CODES:
            ours, param = _CARD_INPUT_CODES[code]
            raise _card_error(ours, "The card was refused by the payment processor.", param) from None
        decline = "generic_decline" if code == "card_declined" else code
        raise ApiError(
            402, CARD_ERROR, "card_declined", "Your card was declined.", "card", decline_code=decline
        ) from None
    except (PSPUnavailable, PSPAmbiguous):
        raise ApiError(
            503, API_ERROR, "psp_unavailable", "The payment processor is not available. Retry shortly."
        ) from None
    except Exception as exc:
        # Log the exception type only: a message or traceback from this frame's callees could
        # carry request data, and this request carries a card.
        log.error("tokenize_failed", psp=psp.name, error=type(exc).__name__)
        raise ApiError(500, API_ERROR, "internal_error", "An unexpected error occurred.") from None


@dataclass(frozen=True)
class PreparedCard:
    """What the route needs from the card, with no field whose repr shows the number: the
    route's frame may appear in a traceback, and some renderers print frame locals."""

    details: CardDetails  # its repr shows last4 and expiry only
    fingerprint: str


def prepare_card(card: CardCreate, fingerprint_key: str) -> PreparedCard:
    digits, year = check_card(card)
    details = CardDetails(
        number=digits, exp_month=card.exp_month, exp_year=year, cvc=card.cvc.strip(), name=card.name
    )
    return PreparedCard(details=details, fingerprint=fingerprint(fingerprint_key, digits))


@router.post("/payment_methods", response_model=PaymentMethodPublic, summary="Save a card (tokenized)")
async def create_payment_method(
    body: PaymentMethodCreate, request: Request, principal: Principal = Depends(merchant_principal)
) -> PaymentMethodPublic:
    merchant_id = merchant_id_of(principal)
    card = prepare_card(body.card, settings_of(request).fingerprint_key)
    sessions = sessions_of(request)
    await run_db(_check_customer, sessions, merchant_id, body.customer)
    psp_name, token = await _tokenize(request, card.details)
    return await run_db(_store, sessions, merchant_id, body.customer, psp_name, token, card.fingerprint)


def _list(
    sessions: sessionmaker[Session],
    merchant_id: str,
    customer_id: str,
    limit: int,
    starting_after: str | None,
) -> tuple[list[PaymentMethodPublic], bool]:
    with sessions() as session:
        get_customer(session, merchant_id, customer_id)
        query = select(PaymentMethod).where(
            col(PaymentMethod.merchant_id) == merchant_id, col(PaymentMethod.customer_id) == customer_id
        )
        if starting_after:
            query = query.where(col(PaymentMethod.id) < starting_after)
        rows = session.exec(query.order_by(col(PaymentMethod.id).desc()).limit(limit + 1)).all()
        return [payment_method_public(r) for r in rows[:limit]], len(rows) > limit


@router.get(
    "/customers/{customer_id}/payment_methods",
    response_model=ListPublic[PaymentMethodPublic],
    summary="List a customer's cards",
)
async def list_payment_methods(
    customer_id: str,
    request: Request,
    page: Page = Depends(),
    principal: Principal = Depends(merchant_principal),
) -> ListPublic[PaymentMethodPublic]:
    page.check_prefix("pm")
    data, has_more = await run_db(
        _list, sessions_of(request), merchant_id_of(principal), customer_id, page.limit, page.starting_after
    )
    return ListPublic[PaymentMethodPublic](
        data=data, has_more=has_more, url=f"/v1/customers/{customer_id}/payment_methods"
    )
