"""Cards: POST /v1/payment_methods (tokenized at the PSP inside the request) and the customer's list.

The card number and cvc exist only in this request's memory and in the PSP call. We keep the
PSP token, display fields and a keyed fingerprint (same card -> same fingerprint, for fraud
rules and blocklists, without storing anything that could be turned back into the number).

A token works only at the PSP that issued it, so the card is tokenized at every configured PSP:
the primary (PSP_DEFAULT) must succeed, the others are best effort (one that is down is skipped;
payments with that card then cannot fail over to it). `routing_for` turns the merchant's routing
rules and the card's tokens into the PSP candidates of a payment (workflows/failover.py).

A wallet or netbanking method (type "wallet" / "netbanking") carries nothing secret: the customer
approves each payment on the wallet's or bank's page (the payment answers requires_action with
next_action redirect_to_url). It is tokenized at the primary PSP only. Its row reuses the card
columns: brand holds the wallet provider or the bank's code, the card-only fields stay empty (no
fingerprint either: there is no instrument number to derive it from).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from api.auth import Principal, merchant_id_of, merchant_principal
from api.deps import Page, psp_of, run_db, sessions_of, settings_of, unix
from api.errors import API_ERROR, CARD_ERROR, ApiError, invalid, not_found
from api.routes.customers import get_customer
from api.schemas import (
    CardCreate,
    CardPublic,
    ListPublic,
    NetbankingPublic,
    PaymentMethodCreate,
    PaymentMethodPublic,
    WalletPublic,
)
from core.config import Settings
from core.db import transaction
from core.ids import new_id
from core.tables import Merchant, PaymentMethod
from domain.routing import RoutingRuleError, candidates, parse_rules, route
from psp.base import (
    PSP,
    CardDetails,
    CardToken,
    MethodDetails,
    MethodToken,
    PSPAmbiguous,
    PSPRejected,
    PSPUnavailable,
)
from psp.registry import default_order

router = APIRouter(prefix="/v1", tags=["payment_methods"])
log = structlog.get_logger("api.payment_methods")

# How long saving a card waits for the PSPs other than the primary; a slower one is skipped.
SECONDARY_TOKENIZE_TIMEOUT_S = 5.0

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
    if row.type == "wallet":
        return PaymentMethodPublic(
            id=row.id,
            type="wallet",
            customer=row.customer_id,
            wallet=WalletPublic(provider=row.brand),
            created=unix(row.created),
        )
    if row.type == "netbanking":
        return PaymentMethodPublic(
            id=row.id,
            type="netbanking",
            customer=row.customer_id,
            netbanking=NetbankingPublic(bank=row.brand),
            created=unix(row.created),
        )
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
    tokens: Mapping[str, str] | None = None,
) -> PaymentMethodPublic:
    with transaction(sessions) as session:
        row = PaymentMethod(
            id=new_id("pm"),
            merchant_id=merchant_id,
            customer_id=customer_id,
            type="card",
            psp=psp_name,
            psp_token=token.token,
            psp_tokens={**(tokens or {}), psp_name: token.token},
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


async def _tokenize(request: Request, details: CardDetails) -> tuple[str, CardToken, dict[str, str]]:
    """(primary PSP, its token, {psp: token} at the other PSPs that took the card)."""
    settings = settings_of(request)
    psp = psp_of(request, settings.psp_default)
    psps: Mapping[str, PSP] = request.app.state.psps
    # started first, so they run while the primary answers
    others = {
        name: asyncio.create_task(other.tokenize_card(details))
        for name, other in psps.items()
        if name != psp.name and other is not psp
    }
    try:
        token = await _tokenize_primary(psp, details)
    except BaseException:
        for task in others.values():
            task.cancel()
        await asyncio.gather(*others.values(), return_exceptions=True)
        raise
    return psp.name, token, await _collect_tokens(others)


async def _collect_tokens(tasks: Mapping[str, asyncio.Task[CardToken]]) -> dict[str, str]:
    """Best effort: the tokens of the PSPs that answered in time; the others are skipped."""
    if not tasks:
        return {}
    _done, pending = await asyncio.wait(tasks.values(), timeout=SECONDARY_TOKENIZE_TIMEOUT_S)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    tokens: dict[str, str] = {}
    for name, task in tasks.items():
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            # the error's type only: its message could quote the request, which carries a card
            log.warning("tokenize_skipped", psp=name, error=type(error).__name__ if error else "timeout")
            continue
        tokens[name] = task.result().token
    return tokens


async def _tokenize_primary(psp: PSP, details: CardDetails) -> CardToken:
    try:
        return await psp.tokenize_card(details)
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


def _store_method(
    sessions: sessionmaker[Session], merchant_id: str, customer_id: str, psp_name: str, token: MethodToken
) -> PaymentMethodPublic:
    label = (token.provider or "wallet") if token.type == "wallet" else (token.bank or "")
    with transaction(sessions) as session:
        row = PaymentMethod(
            id=new_id("pm"),
            merchant_id=merchant_id,
            customer_id=customer_id,
            type=token.type,
            psp=psp_name,
            psp_token=token.token,
            psp_tokens={psp_name: token.token},
            brand=label[:20],
            funding="wallet" if token.type == "wallet" else "bank",
            last4="",
            exp_month=0,
            exp_year=0,
            country="",  # unknown: no evidence for the fraud rules' country check
            fingerprint="",
        )
        session.add(row)
        session.flush()
        return payment_method_public(row)


async def _tokenize_method(request: Request, method: MethodDetails) -> tuple[str, MethodToken]:
    psp = psp_of(request, settings_of(request).psp_default)
    try:
        return psp.name, await psp.tokenize_method(method)
    except PSPRejected as exc:
        if exc.code == "unsupported_method":
            raise invalid(
                "payment_method_unsupported",
                f"The payment processor does not offer {method.type} payments.",
                "type",
            ) from None
        raise invalid(
            "payment_method_invalid", "The payment processor refused this payment method.", "type"
        ) from None
    except (PSPUnavailable, PSPAmbiguous):
        raise ApiError(
            503, API_ERROR, "psp_unavailable", "The payment processor is not available. Retry shortly."
        ) from None


def _check_shape(body: PaymentMethodCreate) -> None:
    """Exactly the sub-object the type needs: `card` for cards, `netbanking` for net banking."""
    needed = {"card": "card", "netbanking": "netbanking"}.get(body.type)
    for name, given in (("card", body.card is not None), ("netbanking", body.netbanking is not None)):
        if given and name != needed:
            raise invalid("parameter_unknown", f"{name} is not used with type {body.type}.", name)
    if needed == "card" and body.card is None:
        raise invalid("parameter_missing", "card is required for type card.", "card")
    if needed == "netbanking" and body.netbanking is None:
        raise invalid("parameter_missing", "netbanking is required for type netbanking.", "netbanking")


@router.post(
    "/payment_methods",
    response_model=PaymentMethodPublic,
    summary="Save a payment method: a card (tokenized), a wallet or a netbanking bank",
)
async def create_payment_method(
    body: PaymentMethodCreate, request: Request, principal: Principal = Depends(merchant_principal)
) -> PaymentMethodPublic:
    merchant_id = merchant_id_of(principal)
    _check_shape(body)
    sessions = sessions_of(request)
    if body.type != "card":
        await run_db(_check_customer, sessions, merchant_id, body.customer)
        bank = body.netbanking.bank if body.netbanking is not None else None
        details = MethodDetails(type="wallet" if body.type == "wallet" else "netbanking", bank=bank)
        psp_name, method = await _tokenize_method(request, details)
        return await run_db(_store_method, sessions, merchant_id, body.customer, psp_name, method)
    assert body.card is not None  # _check_shape
    card = prepare_card(body.card, settings_of(request).fingerprint_key)
    await run_db(_check_customer, sessions, merchant_id, body.customer)
    psp_name, token, others = await _tokenize(request, card.details)
    return await run_db(
        _store, sessions, merchant_id, body.customer, psp_name, token, card.fingerprint, others
    )


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


# ---- routing: which PSPs a payment with this card may go to ----


@dataclass(frozen=True)
class Routing:
    """The routing fields of a CheckoutInput: the first candidate with its token, the tokens of
    all candidates, and the candidates in order (workflows/failover.py)."""

    psp: str
    psp_token: str
    psp_tokens: dict[str, str]
    route: list[str]


def card_tokens(pm: PaymentMethod) -> dict[str, str]:
    """{psp: token}; cards saved before routing have only the primary's."""
    return {**(pm.psp_tokens or {}), pm.psp: pm.psp_token}


