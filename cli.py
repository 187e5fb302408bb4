"""`paysaga` command line: run the stack (`up`), its parts (`worker`, `api`, `psp`), migrations,
key issuing for merchants and operators, and an end-to-end `demo` over HTTP.

Heavy imports live inside the commands so `paysaga --help` is instant and a broken part of the
stack does not take the whole CLI down with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import quote

if TYPE_CHECKING:
    from core.config import Settings

# Seconds a service gets after SIGTERM before it is killed. The worker drains in-flight tasks
# (graceful timeout 10 s in worker.py), the others stop almost at once.
STOP_TIMEOUTS = {"api": 8.0, "worker": 15.0, "psp": 8.0, "psp_b": 8.0, "temporal": 10.0}
TEMPORAL_START_TIMEOUT = 60.0
READY_TIMEOUT = 60.0
COLORS = {"temporal": "35", "psp": "36", "psp_b": "34", "worker": "33", "api": "32", "up": "1"}  # ANSI SGR
TERMINAL_STATUSES = {"succeeded", "failed", "canceled"}


def _settings() -> Settings:
    from core.config import get_settings

    return get_settings()


# ---------------------------------------------------------------- command lines


def venv_bin(name: str) -> str:
    """A console script of this environment: next to the interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found next to {sys.executable} nor on PATH (pip install -e '.[dev]')")
    return found


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host or "127.0.0.1", int(port)


def temporal_command(settings: Settings, binary: str | None = None) -> list[str]:
    """The dev server with a persistent SQLite file, the fast pragmas and our search attributes.

    Re-registering the same search attributes on an existing database file is accepted, so the
    same command line serves the first start and every restart.
    """
    from workflows.contracts import SEARCH_ATTRIBUTES

    host, port = split_address(settings.temporal_address)
    cmd = [
        binary or venv_bin("temporal"),
        "server",
        "start-dev",
        "--db-filename",
        str(Path(settings.data_dir) / "temporal.db"),
        # WAL + synchronous=normal: about 3x the throughput of the defaults (DESIGN §2)
        "--sqlite-pragma",
        "journal_mode=wal",
        "--sqlite-pragma",
        "synchronous=normal",
        "--ip",
        host,
        "--port",
        str(port),
        "--ui-port",
        str(settings.temporal_ui_port),
        "--namespace",
        settings.temporal_namespace,
    ]
    for key in SEARCH_ATTRIBUTES:
        # IndexedValueType KEYWORD/INT/... -> the dev server's spelling Keyword/Int/...
        kind = "".join(part.capitalize() for part in key.indexed_value_type.name.split("_"))
        cmd += ["--search-attribute", f"{key.name}={kind}"]
    return cmd


def self_command(*args: str) -> list[str]:
    """Run a `paysaga` sub-command in a child process with this very interpreter."""
    return [sys.executable, "-m", "cli", *args]


def urls(settings: Settings) -> dict[str, str]:
    host, _ = split_address(settings.temporal_address)
    return {
        "API docs": f"http://{settings.api_host}:{settings.api_port}/docs",
        "Temporal UI": f"http://{host}:{settings.temporal_ui_port}",
        "Sandbox PSP": settings.sandbox_url,
        **({"Sandbox PSP B": settings.sandbox_b_url} if settings.sandbox_b_port else {}),
    }


def workflow_url(settings: Settings, workflow_id: str) -> str:
    host, _ = split_address(settings.temporal_address)
    return (
        f"http://{host}:{settings.temporal_ui_port}/namespaces/{quote(settings.temporal_namespace, safe='')}"
        f"/workflows/{quote(workflow_id, safe='')}"
    )


# ---------------------------------------------------------------- supervisor (`paysaga up`)


_libc: Any = None
if sys.platform == "linux":
    # loaded here, not in the forked child: dlopen between fork and exec can deadlock
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM if the supervisor is killed hard (SIGKILL), so nothing lingers."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None
    stopping: bool = False


