"""Fault injection for the sandbox PSP: the failures a real PSP shows, on demand and reproducible.

A FaultPlan holds the global settings (set through `POST /admin/faults`) and a seeded random.Random.
Every faultable request draws the same number of random values whatever the settings, so the same seed
and the same sequence of requests give the same faults. Webhooks draw from a second generator (they
are delivered from another thread), so their fate does not depend on how requests and deliveries
interleave.

Request faults (FaultMiddleware; /admin/* never, /healthz only down_until):
- down_until: every request answers 503 with Retry-After until that unix time (health checks too);
- latency_ms: added before the request is handled;
- error_rate: 500/502/503 before anything is processed;
- rate_limit_rate: 429 with Retry-After, before anything is processed;
- reset_rate: the connection is closed without an answer, before anything is processed;
- timeout_after_commit_rate: the request is processed and committed, then the answer is held for
  commit_hold_ms (longer than a client's timeout) and the connection closed: the charge happened and
  the client cannot know.
One call can force a fault with the header `Sandbox-Fault: <error|rate_limit|reset|timeout_after_commit>`,
and one payment with `metadata: {"sandbox_fault": "<kind>", "sandbox_fault_count": "<n>"}` on its
authorize request: the first n (default 1) authorize calls for that reference get the fault, so a
retry with the same idempotency key then goes through.

Webhook faults (applied by the sandbox's WebhookSender): loss, duplication (the same event id
delivered twice), a delay before each delivery, and reordering (events arriving within
webhook_reorder_window_ms are delivered newest first).

How a "reset" looks on the wire: uvicorn answers 500 itself when an app fails before starting its
response, so the middleware starts a response and then raises SimulatedReset; the server closes the
connection with the body missing and an httpx client raises RemoteProtocolError.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from psp.sandbox.state import SandboxError

log = logging.getLogger(__name__)

FaultKind = Literal["error", "rate_limit", "reset", "timeout_after_commit"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
FAULT_HEADER = "Sandbox-Fault"
METADATA_FAULT = "sandbox_fault"
METADATA_COUNT = "sandbox_fault_count"
_ERROR_STATUSES = (500, 502, 503)
_Rate = Field(default=0.0, ge=0.0, le=1.0)


class FaultSettings(BaseModel):
    """The body of POST /admin/faults; every field defaults to "no fault"."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    latency_ms: int = Field(default=0, ge=0, le=60_000)
    error_rate: float = _Rate
    rate_limit_rate: float = _Rate
    retry_after_s: int = Field(default=1, ge=0, le=3600, description="Retry-After of a 429")
    reset_rate: float = _Rate
    timeout_after_commit_rate: float = _Rate
    commit_hold_ms: int = Field(
        default=10_000, ge=0, le=600_000, description="how long a committed answer is held, then dropped"
    )
    webhook_loss_rate: float = _Rate
    webhook_duplicate_rate: float = _Rate
    webhook_delay_ms: int = Field(default=0, ge=0, le=600_000)
    webhook_reorder: bool = False
    webhook_reorder_window_ms: int = Field(default=200, ge=1, le=60_000)
    down_until: float | None = Field(default=None, description="unix time; every request 503 until then")


class SimulatedReset(Exception):
    """Raised after a response has started so the server drops the connection (a fault, not a bug)."""


class _HideSimulatedResets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedReset))


