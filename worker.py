"""The Temporal worker process: one client (pydantic converter + encryption codec), one Worker on
the paysaga task queue with the checkout workflow and every activity, dependencies injected.

Tuned for a small box (2 cores): workflow tasks are cheap CPU bursts, activities mostly wait on
the PSP (async, on the event loop) or on the database (sync, in the thread pool), so concurrency
is bounded by slots rather than by cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import warnings
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session
from temporalio.client import Client
from temporalio.worker import Worker

from activities.disputes import DisputeActivities
from activities.fraud import FraudActivities
from activities.ledger import LedgerActivities
from activities.notify import NotifyActivities
from activities.payments import PaymentActivities
from activities.psp import PspActivities
from activities.refunds import RefundActivities
from activities.routing import Circuits, RoutingActivities
from activities.stock import StockActivities
from core import db
from core.config import Settings, get_settings
from core.temporal import connect
from psp.base import PSP
from psp.registry import build_psps, pooled_http_client
from workflows.checkout import CheckoutWorkflow
from workflows.dispute import DisputeWorkflow
from workflows.refund import RefundWorkflow
from workflows.returns import ReturnWorkflow

log = structlog.get_logger("worker")

MAX_CONCURRENT_ACTIVITIES = 100
MAX_CONCURRENT_WORKFLOW_TASKS = 100
# Sync activities (database, SMTP) run here; more threads than cores because they mostly wait on I/O,
# but not 100: every thread can hold a DB connection and SQLite serialises writers anyway.
ACTIVITY_THREADS = 32
GRACEFUL_SHUTDOWN = timedelta(seconds=10)
CONNECT_TIMEOUT_S = 120.0


def configure_logging(settings: Settings) -> None:
    """structlog for our loggers, and the same renderer for stdlib loggers (temporalio, sqlalchemy)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Plain tracebacks only: a rich traceback shows local variables, and a local can hold card data.
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.log_json
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    final: list[Any] = [structlog.processors.format_exc_info] if settings.log_json else []
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler()  # stderr: stdout stays clean for CLI output (JSON)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # one line per plugin at every start says nothing; the "Running upgrade" lines stay
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def all_activities(settings: Settings, sessions: sessionmaker[Session], psps: Mapping[str, PSP]) -> list[Any]:
    # one breaker per PSP, fed by every PSP call of this worker and read by choose_psp
    circuits = Circuits(
        failure_threshold=settings.psp_breaker_failures, cooldown_s=settings.psp_breaker_cooldown_s
    )
    return [
        *PspActivities(psps, circuits).activities(),
        *RoutingActivities(circuits, list(psps)).activities(),
        *PaymentActivities(sessions).activities(),
        *StockActivities(sessions).activities(),
        *FraudActivities(sessions).activities(),
        *LedgerActivities(sessions).activities(),
        *NotifyActivities(sessions, settings).activities(),
        *DisputeActivities(sessions, psps).activities(),
        *RefundActivities(sessions).activities(),
    ]


def build_worker(
    client: Client,
    settings: Settings,
    sessions: sessionmaker[Session],
    psps: Mapping[str, PSP],
    executor: Executor,
    task_queue: str | None = None,
) -> Worker:
    with warnings.catch_warnings():
        # The SDK warns when the thread pool is smaller than max_concurrent_activities. Deliberate:
        # the PSP activities are async and need no thread, and a sync activity that finds all
        # threads busy waits in the executor queue instead of opening yet another DB connection.
        warnings.filterwarnings("ignore", message=".*max_concurrent_activities.*max_workers")
        return Worker(
            client,
            task_queue=task_queue or settings.task_queue,
            workflows=[CheckoutWorkflow, DisputeWorkflow, RefundWorkflow, ReturnWorkflow],
            activities=all_activities(settings, sessions, psps),
            activity_executor=executor,
            max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
            max_concurrent_workflow_tasks=MAX_CONCURRENT_WORKFLOW_TASKS,
            max_cached_workflows=settings.worker_max_cached_workflows,
            graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            identity=f"paysaga-worker@{socket.gethostname()}:{os.getpid()}",
        )


async def connect_with_retry(settings: Settings, *, limit_s: float = CONNECT_TIMEOUT_S) -> Client:
    """The dev server may still be starting (or the cluster restarting): retry with backoff."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    delay = 0.2
    attempt = 0
    while True:
        attempt += 1
        try:
            return await connect(settings)
        except Exception as exc:  # connection refused, not ready yet, DNS...: all worth a retry
            if loop.time() + delay > deadline:
                raise
            log.info(
                "temporal not ready, retrying",
                address=settings.temporal_address,
                attempt=attempt,
                error=str(exc) or type(exc).__name__,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)


def _install_signal_handlers(stop: asyncio.Event) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not on this platform
            pass
    return installed


async def run_worker(
    settings: Settings,
    *,
    client: Client | None = None,
    task_queue: str | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT when no event is given), then drain gracefully."""
    own_signals: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        own_signals = _install_signal_handlers(stop)
    if client is None:
        client = await connect_with_retry(settings)
    engine = db.make_engine(settings.database_url)
    sessions = db.session_factory(engine)
    executor = ThreadPoolExecutor(max_workers=ACTIVITY_THREADS, thread_name_prefix="activity")
    # one pooled HTTP client for every PSP call; per-call timeouts are the activities' business
    http = pooled_http_client(connect_s=5.0, max_connections=MAX_CONCURRENT_ACTIVITIES)
    try:
        psps = build_psps(settings, http)
        worker = build_worker(client, settings, sessions, psps, executor, task_queue)
        run = asyncio.create_task(worker.run())
        waiter = asyncio.create_task(stop.wait())
        log.info(
            "worker started",
            task_queue=worker.task_queue,
            namespace=client.namespace,
            address=settings.temporal_address,
        )
        done, _ = await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if run in done:  # the worker failed on its own (fatal poll error): surface it
            waiter.cancel()
            run.result()
            return
        log.info("worker stopping: draining in-flight tasks", grace_s=GRACEFUL_SHUTDOWN.total_seconds())
        await worker.shutdown()
        await run
        log.info("worker stopped")
    finally:
        await http.aclose()
        executor.shutdown(wait=False, cancel_futures=True)
        engine.dispose()
        loop = asyncio.get_running_loop()
        for sig in own_signals:
            loop.remove_signal_handler(sig)


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    asyncio.run(run_worker(settings))


if __name__ == "__main__":
    main()