@dataclass
class Supervisor:
    """Runs the services as child processes, prefixes their output, stops them in reverse order."""

    settings: Settings
    out: TextIO = field(default_factory=lambda: sys.stdout)
    children: list[Child] = field(default_factory=list)
    color: bool = False
    restart: bool = False  # restart a child that died, instead of shutting everything down

    def __post_init__(self) -> None:
        self.color = self.out.isatty() and "NO_COLOR" not in os.environ
        self.width = max(len(n) for n in COLORS)

    def say(self, name: str, line: str) -> None:
        prefix = f"{name:<{self.width}} |"
        if self.color:
            prefix = f"\x1b[{COLORS.get(name, '0')}m{prefix}\x1b[0m"
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.out.write(f"{prefix} {line}\n")
            self.out.flush()

    async def _pump(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        while True:
            try:
                raw = await child.proc.stdout.readline()
            except ValueError:  # a line over the limit: asyncio drops its head; keep draining the pipe
                self.say(child.name, "[line over 1 MiB, its start dropped]")
                continue
            if not raw:
                return
            self.say(child.name, raw.decode(errors="replace").rstrip())

    async def start(self, name: str, argv: list[str]) -> Child:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            # own session: a terminal Ctrl-C reaches only us, and we stop the children in order
            start_new_session=True,
            preexec_fn=_die_with_parent if _libc is not None else None,
            limit=1 << 20,  # long log lines (tracebacks in JSON) must not break the pump
        )
        child = Child(name, argv, proc)
        child.pump = asyncio.create_task(self._pump(child))
        self.children.append(child)
        self.say("up", f"started {name} (pid {proc.pid})")
        return child

    def exited(self) -> Child | None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is not None and not child.stopping:
                return child
        return None

    async def stop_all(self, *, force: asyncio.Event | None = None) -> None:
        for child in reversed(self.children):
            await self._stop(child, force)

    async def _stop(self, child: Child, force: asyncio.Event | None) -> None:
        proc = child.proc
        child.stopping = True
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            waits = [asyncio.create_task(proc.wait())]
            if force is not None:
                waits.append(asyncio.create_task(force.wait()))
            grace = STOP_TIMEOUTS.get(child.name, 10.0)
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if proc.returncode is None:
                self.say("up", f"{child.name} did not stop in time: killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if child.pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.pump, timeout=2)
        self.say("up", f"{child.name} stopped (exit {proc.returncode})")

    async def _wait_or_abort(self, ready: Any, stop: asyncio.Event, what: str, limit_s: float) -> bool:
        """Poll `ready()` until true; False if a stop was asked, a child died or time ran out."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if stop.is_set() or self.exited():
                return False
            if await ready():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.3)
        self.say("up", f"{what} not ready after {limit_s:.0f} s")
        return False

    async def run(self) -> int:
        settings = self.settings
        stop, force = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                force.set()  # a second Ctrl-C: do not wait for graceful shutdowns
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

        code = 0
        try:
            await self.start("temporal", temporal_command(settings))
            if not await self._wait_or_abort(
                lambda: temporal_ready(settings), stop, "Temporal", TEMPORAL_START_TIMEOUT
            ):
                code = 0 if stop.is_set() else 1
            else:
                # the worker and the API retry their own Temporal connection; starting them only
                # now keeps the first minute of logs free of connection-refused noise
                await self.start("psp", self_command("psp"))
                ready = [f"{settings.sandbox_url}/healthz"]
                if settings.sandbox_b_port:  # a second sandbox for PSP failover ("sandbox_b")
                    await self.start("psp_b", self_command("psp", "--name", "sandbox_b"))
                    ready.append(f"{settings.sandbox_b_url}/healthz")
                await self.start("worker", self_command("worker"))
                await self.start("api", self_command("api"))
                api = f"http://{settings.api_host}:{settings.api_port}/healthz"
                if await self._wait_or_abort(
                    lambda: http_ok(api, *ready), stop, "API and sandbox PSP", READY_TIMEOUT
                ):
                    self.say("up", "ready:")
                    for label, url in urls(settings).items():
                        self.say("up", f"  {label:<12} {url}")
                    self.say("up", "Ctrl-C stops everything")
                    await self._watch(stop)
                elif not stop.is_set():
                    code = 1
        finally:
            crashed = self.exited()
            if crashed is not None and crashed.proc is not None:
                self.say("up", f"{crashed.name} exited unexpectedly (exit {crashed.proc.returncode})")
                code = 1
            self.say("up", "stopping")
            await self.stop_all(force=force)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return code

    async def _watch(self, stop: asyncio.Event) -> None:
        """Until a signal or the first unexpected child exit (restarted instead with --restart)."""
        while not stop.is_set():
            crashed = self.exited()
            if crashed is not None:
                if not self.restart:
                    return
                await self._restart(crashed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.3)

    async def _restart(self, child: Child) -> None:
        assert child.proc is not None
        self.say("up", f"{child.name} exited unexpectedly (exit {child.proc.returncode}): restarting it")
        if child.pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.pump, timeout=2)
        index = self.children.index(child)
        self.children.remove(child)
        fresh = await self.start(child.name, child.argv)
        # keep the start order, so stop_all still stops the API before the worker before Temporal
        self.children.remove(fresh)
        self.children.insert(index, fresh)


async def temporal_ready(settings: Settings) -> bool:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    try:
        async with asyncio.timeout(5):
            client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
            await client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=settings.temporal_namespace)
            )
    except Exception:
        return False
    return True


async def http_ok(*urls_: str) -> bool:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=1.0) as http:
            for url in urls_:
                if (await http.get(url)).status_code != 200:
                    return False
    except httpx.HTTPError:
        return False
    return True


# ---------------------------------------------------------------- commands


def migrate(settings: Settings) -> None:
    from core.migrate import upgrade

    upgrade(settings.database_url)


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings()
    migrate(settings)
    print(f"database at head: {_redact(settings.database_url)}", file=sys.stderr)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings()
    if not settings.sandbox_webhook_url:
        # The sandbox's webhooks go to our receiver unless told otherwise; the children inherit it.
        host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "") else settings.api_host
        url = f"http://{host}:{settings.api_port}/v1/psp/sandbox/webhooks"
        os.environ["SANDBOX_WEBHOOK_URL"] = url
        settings = settings.model_copy(update={"sandbox_webhook_url": url})
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    migrate(settings)
    return asyncio.run(Supervisor(settings, restart=args.restart).run())


def cmd_worker(args: argparse.Namespace) -> int:
    from worker import configure_logging, run_worker

    settings = _settings()
    configure_logging(settings)
    migrate(settings)
    asyncio.run(run_worker(settings))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from worker import configure_logging

    settings = _settings()
    configure_logging(settings)
    migrate(settings)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # keep our structlog setup
        access_log=False,  # the API logs each request itself, without query strings
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


def cmd_psp(args: argparse.Namespace) -> int:
    import uvicorn

    from psp.sandbox.app import create_app
    from worker import configure_logging

    settings = _settings()
    configure_logging(settings)
    db_path, port, webhook_url = settings.sandbox_db, settings.sandbox_port, settings.sandbox_webhook_url
    if args.name == "sandbox_b":
        if not settings.sandbox_b_port:
            print("paysaga psp --name sandbox_b needs SANDBOX_B_PORT", file=sys.stderr)
            return 2
        db_path, port = settings.sandbox_b_db, settings.sandbox_b_port
        webhook_url = settings.sandbox_b_webhook_url
    app = create_app(
        db_path=db_path,
        api_key=settings.sandbox_api_key,
        webhook_secret=settings.sandbox_webhook_secret,
        webhook_url=webhook_url,
    )
    uvicorn.run(
        app,
        host=settings.sandbox_host,
        port=port,
        log_config=None,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


def create_merchant(settings: Settings, name: str) -> dict[str, str]:
    from api.auth import issue_merchant
    from core import db

    migrate(settings)
    engine = db.make_engine(settings.database_url)
    try:
        with db.transaction(db.session_factory(engine)) as session:
            merchant, key = issue_merchant(session, name, settings)
            return {"id": merchant.id, "name": merchant.name, "api_key": key}
    finally:
        engine.dispose()


def create_operator(settings: Settings, name: str) -> dict[str, str]:
    from api.auth import issue_operator
    from core import db

    migrate(settings)
    engine = db.make_engine(settings.database_url)
    try:
        with db.transaction(db.session_factory(engine)) as session:
            operator, key = issue_operator(session, name)
            return {"id": operator.id, "name": operator.name, "api_key": key}
    finally:
        engine.dispose()


def merchant_routing(settings: Settings, merchant_id: str, rules_json: str | None) -> dict[str, Any]:
    """A merchant's routing rules; replaced first when rules_json is given (validated, normalized).
    Raises ValueError (bad rules) or LookupError (no such merchant)."""
    from core import db
    from core.tables import Merchant
    from domain.routing import parse_rules
    from psp.registry import KNOWN_PSPS

    rules = None
    if rules_json is not None:
        try:
            raw = json.loads(rules_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--rules is not JSON: {exc}") from None
        rules = [rule.to_json() for rule in parse_rules(raw, KNOWN_PSPS)]
    migrate(settings)
    engine = db.make_engine(settings.database_url)
    try:
        with db.transaction(db.session_factory(engine)) as session:
            merchant = session.get(Merchant, merchant_id)
            if merchant is None:
                raise LookupError(f"no merchant {merchant_id}")
            if rules is not None:
                merchant.routing_rules = rules
            return {"id": merchant.id, "routing_rules": list(merchant.routing_rules)}
    finally:
        engine.dispose()


def cmd_merchant_routing(args: argparse.Namespace) -> int:
    try:
        print(json.dumps(merchant_routing(_settings(), args.id, args.rules)))
    except (ValueError, LookupError) as exc:
        print(f"paysaga merchant routing: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    return 0


def cmd_merchant_create(args: argparse.Namespace) -> int:
    print(json.dumps(create_merchant(_settings(), args.name)))
    return 0


def cmd_operator_create(args: argparse.Namespace) -> int:
    print(json.dumps(create_operator(_settings(), args.name)))
    return 0


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        rest = f"{user}:***@{rest.split('@', 1)[1]}"
    return f"{scheme}{sep}{rest}"


# ---------------------------------------------------------------- demo


def demo_card(otp: bool) -> str:
    """A sandbox test card by behaviour; the numbers live in psp/sandbox/cards.py only."""
    from psp.sandbox.cards import TEST_CARDS

    wanted = "otp" if otp else "succeed"
    return next(number for number, profile in TEST_CARDS.items() if profile.behavior == wanted)


class DemoError(Exception):
    pass


def _check(r: Any, what: str) -> dict[str, Any]:
    if r.status_code != 200:
        raise DemoError(f"{what} failed: HTTP {r.status_code} {r.text}")
    return dict(r.json())


def run_demo(
    settings: Settings,
    api_url: str,
    *,
    otp: bool,
    api_key: str | None,
    out: Any,
    transport: Any = None,
    poll_s: float = 0.5,
) -> int:
    """The whole cart checkout over HTTP; 0 when the payment ends succeeded. `transport` is for tests."""
    import httpx

    from psp.sandbox.cards import VALID_OTP
    from workflows.contracts import checkout_workflow_id

    if api_key is None:
        merchant = create_merchant(settings, "Demo Shop")
        api_key = merchant["api_key"]
        out.print(f"merchant   {merchant['id']} (new key {api_key[:12]}...)")
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=api_url.rstrip("/"), headers=headers, timeout=60, transport=transport) as http:
        cus = _check(
            http.post(
                "/v1/customers", json={"email": "ada@example.com", "name": "Ada Lovelace", "country": "US"}
            ),
            "create customer",
        )
        out.print(f"customer   {cus['id']}")
        number = demo_card(otp)
        pm = _check(
            http.post(
                "/v1/payment_methods",
                json={
                    "type": "card",
                    "customer": cus["id"],
                    "card": {
                        "number": number,
                        "exp_month": 12,
                        "exp_year": datetime.now(UTC).year + 3,
                        "cvc": "314",
                        "name": "Ada Lovelace",
                    },
                },
            ),
            "create payment method",
        )
        out.print(f"card       {pm['id']} ({pm['card']['brand']} ...{pm['card']['last4']})")
        products = [
            _check(http.post("/v1/products", json=body), "create product")
            for body in (
                {"name": "Analytical Engine manual", "price": 1500, "currency": "usd", "stock": 10},
                {"name": "Punch cards (pack)", "price": 250, "currency": "usd", "stock": 100},
            )
        ]
        cart = _check(http.post("/v1/carts", json={"customer": cus["id"]}), "create cart")
        for product, qty in zip(products, (2, 1), strict=True):
            _check(
                http.post(f"/v1/carts/{cart['id']}/items", json={"product": product["id"], "quantity": qty}),
                "add cart item",
            )
            out.print(f"cart       {cart['id']}: {qty} x {product['name']} at {product['price']}")
        r = http.post(
            f"/v1/carts/{cart['id']}/checkout",
            json={
                "payment_method": pm["id"],
                "shipping_address": {
                    "line1": "1 Main St",
                    "city": "Springfield",
                    "postal_code": "12345",
                    "country": "US",
                },
            },
        )
        body = r.json()
        if r.status_code == 200:
            order, payment = body, body["payment"]
            out.print(f"order      {order['id']} amount {order['amount']} {order['currency']}")
        elif isinstance(body.get("error"), dict) and body["error"].get("payment"):
            payment = body["error"]["payment"]  # a decline still carries its payment
            out.print(f"checkout   HTTP {r.status_code}: {body['error'].get('message')}")
        else:
            raise DemoError(f"checkout failed: HTTP {r.status_code} {r.text}")
        pid = payment["id"]
        out.print(f"payment    {pid}: {payment['status']}")
        out.print(
            f"workflow   {workflow_url(settings, payment.get('workflow_id') or checkout_workflow_id(pid))}"
        )

        if payment["status"] == "requires_action" and (payment.get("next_action") or {}).get("type") == "otp":
            out.print(f"otp        sending {VALID_OTP}")
            r = http.post(f"/v1/payments/{pid}/authenticate", json={"otp": VALID_OTP})
            if r.status_code not in (200, 402):
                raise DemoError(f"authenticate failed: HTTP {r.status_code} {r.text}")

        final = _follow(http, pid, out, poll_s=poll_s)
    ok = final == "succeeded"
    out.print(f"result     {pid} {final}: {'OK' if ok else 'NOT SUCCEEDED'}")
    return 0 if ok else 1


def _follow(http: Any, pid: str, out: Any, *, poll_s: float, limit_s: float = 60.0) -> str:
    """Print each status change and new timeline entry until the payment is terminal."""
    seen_events = 0
    status = ""
    deadline = time.monotonic() + limit_s
    while True:
        got = _check(http.get(f"/v1/payments/{pid}"), "get payment")
        timeline = got.get("timeline") or []
        for event in timeline[seen_events:]:
            reason = f" ({event['reason']})" if event.get("reason") else ""
            at = datetime.fromtimestamp(event["time"], UTC).strftime("%H:%M:%S") if event.get("time") else ""
            out.print(f"  timeline {at} {event['status']}{reason}")
        seen_events = len(timeline)
        if got["status"] != status:
            status = got["status"]
            out.print(f"status     {status}")
        if status in TERMINAL_STATUSES or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


class _Out:
    """print() for the demo; rich when the terminal supports it, with markup off (ids contain [])."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)  # never break a URL in two

    def print(self, text: str) -> None:
        self.console.print(text, markup=False)


def cmd_demo(args: argparse.Namespace) -> int:
    import httpx

    settings = _settings()
    api_url = args.api or f"http://{settings.api_host}:{settings.api_port}"
    try:
        return run_demo(settings, api_url, otp=args.otp_card, api_key=args.api_key, out=_Out())
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"demo failed: {exc} (is `make run` up at {api_url}?)", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paysaga", description="Payments on durable Temporal workflows.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run Temporal dev server, sandbox PSP, worker and API")
    up.add_argument(
        "--restart",
        action="store_true",
        help="restart a service that dies instead of stopping everything (as an orchestrator would)",
    )
    up.set_defaults(func=cmd_up)
    sub.add_parser("migrate", help="bring the database schema to the newest revision").set_defaults(
        func=cmd_migrate
    )
    sub.add_parser("worker", help="run a Temporal worker").set_defaults(func=cmd_worker)
    sub.add_parser("api", help="run the HTTP API").set_defaults(func=cmd_api)
    psp = sub.add_parser("psp", help="run the sandbox PSP")
    psp.add_argument(
        "--name",
        choices=["sandbox", "sandbox_b"],
        default="sandbox",
        help="sandbox_b: the second sandbox (SANDBOX_B_PORT, SANDBOX_B_DB), for PSP failover",
    )
    psp.set_defaults(func=cmd_psp)

    for noun, func in (("merchant", cmd_merchant_create), ("operator", cmd_operator_create)):
        p = sub.add_parser(noun, help=f"manage {noun}s")
        actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        create = actions.add_parser("create", help=f"create a {noun} and print its secret key once (JSON)")
        create.add_argument("--name", required=True)
        create.set_defaults(func=func)
        if noun == "merchant":
            routing = actions.add_parser(
                "routing", help="show (no --rules) or replace a merchant's PSP routing rules (JSON)"
            )
            routing.add_argument("--id", required=True, help="the merchant id (mer_...)")
            routing.add_argument(
                "--rules",
                help='JSON list, first match wins, e.g. \'[{"currency": "eur", "psps": ["sandbox_b", '
                '"sandbox"]}]\'; fields: currency, method, min_amount, max_amount (minor units, '
                "inclusive), psps (preference order); [] = the default order",
            )
            routing.set_defaults(func=cmd_merchant_routing)

    demo = sub.add_parser("demo", help="run a whole cart checkout against the running stack")
    demo.add_argument("--api", help="API base URL (default: from settings, http://127.0.0.1:8000)")
    demo.add_argument(
        "--api-key", help="use this merchant key instead of creating a merchant in the database"
    )
    demo.add_argument(
        "--otp-card",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pay with the sandbox card that asks for an OTP (default) or with one that just succeeds",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
