"""The `paysaga` CLI without the stack: argument parsing, the dev-server command line, key issuing
on a throw-away SQLite database, the supervisor's process handling, and the demo against a fake API."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

import cli
from core.config import Settings
from psp.sandbox.cards import TEST_CARDS, VALID_OTP
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'app.db'}", **kw)


# ---------------------------------------------------------------- parsing


def test_parser_routes_every_command() -> None:
    parser = cli.build_parser()
    for argv, func in [
        (["up"], cli.cmd_up),
        (["migrate"], cli.cmd_migrate),
        (["worker"], cli.cmd_worker),
        (["api"], cli.cmd_api),
        (["psp"], cli.cmd_psp),
        (["merchant", "create", "--name", "Acme"], cli.cmd_merchant_create),
        (["operator", "create", "--name", "ops"], cli.cmd_operator_create),
        (["demo"], cli.cmd_demo),
    ]:
        assert parser.parse_args(argv).func is func, argv
    assert parser.parse_args(["merchant", "create", "--name", "Acme"]).name == "Acme"


def test_demo_flags() -> None:
    parser = cli.build_parser()
    default = parser.parse_args(["demo"])
    assert default.otp_card is True and default.api is None and default.api_key is None
    plain = parser.parse_args(["demo", "--no-otp-card", "--api", "http://h:1", "--api-key", "sk_test_x"])
    assert plain.otp_card is False and plain.api == "http://h:1" and plain.api_key == "sk_test_x"


@pytest.mark.parametrize("argv", [[], ["merchant"], ["merchant", "create"], ["operator", "delete"], ["nope"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "usage: paysaga" in capsys.readouterr().err


# ---------------------------------------------------------------- the dev server command line


def _pairs(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, part in enumerate(cmd) if part == flag]


def test_temporal_command_from_settings(tmp_path: Path) -> None:
    s = _settings(tmp_path, temporal_address="127.0.0.1:17999", temporal_ui_port=18999)
    cmd = cli.temporal_command(s)
    assert Path(cmd[0]).name == "temporal" and Path(cmd[0]).exists()
    assert cmd[1:3] == ["server", "start-dev"]
    assert _pairs(cmd, "--db-filename") == [str(tmp_path / "temporal.db")]
    assert _pairs(cmd, "--sqlite-pragma") == ["journal_mode=wal", "synchronous=normal"]
    assert _pairs(cmd, "--ip") == ["127.0.0.1"]
    assert _pairs(cmd, "--port") == ["17999"]
    assert _pairs(cmd, "--ui-port") == ["18999"]
    assert _pairs(cmd, "--namespace") == ["default"]
    assert sorted(_pairs(cmd, "--search-attribute")) == [
        "AmountMinor=Int",
        "Currency=Keyword",
        "MerchantId=Keyword",
        "PaymentStatus=Keyword",
    ]


def test_temporal_binary_accepts_every_flag_we_pass(tmp_path: Path) -> None:
    cmd = cli.temporal_command(_settings(tmp_path))
    help_text = subprocess.run(
        [cmd[0], "server", "start-dev", "--help"], capture_output=True, text=True
    ).stdout
    for flag in {part for part in cmd if part.startswith("--")}:
        assert re.search(rf"\s{re.escape(flag)}\s", help_text), flag


def test_addresses_and_links() -> None:
    assert cli.split_address("temporal:7233") == ("temporal", 7233)
    with pytest.raises(ValueError):
        cli.split_address("no-port")
    s = Settings.model_validate({"temporal_address": "127.0.0.1:7233", "temporal_ui_port": 8233})
    assert (
        cli.workflow_url(s, "checkout:pay_01abc")
        == "http://127.0.0.1:8233/namespaces/default/workflows/checkout%3Apay_01abc"
    )
    assert cli.urls(s)["API docs"] == f"http://{s.api_host}:{s.api_port}/docs"


async def _search_attributes(address: str) -> dict[str, int]:
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
    from temporalio.client import Client

    client = await Client.connect(address)
    resp = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace="default")
    )
    return dict(resp.custom_attributes)


@pytest.mark.integration
async def test_dev_server_starts_and_restarts_on_the_same_file(tmp_path: Path) -> None:
    """The same command line serves the first start and a restart on the existing database file."""
    from temporalio.api.enums.v1 import IndexedValueType

    port = free_port()
    s = _settings(tmp_path, temporal_address=f"127.0.0.1:{port}", temporal_ui_port=free_port())
    for _round in range(2):
        proc = subprocess.Popen(cli.temporal_command(s), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not await cli.temporal_ready(s):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "dev server did not answer"
                await asyncio.sleep(0.2)
            attrs = await _search_attributes(s.temporal_address)
            assert attrs["PaymentStatus"] == IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
            assert attrs["AmountMinor"] == IndexedValueType.INDEXED_VALUE_TYPE_INT
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    assert (tmp_path / "temporal.db").exists()


# ---------------------------------------------------------------- keys


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DATA_DIR"))}
    env.update(DATA_DIR=str(tmp_path), DATABASE_URL=f"sqlite:///{tmp_path / 'app.db'}", ENV="test")
    return env


def test_merchant_create_prints_one_json_object_and_stores_only_the_hash(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cli", "merchant", "create", "--name", "Acme"],
        env=_env(tmp_path),
        cwd=tmp_path,  # no stray .env from the repository
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert len(out.strip().splitlines()) == 1
    got = json.loads(out)
    assert set(got) == {"id", "name", "api_key"}
    assert got["name"] == "Acme" and got["id"].startswith("acct_")
    assert got["api_key"].startswith("sk_test_") and len(got["api_key"]) > 20

    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT key_hash, merchant_id, operator_id FROM api_keys")).all()
        dump = "\n".join(conn.connection.driver_connection.iterdump())  # type: ignore[union-attr]
    engine.dispose()
    assert rows == [(hashlib.sha256(got["api_key"].encode()).hexdigest(), got["id"], None)]
    assert got["api_key"] not in dump


def test_operator_create_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    from core.config import get_settings

    get_settings.cache_clear()
    try:
        for name in ("ops", "ops2"):
            with pytest.raises(SystemExit) as exc:
                cli.main(["operator", "create", "--name", name])
            assert exc.value.code == 0
    finally:
        get_settings.cache_clear()
    lines = capsys.readouterr().out.strip().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["api_key"].startswith("op_test_") and first["name"] == "ops"
    assert first["id"] != second["id"] and first["api_key"] != second["api_key"]


# ---------------------------------------------------------------- .env.example


def test_env_example_lists_every_setting_with_its_default() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    assignments = {}
    for line in lines:
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            assignments[m.group(1).lower()] = m.group(2)
    assert set(Settings.model_fields) <= set(assignments), set(Settings.model_fields) - set(assignments)
    # loading the file as an env file changes nothing: the values shown are the defaults
    from_file = Settings(_env_file=str(ROOT / ".env.example"))  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert from_file.model_dump() == defaults.model_dump()


# ---------------------------------------------------------------- supervisor


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_supervisor_prefixes_output_and_stops_in_reverse_order(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    # each child logs its own SIGTERM with a timestamp, then exits
    child = (
        "import signal, sys, time\n"
        "name = sys.argv[1]\n"
        "def bye(*_):\n"
        f"    open({str(log)!r}, 'a').write(name + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('hello from', name, flush=True)\n"
        "time.sleep(60)\n"
    )
    out = io.StringIO()
    sup = cli.Supervisor(_settings(tmp_path), out=out)
    for name in ("temporal", "psp", "worker", "api"):
        await sup.start(name, [*_py(child), name])
    deadline = time.monotonic() + 20
    while out.getvalue().count("hello from") < 4:
        assert time.monotonic() < deadline, out.getvalue()
        await asyncio.sleep(0.05)
    assert sup.exited() is None
    await sup.stop_all()
    assert log.read_text().split() == ["api", "worker", "psp", "temporal"]
    text_out = out.getvalue()
    assert re.search(r"^worker\s+\| hello from worker$", text_out, re.M), text_out
    assert "\x1b[" not in text_out  # no colour codes when not writing to a terminal


async def test_supervisor_kills_a_child_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(cli.STOP_TIMEOUTS, "worker", 0.5)
    out = io.StringIO()
    sup = cli.Supervisor(_settings(tmp_path), out=out)
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
        "time.sleep(60)"
    )
    child = await sup.start("worker", _py(stubborn))
    deadline = time.monotonic() + 20
    while not re.search(r"^worker\s+\| up$", out.getvalue(), re.M):
        assert time.monotonic() < deadline, out.getvalue()
        await asyncio.sleep(0.05)
    started = time.monotonic()
    await sup.stop_all()
    assert child.proc is not None and child.proc.returncode == -9
    assert time.monotonic() - started < 5
    assert "did not stop in time" in out.getvalue()


async def test_supervisor_notices_an_unexpected_exit(tmp_path: Path) -> None:
    sup = cli.Supervisor(_settings(tmp_path), out=io.StringIO())
    await sup.start("psp", _py("import time; time.sleep(60)"))
    crasher = await sup.start("worker", _py("raise SystemExit(3)"))
    assert crasher.proc is not None
    await asyncio.wait_for(crasher.proc.wait(), 20)
    assert sup.exited() is crasher
    await sup.stop_all()
    assert sup.exited() is None  # stopped on purpose no longer counts as a crash


# ---------------------------------------------------------------- demo against a fake API


def test_demo_cards_come_from_the_sandbox_table() -> None:
    assert TEST_CARDS[cli.demo_card(otp=True)].behavior == "otp"
    assert TEST_CARDS[cli.demo_card(otp=False)].behavior == "succeed"


class FakeApi:
    """Just enough of the API for the demo: the OTP payment succeeds after authenticate."""

    def __init__(self, final: str) -> None:
        self.final = final
        self.calls: list[tuple[str, str, Any]] = []
        self.timeline = [{"status": "processing", "time": 1700000000, "reason": None}]
        self.status = "processing"
        self.polls = 0

    def payment(self) -> dict[str, Any]:
        return {
            "id": "pay_1",
            "status": self.status,
            "workflow_id": "checkout:pay_1",
            "next_action": {"type": "otp"} if self.status == "requires_action" else None,
            "timeline": list(self.timeline),
        }

    def move(self, status: str) -> None:
        self.status = status
        self.timeline.append({"status": status, "time": 1700000001, "reason": None})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body: Any = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, body))
        assert request.headers["authorization"] == "Bearer sk_test_demo"
        path = request.url.path
        if path == "/v1/customers":
            return httpx.Response(200, json={"id": "cus_1"})
        if path == "/v1/payment_methods":
            assert TEST_CARDS[body["card"]["number"]].behavior == "otp"
            return httpx.Response(200, json={"id": "pm_1", "card": {"brand": "visa", "last4": "3184"}})
        if path == "/v1/products":
            return httpx.Response(200, json={"id": f"prod_{len(self.calls)}", **body})
        if path == "/v1/carts":
            return httpx.Response(200, json={"id": "cart_1"})
        if path == "/v1/carts/cart_1/items":
            return httpx.Response(200, json={"id": "cart_1"})
        if path == "/v1/carts/cart_1/checkout":
            self.move("requires_action")
            return httpx.Response(
                200, json={"id": "ord_1", "amount": 3250, "currency": "usd", "payment": self.payment()}
            )
        if path == "/v1/payments/pay_1/authenticate":
            assert body == {"otp": VALID_OTP}
            self.move("processing")
            return httpx.Response(200, json=self.payment())
        if path == "/v1/payments/pay_1":
            self.polls += 1
            if self.polls == 2:
                self.move(self.final)
            return httpx.Response(200, json=self.payment())
        return httpx.Response(404, json={"error": {"message": path}})


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str) -> None:
        self.lines.append(text)


@pytest.mark.parametrize(("final", "code"), [("succeeded", 0), ("failed", 1)])
def test_demo_runs_the_whole_checkout(tmp_path: Path, final: str, code: int) -> None:
    api, out = FakeApi(final), Lines()
    rc = cli.run_demo(
        _settings(tmp_path),
        "http://api.test",
        otp=True,
        api_key="sk_test_demo",
        out=out,
        transport=httpx.MockTransport(api),
        poll_s=0,
    )
    assert rc == code
    paths = [p for _, p, _ in api.calls]
    assert paths.index("/v1/carts/cart_1/checkout") < paths.index("/v1/payments/pay_1/authenticate")
    assert paths.count("/v1/carts/cart_1/items") == 2
    text_out = "\n".join(out.lines)
    assert "/namespaces/default/workflows/checkout%3Apay_1" in text_out
    statuses = [line.split()[-1] for line in out.lines if line.startswith("status ")]
    assert statuses == ["processing", final]
    # the card number never reaches the output
    assert not any(number in text_out for number in TEST_CARDS)
