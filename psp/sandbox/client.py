"""SandboxPSP: the psp.base.PSP adapter for the sandbox PSP's HTTP API.

Transport failures are split by whether the PSP may have acted: nothing sent or refused before
processing (connect errors, 5xx, 429) -> PSPUnavailable; the request went out and the answer was
lost (read timeout, dropped connection) -> PSPAmbiguous; the PSP refused the request (4xx) ->
PSPRejected. Request bodies are never logged (tokenize carries the card number).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

from psp.base import (
    AuthorizeRequest,
    CardDetails,
    CardToken,
    MethodDetails,
    MethodToken,
    PSPAmbiguous,
    PSPDispute,
    PSPNextAction,
    PSPPayment,
    PSPRefund,
    PSPRejected,
    PSPUnavailable,
)

log = logging.getLogger(__name__)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (either form of the header), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _path(psp_payment_id: str, suffix: str = "") -> str:
    return f"/v1/payments/{quote(psp_payment_id, safe='')}{suffix}"


def _payment(data: dict[str, Any]) -> PSPPayment:
    action = data.get("next_action")
    return PSPPayment(
        id=data["id"],
        reference=data["reference"],
        status=data["status"],
        amount=data["amount"],
        currency=data["currency"],
        amount_captured=data.get("amount_captured", 0),
        amount_refunded=data.get("amount_refunded", 0),
        decline_code=data.get("decline_code"),
        message=data.get("message"),
        next_action=PSPNextAction(type=action["type"], url=action.get("url")) if action else None,
    )


def _dispute(data: dict[str, Any]) -> PSPDispute:
    return PSPDispute(
        id=data["id"],
        payment_id=data["payment"],
        amount=data["amount"],
        currency=data["currency"],
        status=data["status"],
        reason=data.get("reason"),
        evidence_due_by=data.get("evidence_due_by"),
        created=data.get("created", 0),
    )


class SandboxPSP:
    name = "sandbox"

    def __init__(
        self, http: httpx.AsyncClient, base_url: str, api_key: str, *, return_url: str | None = None
    ) -> None:
        """return_url: where a redirect method's page sends the customer back; "{reference}" in it
        is replaced by our payment id."""
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._return_url = return_url

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._api_key}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        what = f"sandbox {method} {path}"
        try:
            response = await self._http.request(
                method, self._base_url + path, json=json, params=params, headers=headers
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol) as e:
            # never reached the PSP
            raise PSPUnavailable(f"{what}: {type(e).__name__}") from e
        except httpx.TransportError as e:
            # ReadTimeout, WriteTimeout, RemoteProtocolError, ReadError...: the request may have
            # been processed and only the answer lost.
            raise PSPAmbiguous(f"{what}: {type(e).__name__}") from e
        log.debug("%s -> %d", what, response.status_code)
        status = response.status_code
        if status == 429 or status >= 500:
            raise PSPUnavailable(
                f"{what}: HTTP {status} {self._error_code(response) or ''}".rstrip(),
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 400:
            code = self._error_code(response)
            raise PSPRejected(f"{what}: HTTP {status} {self._error_message(response)}".rstrip(), code=code)
        try:
            body = response.json()
        except ValueError as e:
            # a 2xx we cannot read: the PSP acted but we do not know the outcome
            raise PSPAmbiguous(f"{what}: unreadable response body") from e
        if not isinstance(body, dict):
            raise PSPAmbiguous(f"{what}: unexpected response body")
        return body

    @staticmethod
    def _error(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            return {}
        error = body.get("error") if isinstance(body, dict) else None
        return error if isinstance(error, dict) else {}

    @classmethod
    def _error_code(cls, response: httpx.Response) -> str | None:
        code = cls._error(response).get("code")
        return code if isinstance(code, str) else None

    @classmethod
    def _error_message(cls, response: httpx.Response) -> str:
        message = cls._error(response).get("message")
        return message if isinstance(message, str) else ""

    async def tokenize_card(self, card: CardDetails) -> CardToken:
        payload: dict[str, Any] = {
            "number": card.number,
            "exp_month": card.exp_month,
            "exp_year": card.exp_year,
            "cvc": card.cvc,
        }
        if card.name is not None:
            payload["name"] = card.name
        data = await self._request("POST", "/v1/tokens", json=payload)
        return CardToken(
            token=data["id"],
            brand=data["brand"],
            funding=data["funding"],
            country=data["country"],
            last4=data["last4"],
            exp_month=data["exp_month"],
            exp_year=data["exp_year"],
        )

    async def tokenize_method(self, method: MethodDetails) -> MethodToken:
        payload: dict[str, Any] = {"type": method.type}
        if method.bank is not None:
            payload["bank"] = method.bank
        data = await self._request("POST", "/v1/tokens", json=payload)
        return MethodToken(
            token=data["id"], type=data["type"], provider=data.get("wallet"), bank=data.get("bank")
        )

    async def authorize(self, req: AuthorizeRequest) -> PSPPayment:
        payload: dict[str, Any] = {
            "amount": req.amount,
            "currency": req.currency,
            "token": req.token,
            "reference": req.reference,
        }
        if req.description is not None:
            payload["description"] = req.description
        if self._return_url:
            payload["return_url"] = self._return_url.replace("{reference}", quote(req.reference, safe=""))
        return _payment(
            await self._request("POST", "/v1/payments", json=payload, idempotency_key=req.idempotency_key)
        )

    async def authenticate(self, psp_payment_id: str, otp: str, *, idempotency_key: str) -> PSPPayment:
        return _payment(
            await self._request(
                "POST",
                _path(psp_payment_id, "/authenticate"),
                json={"otp": otp},
                idempotency_key=idempotency_key,
            )
        )

    async def capture(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPPayment:
        return _payment(
            await self._request(
                "POST",
                _path(psp_payment_id, "/capture"),
                json={"amount": amount},
                idempotency_key=idempotency_key,
            )
        )

    async def void(self, psp_payment_id: str, *, idempotency_key: str) -> PSPPayment:
        return _payment(
            await self._request("POST", _path(psp_payment_id, "/void"), idempotency_key=idempotency_key)
        )

    async def refund(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPRefund:
        data = await self._request(
            "POST",
            _path(psp_payment_id, "/refunds"),
            json={"amount": amount},
            idempotency_key=idempotency_key,
        )
        return PSPRefund(
            id=data["id"], payment_id=data["payment"], amount=data["amount"], status=data["status"]
        )

    async def get_payment(self, psp_payment_id: str) -> PSPPayment:
        return _payment(await self._request("GET", _path(psp_payment_id, "")))

    async def find_payments(self, reference: str) -> list[PSPPayment]:
        data = await self._request("GET", "/v1/payments", params={"reference": reference})
        return [_payment(item) for item in data.get("data", [])]

    async def submit_dispute_evidence(
        self, psp_dispute_id: str, evidence: dict[str, str], *, idempotency_key: str
    ) -> PSPDispute:
        path = f"/v1/disputes/{quote(psp_dispute_id, safe='')}/evidence"
        return _dispute(
            await self._request("POST", path, json={"evidence": evidence}, idempotency_key=idempotency_key)
        )

    async def get_dispute(self, psp_dispute_id: str) -> PSPDispute:
        return _dispute(await self._request("GET", f"/v1/disputes/{quote(psp_dispute_id, safe='')}"))