def plan_route(
    pm: PaymentMethod,
    rules_json: Any,
    settings: Settings,
    available: Sequence[str],
    currency: str,
    amount: int,
) -> Routing:
    """The merchant's rules (else the default order), restricted to the configured PSPs that hold
    a token for the card. None of them does: the card's own PSP, as before routing."""
    tokens = card_tokens(pm)
    try:
        rules = parse_rules(rules_json or [])
    except RoutingRuleError as exc:
        # stored rules are validated when set; a broken row must not stop payments
        log.warning("routing_rules_invalid", merchant=pm.merchant_id, error=str(exc))
        rules = ()
    order = route(rules, default_order(settings, available), currency, pm.type, amount)
    chosen = candidates(order, [p for p in tokens if p in available]) or [pm.psp]
    return Routing(
        psp=chosen[0],
        psp_token=tokens[chosen[0]],
        psp_tokens={p: tokens[p] for p in chosen},
        route=chosen,
    )


def _merchant_rules(sessions: sessionmaker[Session], merchant_id: str) -> Any:
    with sessions() as session:
        merchant = session.get(Merchant, merchant_id)
        return merchant.routing_rules if merchant is not None else []


async def routing_for(
    request: Request, merchant_id: str, pm: PaymentMethod, currency: str, amount: int
) -> Routing:
    """The routing fields for a payment of `amount` `currency` with the card `pm`."""
    rules = await run_db(_merchant_rules, sessions_of(request), merchant_id)
    available = list(request.app.state.psps)
    return plan_route(pm, rules, settings_of(request), available, currency, amount)
