"""Which PSP adapters exist, built once from Settings with the shared httpx client.

The sandbox is always there; a second sandbox ("sandbox_b", same adapter, its own service and state)
when SANDBOX_B_URL or SANDBOX_B_PORT is set. Stripe is added when STRIPE_API_KEY is set; its adapter
keeps its own HTTP client (the Stripe SDK's httpx transport), closed with `await psps["stripe"].aclose()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from core.config import Settings
from psp.base import PSP
from psp.sandbox.client import SandboxPSP
from psp.stripe import StripePSP

# How long the pooled client keeps an idle connection to a PSP: below the server's own idle timeout
# (uvicorn, which serves the sandbox, closes after 5 s; httpx's default is also 5 s). With equal
# timeouts a request can go out on a connection the server is closing and fail before it reaches
# the PSP: the likely cause of a 503 from POST /v1/payment_methods seen once in CI.
KEEPALIVE_EXPIRY_S = 2.0


def pooled_http_client(*, connect_s: float, max_connections: int) -> httpx.AsyncClient:
    """The one HTTP client a process shares for every PSP call (build_psps takes it)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(10.0, connect=connect_s),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY_S
        ),
    )


# Every PSP name this code base can register, in the default routing order after PSP_DEFAULT.
KNOWN_PSPS: tuple[str, ...] = ("sandbox", "sandbox_b", "stripe")


def configured_psps(settings: Settings) -> list[str]:
    """The names build_psps registers for these settings (no client is built)."""
    names = ["sandbox"]
    if settings.sandbox_b_url:
        names.append("sandbox_b")
    if settings.stripe_api_key:
        names.append("stripe")
    return names


def default_order(settings: Settings, available: Sequence[str]) -> tuple[str, ...]:
    """The routing order for merchants without a matching rule: PSP_DEFAULT, then the others
    available in KNOWN_PSPS order."""
    rest = sorted(
        (p for p in available if p != settings.psp_default),
        key=lambda p: KNOWN_PSPS.index(p) if p in KNOWN_PSPS else len(KNOWN_PSPS),
    )
    head = [settings.psp_default] if settings.psp_default in available else []
    return (*head, *rest)


def build_psps(settings: Settings, http: httpx.AsyncClient) -> dict[str, PSP]:
    # The customer's browser comes back from a wallet or bank page to our API's return route.
    return_url = f"http://{settings.api_host}:{settings.api_port}/v1/payments/{{reference}}/return"
    psps: dict[str, PSP] = {
        "sandbox": SandboxPSP(http, settings.sandbox_url, settings.sandbox_api_key, return_url=return_url)
    }
    if settings.sandbox_b_url:
        sandbox_b = SandboxPSP(http, settings.sandbox_b_url, settings.sandbox_api_key, return_url=return_url)
        sandbox_b.name = "sandbox_b"  # the instance's name is the key everything else uses
        psps["sandbox_b"] = sandbox_b
    if settings.stripe_api_key:
        psps["stripe"] = StripePSP.from_settings(settings)
    return psps
