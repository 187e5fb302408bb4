"""Request-scoped access to what the lifespan built (settings, DB sessions, Temporal, PSPs), the
thread hop for blocking DB work, and small helpers shared by the routes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import Query, Request
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from api.errors import API_ERROR, ApiError, invalid
from core.config import Settings
from psp.base import PSP

T = TypeVar("T")


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def sessions_of(request: Request) -> sessionmaker[Session]:
    sessions: sessionmaker[Session] = request.app.state.sessions
    return sessions


def temporal_of(request: Request) -> Any:
    """The temporalio Client (typed Any: tests inject a fake for routes that do not touch it)."""
    client = getattr(request.app.state, "temporal", None)
    if client is None:
        raise ApiError(503, API_ERROR, "service_unavailable", "The workflow service is not available.")
    return client


def psp_of(request: Request, name: str | None = None) -> PSP:
    psps: dict[str, PSP] = request.app.state.psps
    psp_name = name or settings_of(request).psp_default
    psp = psps.get(psp_name)
    if psp is None:
        raise ApiError(503, API_ERROR, "psp_unavailable", "The payment processor is not available.")
    return psp


async def run_db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking database work off the event loop (SQLAlchemy here is sync)."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def unix(dt: datetime) -> int:
    return int(dt.timestamp())


class Page:
    """?limit=&starting_after= (ids are time-ordered, so pages walk ORDER BY id DESC)."""

    def __init__(
        self,
        limit: int = Query(10, ge=1, le=100, description="1 to 100, default 10"),
        starting_after: str | None = Query(
            None, max_length=64, description="an object id: return the objects created before it"
        ),
    ) -> None:
        self.limit = limit
        self.starting_after = starting_after or None

    def check_prefix(self, prefix: str) -> None:
        if self.starting_after is not None and not self.starting_after.startswith(prefix + "_"):
            raise invalid("parameter_invalid", f"starting_after must be a {prefix}_ id.", "starting_after")
