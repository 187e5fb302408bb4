"""The sandbox PSP's HTTP API: a fake card processor in the manner of Stripe's test mode.

Run it with uvicorn on create_app(...). Every /v1 route needs `Authorization: Bearer <api_key>`;
every POST that moves money needs an Idempotency-Key. Handlers are plain functions (run in the
thread pool) over SandboxState, which serializes them with its lock. Request bodies are never
logged: /v1/tokens carries card numbers.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from psp.sandbox.disputes import dispute_router
from psp.sandbox.faults import FaultMiddleware, FaultPlan, FaultSettings, quiet_server_logs
from psp.sandbox.redirect import create_method_token, is_method_token_request, redirect_router
from psp.sandbox.state import JSON, SandboxError, SandboxState, fingerprint
from psp.signing import sign_header

log = logging.getLogger(__name__)

MAX_AMOUNT = 10**12
SIGNATURE_HEADER = "Paysaga-Signature"


# ---- request bodies ----


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenCreate(_Body):
    number: StrictStr = Field(max_length=32)
    exp_month: int
    exp_year: int
    cvc: StrictStr = Field(max_length=8)
    name: str | None = Field(default=None, max_length=200)


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=40)]
MetadataValue = Annotated[str, StringConstraints(max_length=500)]


class PaymentCreate(_Body):
    amount: StrictInt = Field(gt=0, le=MAX_AMOUNT)
    currency: str = Field(pattern=r"^[A-Za-z]{3}$")
    token: str = Field(min_length=1, max_length=255)
    reference: str = Field(min_length=1, max_length=255)
    description: str | None = Field(default=None, max_length=1000)
    # Stripe-like limits; "sandbox_fault" here injects a fault for this payment (psp.sandbox.faults)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=20)
    # where a redirect method's page sends the customer's browser back after the decision
    return_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://")


class AuthenticateBody(_Body):
    otp: StrictStr = Field(max_length=32)


class CaptureBody(_Body):
    amount: StrictInt | None = Field(default=None, gt=0, le=MAX_AMOUNT)


class RefundBody(_Body):
    amount: StrictInt = Field(gt=0, le=MAX_AMOUNT)


# ---- webhooks ----


class WebhookSender:
    """Delivers signed events from one background thread: never blocks or fails the request that
    caused them. Best effort: a few attempts with backoff, then the event is dropped (and logged).
    A FaultPlan can lose, duplicate, delay and reorder deliveries (counted in lost / duplicated)."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.5,
        faults: FaultPlan | None = None,
    ) -> None:
        self.url = url
        self._secret = secret
        self._faults = faults
        self._attempts = attempts
        self._backoff = backoff
        self._client = httpx.Client(transport=transport, timeout=timeout)
        self._queue: queue.Queue[JSON | None] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.delivered = 0
        self.dropped = 0
        self.lost = 0
        self.duplicated = 0

    def enqueue(self, event: JSON) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.warning("sandbox webhook queue full, dropping event %s", event["id"])
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (within timeout), then stop."""
        with self._start_lock:
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            batch, stop = [event], False
            window = self._faults.webhook_reorder_window_s if self._faults else None
            if window is not None:
                # reorder fault: what arrives within the window is delivered newest first
                deadline = time.monotonic() + window
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        more = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                batch.reverse()
            for item in batch:
                try:
                    self._deliver_with_faults(item)
                except Exception:  # the thread must survive anything one event does
                    log.exception("sandbox webhook delivery crashed for %s", item["id"])
            if stop:
                return

    def _deliver_with_faults(self, event: JSON) -> None:
        if self._faults is None:
            self._deliver(event)
            return
        copies = self._faults.webhook_copies()
        if copies == 0:
            self.lost += 1
            log.info("sandbox webhook %s lost (fault)", event["id"])
            return
        if self._faults.webhook_delay_s:
            time.sleep(self._faults.webhook_delay_s)
        for _ in range(copies):
            self._deliver(event)
        self.duplicated += copies - 1

    def _deliver(self, event: JSON) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        for attempt in range(self._attempts):
            headers = {
                "Content-Type": "application/json",
                # signed per attempt so a late retry is not refused as too old
                SIGNATURE_HEADER: sign_header(body, self._secret, int(time.time())),
            }
            try:
                response = self._client.post(self.url, content=body, headers=headers)
                if response.status_code < 300:
                    self.delivered += 1
                    return
            except httpx.HTTPError as e:
                log.info(
                    "sandbox webhook %s attempt %d failed: %s", event["id"], attempt + 1, type(e).__name__
                )
            if attempt + 1 < self._attempts:
                time.sleep(self._backoff * 2**attempt)
        self.dropped += 1
        log.warning("sandbox webhook %s (%s) not delivered", event["id"], event["type"])


# ---- the app ----


def _error(status: int, type: str, code: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(SandboxError(status, type, code, message, param).body(), status_code=status)


def _respond(result: tuple[int, JSON, bool]) -> JSONResponse:
    status, body, replayed = result
    return JSONResponse(
        body, status_code=status, headers={"Idempotent-Replayed": "true"} if replayed else None
    )


def _require_idempotency_key(value: str | None) -> str:
    if not value or not value.strip():
        raise SandboxError(
            400,
            "invalid_request_error",
            "idempotency_key_missing",
            "This request needs an Idempotency-Key header.",
            "Idempotency-Key",
        )
    if len(value) > 255:
        raise SandboxError(
            400,
            "invalid_request_error",
            "idempotency_key_invalid",
            "Idempotency-Key is too long.",
            "Idempotency-Key",
        )
    return value


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]


def create_app(
    *,
    db_path: str,
    api_key: str,
    webhook_secret: str,
    webhook_url: str = "",
    webhook_transport: httpx.BaseTransport | None = None,
    faults: FaultPlan | None = None,
) -> FastAPI:
    """The sandbox PSP. webhook_transport exists for tests (httpx.MockTransport). Faults start off;
    POST /admin/faults turns them on (psp.sandbox.faults)."""
    plan = faults or FaultPlan()
    sender = (
        WebhookSender(webhook_url, webhook_secret, transport=webhook_transport, faults=plan)
        if webhook_url
        else None
    )
    state = SandboxState(db_path, on_event=sender.enqueue if sender else None)
    quiet_server_logs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if sender is not None:
                await anyio.to_thread.run_sync(sender.close)
            state.close()

    app = FastAPI(title="paysaga sandbox PSP", version="1", lifespan=lifespan)
    app.state.sandbox = state
    app.state.webhooks = sender
    app.state.faults = plan
    app.add_middleware(FaultMiddleware, plan=plan)

    @app.exception_handler(SandboxError)
    async def _sandbox_error(request: Request, exc: SandboxError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Built from locations and messages only: pydantic's "input" could echo a card number.
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "header", "path")]
        param = ".".join(loc) or None
        kind = first.get("type", "")
        code = {"missing": "parameter_missing", "json_invalid": "invalid_json"}.get(kind, "parameter_invalid")
        message = (
            f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        )
        return _error(400, "invalid_request_error", code, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "resource_missing", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, "invalid_request_error", code, str(exc.detail))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    def require_api_key(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), api_key.encode()
        ):
            raise SandboxError(401, "authentication_error", "invalid_api_key", "Invalid API key provided.")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.post("/tokens")
    def create_token(body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
        if is_method_token_request(body):  # a wallet or a bank (psp.sandbox.redirect)
            return JSONResponse(create_method_token(state, body))
        try:
            card = TokenCreate.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError(
                [{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
            ) from None
        token = state.create_token(
            number=card.number, exp_month=card.exp_month, exp_year=card.exp_year, cvc=card.cvc
        )
        return JSONResponse(token)

    @v1.post("/payments")
    def create_payment(
        body: PaymentCreate, request: Request, idempotency_key: IdempotencyKey = None
    ) -> JSONResponse:
        key = _require_idempotency_key(idempotency_key)
        fields = body.model_dump()
        for optional in ("metadata", "return_url"):
            if fields[optional] is None:
                # absent fields keep the fingerprint of the requests stored before they existed
                del fields[optional]
        base = str(request.base_url)
        return _respond(
            state.idempotent(
                key,
                fingerprint("POST /v1/payments", fields),
                lambda: state.authorize(idempotency_key=key, redirect_base=base, **fields),
            )
        )

    @v1.post("/payments/{payment_id}/authenticate")
    def authenticate(
        payment_id: str, body: AuthenticateBody, idempotency_key: IdempotencyKey = None
    ) -> JSONResponse:
        key = _require_idempotency_key(idempotency_key)
        route = f"POST /v1/payments/{payment_id}/authenticate"
        return _respond(
            state.idempotent(
                key, fingerprint(route, body.model_dump()), lambda: state.authenticate(payment_id, body.otp)
            )
        )

    @v1.post("/payments/{payment_id}/capture")
    def capture(
        payment_id: str, body: CaptureBody | None = None, idempotency_key: IdempotencyKey = None
    ) -> JSONResponse:
        key = _require_idempotency_key(idempotency_key)
        amount = body.amount if body is not None else None
        route = f"POST /v1/payments/{payment_id}/capture"
        return _respond(
            state.idempotent(
                key, fingerprint(route, {"amount": amount}), lambda: state.capture(payment_id, amount)
            )
        )

    @v1.post("/payments/{payment_id}/void")
    def void(payment_id: str, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        key = _require_idempotency_key(idempotency_key)
        route = f"POST /v1/payments/{payment_id}/void"
        return _respond(state.idempotent(key, fingerprint(route, None), lambda: state.void(payment_id)))

    @v1.post("/payments/{payment_id}/refunds")
    def refund(payment_id: str, body: RefundBody, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        key = _require_idempotency_key(idempotency_key)
        route = f"POST /v1/payments/{payment_id}/refunds"
        return _respond(
            state.idempotent(
                key, fingerprint(route, body.model_dump()), lambda: state.refund(payment_id, body.amount)
            )
        )

    @v1.get("/payments/{payment_id}")
    def get_payment(payment_id: str) -> JSONResponse:
        return JSONResponse(state.get_payment(payment_id))

    @v1.get("/payments")
    def list_payments(
        reference: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 10
    ) -> JSONResponse:
        if reference is not None:
            return JSONResponse({"object": "list", "data": state.find_payments(reference), "has_more": False})
        data = state.list_payments(limit + 1)
        return JSONResponse({"object": "list", "data": data[:limit], "has_more": len(data) > limit})

    app.include_router(v1)

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_api_key)])

    @admin.post("/faults")
    def set_faults(body: FaultSettings) -> JSONResponse:
        """Replace the fault settings; restarts the random sequences from the seed."""
        plan.configure(body)
        return JSONResponse(plan.snapshot())

    @admin.get("/faults")
    def get_faults() -> JSONResponse:
        return JSONResponse(plan.snapshot())

    @admin.delete("/faults")
    def clear_faults() -> JSONResponse:
        plan.configure(FaultSettings())
        return JSONResponse(plan.snapshot())

    app.include_router(admin)
    app.include_router(dispute_router(state, require_api_key))
    app.include_router(redirect_router(state))
    return app
