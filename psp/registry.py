"""Which PSP adapters exist, built once from Settings with the shared httpx client.

The sandbox is always there. Stripe is added when STRIPE_API_KEY is set; its adapter keeps its own
HTTP client (the Stripe SDK's httpx transport), closed with `await psps["stripe"].aclose()`.
"""

from __future__ import annotations

import httpx

from core.config import Settings
from psp.base import PSP
from psp.sandbox.client import SandboxPSP
from psp.stripe import StripePSP


def build_psps(settings: Settings, http: httpx.AsyncClient) -> dict[str, PSP]:
    psps: dict[str, PSP] = {"sandbox": SandboxPSP(http, settings.sandbox_url, settings.sandbox_api_key)}
    # getattr: these Settings fields may not exist yet in every checkout of core/config.py
    if settings.stripe_api_key:
        psps["stripe"] = StripePSP.from_settings(settings)
    return psps
