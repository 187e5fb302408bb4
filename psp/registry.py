"""Which PSP adapters exist, built once from Settings with the shared httpx client."""

from __future__ import annotations

import httpx

from core.config import Settings
from psp.base import PSP
from psp.sandbox.client import SandboxPSP


def build_psps(settings: Settings, http: httpx.AsyncClient) -> dict[str, PSP]:
    return {"sandbox": SandboxPSP(http, settings.sandbox_url, settings.sandbox_api_key)}
