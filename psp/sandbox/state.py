"""The sandbox PSP's state and processing rules, persisted in SQLite (one table of JSON per object kind).

Every operation runs in one SQLite transaction under one lock, so an idempotency check, the state
change and the stored response are atomic even when the HTTP layer serves requests from a thread
pool. Card numbers and CVCs never reach this module's storage: a token keeps the card's behaviour
profile, brand, funding, country, last4 and expiry only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import Any

from core.ids import new_id
from psp.sandbox import cards

JSON = dict[str, Any]
EventSink = Callable[[JSON], None]

log = logging.getLogger(__name__)

WALLET_PROVIDER = "sandbox_wallet"

_KINDS = frozenset({"tokens", "payments", "refunds", "disputes", "events", "idempotency", "attempts"})


class SandboxError(Exception):
    """An API error with its HTTP status; rendered as {"error": {type, code, message, param}}."""

    def __init__(self, status: int, type: str, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param

    def body(self) -> JSON:
        return {"error": {"type": self.type, "code": self.code, "message": self.message, "param": self.param}}


def _conflict(payment: JSON, action: str) -> SandboxError:
    return SandboxError(
        409,
        "invalid_request_error",
        "payment_unexpected_state",
        f"Cannot {action} a payment with status {payment['status']}.",
    )


def fingerprint(route: str, body: JSON | None) -> str:
    """What an idempotency key is bound to: the route (method, path) and the parsed body."""
    canonical = json.dumps({"route": route, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _now() -> int:
    return int(time.time())


class SandboxState:
    def __init__(self, db_path: str, *, on_event: EventSink | None = None) -> None:
        # Re-entrant: idempotent() holds the lock while the operation it wraps takes it again.
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        if db_path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        for kind in sorted(_KINDS):
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {kind} (id TEXT PRIMARY KEY, ref TEXT, data TEXT NOT NULL)"
            )
            self._conn.execute(f"CREATE INDEX IF NOT EXISTS {kind}_ref ON {kind}(ref)")
        self._depth = 0
        self._pending: list[JSON] = []
        self.on_event = on_event

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- storage ----

    @contextmanager
    def _tx(self) -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except SandboxError:
                # API errors are raised before any change, except the counted attempt of the
                # processing_error card, which must survive its own 500.
                self._commit()
                raise
            except BaseException:
                self._conn.execute("ROLLBACK")
                self._pending.clear()
                raise
            else:
                self._commit()
            finally:
                self._depth = 0

    def _commit(self) -> None:
        self._conn.execute("COMMIT")
        events, self._pending = self._pending, []
        if self.on_event is None:
            return
        for event in events:
            try:
                self.on_event(event)
            except Exception:  # webhooks are best effort; they never fail the request
                log.exception("sandbox: could not queue event %s", event["id"])

    def _get(self, kind: str, id: str) -> JSON | None:
        assert kind in _KINDS
        row = self._conn.execute(f"SELECT data FROM {kind} WHERE id = ?", (id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _put(self, kind: str, id: str, data: JSON, ref: str | None = None) -> None:
        assert kind in _KINDS
        self._conn.execute(
            f"INSERT INTO {kind} (id, ref, data) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET ref = excluded.ref, data = excluded.data",
            (id, ref, json.dumps(data, sort_keys=True)),
        )

    def _find(self, kind: str, ref: str) -> list[JSON]:
        assert kind in _KINDS
        rows = self._conn.execute(f"SELECT data FROM {kind} WHERE ref = ? ORDER BY rowid", (ref,))
        return [json.loads(r[0]) for r in rows]

    def _emit(self, type: str, obj: JSON) -> None:
        event: JSON = {
            "id": new_id("evt"),
            "object": "event",
            "type": type,
            "created": _now(),
            "data": {"object": obj},
        }
        self._put("events", event["id"], event, ref=obj["id"])
        self._pending.append(event)  # delivered only once the transaction commits

    def _payment(self, payment_id: str) -> JSON:
        payment = self._get("payments", payment_id)
        if payment is None:
            raise SandboxError(
                404, "invalid_request_error", "resource_missing", f"No such payment: '{payment_id}'", "id"
            )
        return payment

    def _save_payment(self, payment: JSON, previous_status: str | None) -> None:
        self._put("payments", payment["id"], payment, ref=payment["reference"])
        if payment["status"] != previous_status:
            self._emit(f"payment.{payment['status']}", payment)

    # ---- idempotency ----

    def idempotent(self, key: str, fp: str, op: Callable[[], JSON]) -> tuple[int, JSON, bool]:
        """Run op once per key: returns (status, body, replayed).

        Same key + same fingerprint replays the stored answer (a stored 4xx too); another fingerprint
        is refused. 5xx answers are not stored, so a retry with the same key runs op again.
        """
        with self._tx():
            record = self._get("idempotency", key)
            if record is not None:
                if record["fingerprint"] != fp:
                    raise SandboxError(
                        400,
                        "idempotency_error",
                        "idempotency_key_reused",
                        "This Idempotency-Key was already used with a different request.",
                    )
                return record["status"], record["body"], True
            try:
                status, body = 200, op()
            except SandboxError as e:
                if e.status >= 500:
                    raise
                status, body = e.status, e.body()
            self._put(
                "idempotency", key, {"fingerprint": fp, "status": status, "body": body, "created": _now()}
            )
            return status, body, False

    def _count_attempt(self, key: str) -> int:
        record = self._get("attempts", key) or {"count": 0}
        record["count"] += 1
        self._put("attempts", key, record)
        return int(record["count"])

    # ---- tokens ----

    def create_token(
        self, *, number: str, exp_month: int, exp_year: int, cvc: str, today: date | None = None
    ) -> JSON:
        try:
            digits, year = cards.validate_card(
                number, exp_month, exp_year, cvc, today=today or datetime.now(UTC).date()
            )
        except cards.CardError as e:
            raise SandboxError(400, "card_error", e.code, str(e), e.param) from None
        profile = cards.profile_for(digits)
        token: JSON = {
            "id": new_id("tok"),
            "object": "token",
            "brand": cards.brand_of(digits),
            "funding": profile.funding,
            "country": profile.country,
            "last4": digits[-4:],
            "exp_month": exp_month,
            "exp_year": year,
            "created": _now(),
        }
        with self._tx():
            self._put(
                "tokens",
                token["id"],
                {**token, "behavior": profile.behavior, "decline_code": profile.decline_code},
            )
        return token

    def create_method_token(self, *, type: str, bank: str | None = None) -> JSON:
        """A wallet or netbanking token: nothing secret, the customer approves each payment on the
        redirect page."""
        token: JSON = {"id": new_id("tok"), "object": "token", "type": type, "created": _now()}
        if type == "wallet":
            token["wallet"] = WALLET_PROVIDER
        else:
            token["bank"] = bank
        with self._tx():
            self._put("tokens", token["id"], {**token, "behavior": "redirect", "decline_code": None})
        return token

    # ---- payments ----

    def authorize(
        self,
        *,
        idempotency_key: str,
        amount: int,
        currency: str,
        token: str,
        reference: str,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        return_url: str | None = None,
        redirect_base: str = "",
    ) -> JSON:
        """redirect_base: this service's URL as the client reached it, for a redirect method's page."""
        with self._tx():
            card = self._get("tokens", token)
            if card is None:
                raise SandboxError(
                    400, "invalid_request_error", "resource_missing", f"No such token: '{token}'", "token"
                )
            behavior = card["behavior"]
            if (
                behavior == "processing_error"
                and self._count_attempt(idempotency_key) <= cards.PROCESSING_ERROR_ATTEMPTS
            ):
                raise SandboxError(
                    500, "api_error", "processing_error", "An error occurred while processing the card."
                )
            payment: JSON = {
                "id": new_id("psp_pay"),
                "object": "payment",
                "reference": reference,
                "status": "authorized",
                "amount": amount,
                "currency": currency.lower(),
                "amount_captured": 0,
                "amount_refunded": 0,
                "decline_code": None,
                "message": None,
                "next_action": None,
                "authorizations": 1,
                "token": token,
                "description": description,
                "metadata": dict(metadata or {}),
                "created": _now(),
            }
            if behavior == "decline":
                code = card["decline_code"]
                payment.update(
                    status="failed", decline_code=code, message=cards.DECLINE_MESSAGES[code], authorizations=0
                )
            elif behavior == "otp":
                payment.update(
                    status="requires_action", next_action={"type": "otp", "url": None}, authorizations=0
                )
            elif behavior == "redirect":
                # a wallet or bank: the customer approves on the redirect page (psp.sandbox.redirect)
                url = f"{redirect_base.rstrip('/')}/redirect/{payment['id']}"
                payment.update(
                    status="requires_action",
                    next_action={"type": "redirect_to_url", "url": url},
                    authorizations=0,
                    method=card["type"],
                )
                if card.get("bank"):
                    payment["bank"] = card["bank"]
            if return_url:
                payment["return_url"] = return_url
            self._save_payment(payment, None)
            return payment

    def authenticate(self, payment_id: str, otp: str) -> JSON:
        with self._tx():
            payment = self._payment(payment_id)
            previous = payment["status"]
            if previous != "requires_action":
                raise _conflict(payment, "authenticate")
            payment["next_action"] = None
            if hmac.compare_digest(otp.encode(), cards.VALID_OTP.encode()):
                payment.update(status="authorized", authorizations=1)
            else:
                payment.update(
                    status="failed",
                    decline_code="authentication_failed",
                    message=cards.DECLINE_MESSAGES["authentication_failed"],
                )
            self._save_payment(payment, previous)
            return payment

    def capture(self, payment_id: str, amount: int | None = None) -> JSON:
        with self._tx():
            payment = self._payment(payment_id)
            previous = payment["status"]
            if previous != "authorized":
                raise _conflict(payment, "capture")
            to_capture = payment["amount"] if amount is None else amount
            if not 0 < to_capture <= payment["amount"]:
                raise SandboxError(
                    400,
                    "invalid_request_error",
                    "amount_too_large",
                    f"Capture amount must be between 1 and the authorized {payment['amount']}.",
                    "amount",
                )
            # A partial capture releases the rest of the authorization: there is no second capture.
            payment.update(status="captured", amount_captured=to_capture)
            self._save_payment(payment, previous)
            return payment

    def void(self, payment_id: str) -> JSON:
        with self._tx():
            payment = self._payment(payment_id)
            previous = payment["status"]
            # Voiding twice is a no-op, and a failed payment holds nothing to release: both answer
            # the payment unchanged so a saga's undo step can always run.
            if previous in ("canceled", "failed"):
                return payment
            if previous not in ("authorized", "requires_action"):
                raise _conflict(payment, "void")
            payment.update(status="canceled", next_action=None)
            self._save_payment(payment, previous)
            return payment

    def refund(self, payment_id: str, amount: int) -> JSON:
        with self._tx():
            payment = self._payment(payment_id)
            previous = payment["status"]
            if previous not in ("captured", "refunded"):
                raise _conflict(payment, "refund")
            refundable = payment["amount_captured"] - payment["amount_refunded"]
            if not 0 < amount <= refundable:
                raise SandboxError(
                    409,
                    "invalid_request_error",
                    "amount_too_large",
                    f"Refund amount {amount} exceeds the refundable {refundable}.",
                    "amount",
                )
            refund = {
                "id": new_id("re"),
                "object": "refund",
                "payment": payment_id,
                "amount": amount,
                "currency": payment["currency"],
                "status": "succeeded",
                "created": _now(),
            }
            payment["amount_refunded"] += amount
            if payment["amount_refunded"] == payment["amount_captured"]:
                payment["status"] = "refunded"
            self._put("refunds", refund["id"], refund, ref=payment_id)
            self._emit("refund.succeeded", refund)
            self._save_payment(payment, previous)
            return refund

    def get_payment(self, payment_id: str) -> JSON:
        with self._tx():
            return self._payment(payment_id)

    def find_payments(self, reference: str) -> list[JSON]:
        with self._tx():
            return self._find("payments", reference)

    def list_payments(self, limit: int = 10) -> list[JSON]:
        with self._tx():
            rows = self._conn.execute("SELECT data FROM payments ORDER BY rowid DESC LIMIT ?", (limit,))
            return [json.loads(r[0]) for r in rows]

    def events(self, object_id: str) -> list[JSON]:
        """The events emitted about one object, oldest first."""
        with self._tx():
            return self._find("events", object_id)

    # ---- for the routers kept in their own modules (psp/sandbox/disputes.py, redirect.py) ----

    def save_payment(self, payment: JSON, previous_status: str | None) -> None:
        """Store a payment; a status change emits its payment.<status> event (inside transaction())."""
        self._save_payment(payment, previous_status)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit under the lock; events emitted inside are delivered after the commit."""
        with self._tx():
            yield

    def load(self, kind: str, id: str) -> JSON | None:
        return self._get(kind, id)

    def store(self, kind: str, id: str, data: JSON, ref: str | None = None) -> None:
        self._put(kind, id, data, ref)

    def find(self, kind: str, ref: str) -> list[JSON]:
        return self._find(kind, ref)

    def emit(self, type: str, obj: JSON) -> None:
        self._emit(type, obj)
