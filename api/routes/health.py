"""/healthz: the API is up and can reach its database (and says whether Temporal answers)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from api.deps import run_db, sessions_of
from api.schemas import HealthPublic

router = APIRouter(tags=["health"])
log = structlog.get_logger("api.health")


def _ping_db(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        session.execute(text("SELECT 1"))


async def _temporal_status(request: Request) -> str:
    client = getattr(request.app.state, "temporal", None)
    service = getattr(client, "service_client", None)
    if service is None:
        return "unknown"
    try:
        async with asyncio.timeout(2):
            ok = await service.check_health(timeout=timedelta(seconds=2))
        return "ok" if ok else "unavailable"
    except Exception:
        return "unavailable"


@router.get("/healthz", response_model=HealthPublic, summary="Liveness and dependencies")
async def healthz(request: Request) -> JSONResponse:
    try:
        await run_db(_ping_db, sessions_of(request))
        database = "ok"
    except Exception as exc:
        log.warning("healthz_database_unavailable", error=type(exc).__name__)
        database = "unavailable"
    temporal = await _temporal_status(request)
    # Only the database decides liveness: without Temporal the API still serves reads.
    healthy = database == "ok" and temporal != "unavailable"
    body = HealthPublic(
        status="ok" if healthy else "degraded", database=database, temporal=temporal
    ).model_dump()
    return JSONResponse(body, status_code=200 if database == "ok" else 503)