def quiet_server_logs() -> None:
    """uvicorn logs each SimulatedReset as "Exception in ASGI application": they are on purpose."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideSimulatedResets) for f in logger.filters):
        logger.addFilter(_HideSimulatedResets())


@dataclass(frozen=True)
class Decision:
    latency_s: float = 0.0
    kind: FaultKind | None = None
    status: int = 0  # the HTTP status of an "error" fault


class FaultPlan:
    def __init__(self, settings: FaultSettings | None = None) -> None:
        self._lock = threading.Lock()
        self.configure(settings or FaultSettings())

    def configure(self, settings: FaultSettings) -> None:
        """Replace the settings and restart both random sequences from the seed."""
        with self._lock:
            self.settings = settings
            self._rng = random.Random(settings.seed)
            self._webhook_rng = random.Random(f"webhooks:{settings.seed}")
            self._armed: dict[str, int] = {}
            self.counts: Counter[str] = Counter()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"settings": self.settings.model_dump(), "injected": dict(self.counts)}

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    # ---- requests ----

    def down_for(self, now: float | None = None) -> float | None:
        """Seconds the PSP stays down, or None when it is up."""
        until = self.settings.down_until
        if until is None:
            return None
        remaining = until - (time.time() if now is None else now)
        return remaining if remaining > 0 else None

    def decide(self, forced: FaultKind | None = None) -> Decision:
        """The fault for the next request. Always draws five values so one fault's setting does not
        shift the faults of the requests after it."""
        with self._lock:
            s = self.settings
            u_error, u_status, u_limit, u_reset, u_commit = (self._rng.random() for _ in range(5))
            kind: FaultKind | None = forced
            if kind is None:
                if u_error < s.error_rate:
                    kind = "error"
                elif u_limit < s.rate_limit_rate:
                    kind = "rate_limit"
                elif u_reset < s.reset_rate:
                    kind = "reset"
                elif u_commit < s.timeout_after_commit_rate:
                    kind = "timeout_after_commit"
            if kind is not None:
                self.counts[kind] += 1
            status = _ERROR_STATUSES[int(u_status * len(_ERROR_STATUSES))] if kind == "error" else 0
            return Decision(latency_s=s.latency_ms / 1000, kind=kind, status=status)

    def arm_payment(self, reference: str, kind: FaultKind, count: int) -> bool:
        """Whether this authorize call of a payment carrying a metadata fault gets it."""
        with self._lock:
            remaining = self._armed.setdefault(f"{reference}:{kind}", count)
            if remaining <= 0:
                return False
            self._armed[f"{reference}:{kind}"] = remaining - 1
            return True

    # ---- webhooks ----

    def webhook_copies(self) -> int:
        """How many times to deliver the next event: 0 (lost), 1, or 2 (duplicated)."""
        with self._lock:
            u_loss, u_dup = self._webhook_rng.random(), self._webhook_rng.random()
            if u_loss < self.settings.webhook_loss_rate:
                self.counts["webhook_lost"] += 1
                return 0
            if u_dup < self.settings.webhook_duplicate_rate:
                self.counts["webhook_duplicated"] += 1
                return 2
            return 1

    @property
    def webhook_delay_s(self) -> float:
        return self.settings.webhook_delay_ms / 1000

    @property
    def webhook_reorder_window_s(self) -> float | None:
        s = self.settings
        return s.webhook_reorder_window_ms / 1000 if s.webhook_reorder else None


# ---- the ASGI middleware ----


def _error_body(status: int, type: str, code: str, message: str, param: str | None = None) -> bytes:
    return json.dumps(SandboxError(status, type, code, message, param).body()).encode()


async def _respond(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _reset(send: Send) -> None:
    # Start an answer that promises a body, then fail: the server closes the connection mid-answer.
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1024")],
        }
    )
    raise SimulatedReset("sandbox fault: connection reset")


class FaultMiddleware:
    def __init__(self, app: ASGIApp, plan: FaultPlan) -> None:
        self.app = app
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith("/admin"):
            await self.app(scope, receive, send)
            return
        down = self.plan.down_for()
        if down is not None:
            self.plan.count("down")
            body = _error_body(503, "api_error", "psp_unavailable", "The PSP is down (sandbox fault).")
            await _respond(send, 503, body, [(b"retry-after", str(math.ceil(down)).encode())])
            return
        if path == "/healthz":
            await self.app(scope, receive, send)
            return

        forced: FaultKind | None = None
        header = _header(scope, FAULT_HEADER.lower().encode())
        if header is not None:
            if header not in FAULT_KINDS:
                message = f"Unknown {FAULT_HEADER}: {header!r}; one of {', '.join(FAULT_KINDS)}."
                body = _error_body(400, "invalid_request_error", "parameter_invalid", message, FAULT_HEADER)
                await _respond(send, 400, body)
                return
            forced = header  # type: ignore[assignment]
        if scope["method"] == "POST" and path.rstrip("/") == "/v1/payments":
            receive, from_metadata = await self._payment_fault(receive)
            forced = forced or from_metadata

        decision = self.plan.decide(forced)
        if decision.latency_s:
            await asyncio.sleep(decision.latency_s)
        if decision.kind == "error":
            body = _error_body(decision.status, "api_error", "sandbox_fault", "Simulated PSP failure.")
            await _respond(send, decision.status, body)
        elif decision.kind == "rate_limit":
            body = _error_body(429, "rate_limit_error", "rate_limit", "Too many requests (sandbox fault).")
            retry_after = str(self.plan.settings.retry_after_s).encode()
            await _respond(send, 429, body, [(b"retry-after", retry_after)])
        elif decision.kind == "reset":
            await _reset(send)
        elif decision.kind == "timeout_after_commit":
            await self._commit_then_drop(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _commit_then_drop(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def swallow(message: Message) -> None:
            pass  # the answer is lost on the way back

        await self.app(scope, receive, swallow)
        await asyncio.sleep(self.plan.settings.commit_hold_ms / 1000)
        await _reset(send)

    async def _payment_fault(self, receive: Receive) -> tuple[Receive, FaultKind | None]:
        """Read the authorize body for a metadata fault; hand the same body on to the app."""
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # client gone: let the app see what it sees
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        kind: FaultKind | None = None
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None  # the app answers the bad JSON
        if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
            metadata = data["metadata"]
            wanted, reference = metadata.get(METADATA_FAULT), data.get("reference")
            if wanted in FAULT_KINDS and isinstance(reference, str):
                try:
                    count = max(0, int(metadata.get(METADATA_COUNT, 1)))
                except (TypeError, ValueError):
                    count = 1
                if self.plan.arm_payment(reference, wanted, count):
                    kind = wanted
        return replay, kind


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1").strip())
    return None
