"""The API application: ``create_app()`` builds FastAPI with its lifespan (DB engine, HTTP client,
PSP registry, Temporal client), routes, error handlers, request logging and Prometheus metrics.

Run it with ``uvicorn --factory api.app:create_app`` (the CLI does). Migrations are not run here.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import KeyCache
from api.errors import install_error_handlers, internal_error_response, invalid
from api.routes import (
    carts,
    customers,
    disputes,
    health,
    ledger,
    orders,
    payment_methods,
    payments,
    products,
    psp_webhooks,
    refunds,
    returns,
)
from core.config import Settings, get_settings
from core.db import make_engine, session_factory
from psp.registry import pooled_http_client

log = structlog.get_logger("api")


def configure_logging(settings: Settings) -> None:
    """structlog through stdlib logging to stderr, JSON or console. Tracebacks are rendered
    plainly, never with frame locals: a local in a request handler can hold a card number."""
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if settings.log_json:
        final += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        final.append(
            structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Metrics:
    def __init__(self) -> None:
        # One registry per app: several apps in one test process must not collide.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "paysaga_http_requests_total",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "paysaga_http_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30),
        )


_QUIET_ROUTES = {"/healthz", "/metrics"}


class RequestMiddleware:
    """Request id, access log (method, route template, status, duration: never bodies or query
    strings), metrics, and the last-resort 500 for anything unexpected."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(8)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_started = True
                headers = list(message.get("headers", []))
                headers.append((b"request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if _unstorable_text(exc):
                # NUL bytes and unpaired surrogates are valid JSON but no database stores them: bad
                # input (the failed statement rolled its transaction back), not a server error.
                if not response_started:
                    await invalid(
                        "parameter_invalid",
                        "A text value contains a NUL character or an unpaired surrogate.",
                    ).response()(scope, receive, send_wrapper)
                return
            # No body and no query string. The traceback is formatted here, plainly: a renderer
            # that prints frame locals would show the parsed request body of FastAPI's frames.
            log.error(
                "unhandled_error",
                method=scope.get("method"),
                route=getattr(scope.get("route"), "path", None) or "unmatched",
                error=type(exc).__name__,
                traceback="".join(traceback.format_exception(exc)),
            )
            if not response_started:
                await internal_error_response()(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            elapsed = time.perf_counter() - started
            labels = (method, template, str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(elapsed)
            fields = {"method": method, "route": template, "status": status, "ms": round(elapsed * 1000, 1)}
            if template in _QUIET_ROUTES:
                log.debug("request", **fields)
            else:
                log.info("request", **fields)
            structlog.contextvars.unbind_contextvars("request_id")


def _unstorable_text(exc: BaseException) -> bool:
    """Did the database refuse a text value (NUL byte on PostgreSQL, lone surrogate anywhere)?"""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, UnicodeEncodeError) or "NUL (0x00)" in str(err):
            return True
        todo += [getattr(err, "orig", None), err.__cause__, err.__context__]
    return False


def create_app(
    settings: Settings | None = None,
    *,
    temporal_client: Any = None,
    psps: dict[str, Any] | None = None,
) -> FastAPI:
    """The API. Inject ``temporal_client`` / ``psps`` in tests; otherwise the lifespan connects to
    Temporal (core.temporal.connect) and builds the PSP registry (psp.registry.build_psps)."""
    settings = settings or get_settings()
    if not structlog.is_configured():
        configure_logging(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        http = pooled_http_client(connect_s=3.0, max_connections=100)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.http = http
        try:
            if psps is not None:
                app.state.psps = psps
            else:
                from psp.registry import build_psps

                app.state.psps = build_psps(settings, http)
            if temporal_client is not None:
                app.state.temporal = temporal_client
            else:
                from core.temporal import connect

                app.state.temporal = await connect(settings)
            log.info("api_started", env=settings.env, temporal=settings.temporal_address)
            yield
        finally:
            await http.aclose()
            engine.dispose()

    app = FastAPI(
        title="paysaga",
        version="0.1.0",
        description=(
            "Payments on durable Temporal workflows. Authenticate with `Authorization: Bearer <key>`; "
            'amounts are integer minor units; errors are `{"error": {type, code, message, param}}`.'
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.key_cache = KeyCache()
    metrics = Metrics()
    app.state.metrics = metrics

    install_error_handlers(app)
    app.add_middleware(RequestMiddleware, metrics=metrics)

    for module in (
        customers,
        payment_methods,
        products,
        carts,
        orders,
        payments,
        refunds,
        returns,
        disputes,
        psp_webhooks,
        ledger,
        health,
    ):
        app.include_router(module.router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
