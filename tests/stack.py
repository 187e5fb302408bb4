"""Launch the whole local stack (`paysaga up`: Temporal dev server, sandbox PSP, worker, API) as a
subprocess on free loopback ports with its own data dir: used by the integration tests, the
benchmark and the chaos run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
SANDBOX_KEY = "sandbox-test-key"


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


def create_pg_database() -> tuple[str, str]:
    name = f"paysaga_it_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_stack(tmp: Path, database_url: str = "", *, restart: bool = False) -> Stack:
    """Start `paysaga up` (with --restart: crashed services come back) on SQLite unless a URL is given."""
    tmp.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{tmp / 'paysaga.db'}"
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
            [str(VENV_BIN / "paysaga"), "up", *(["--restart"] if restart else [])],
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


async def record_histories(stack: Stack) -> None:
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
