"""`make bench`: checkout throughput against the Temporal ceiling, in ONE run on one dev server.

Phases (sizes from the command line; defaults take a few minutes on 2 cores):
  1. ceiling   - N no-op CeilingWorkflows (same calls as a checkout) by Update-with-Start at concurrency C
  2. checkout  - N POST /v1/payments through the HTTP API at concurrency C (SQLite)
  3. stored    - the same after --stored payments are already in the database (ratio to empty)
  4. waiting   - worker RSS with --waiting payments parked in requires_action (OTP)
  5. postgres  - the checkout phase again on a stack with PostgreSQL
Prints a table, the CPU milliseconds each process spent per operation in phases 1 and 2 (on two
shared cores that is what bounds the ratio), and writes bench/results.json. `--profile DIR` adds
py-spy stacks of the worker and the API over phase 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import create_engine, insert, text
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from bench.ceiling import CEILING_QUEUE, CEILING_WORKFLOW
from core import tables
from core.config import Settings
from core.ids import new_id
from core.temporal import connect
from psp.sandbox.cards import TEST_CARDS  # test cards live with the sandbox
from workflows.contracts import (
    SA_AMOUNT_MINOR,
    SA_CURRENCY,
    SA_MERCHANT_ID,
    SA_PAYMENT_STATUS,
    CheckoutInput,
    CheckoutResult,
    PaymentState,
    Upd,
)

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True)
CALL_TIMEOUT_S = 60.0  # one call slower than this counts as an error: the bench never hangs


def _card(behaviour: str) -> str:
    return next(n for n, p in TEST_CARDS.items() if p.behavior == behaviour)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_load(
    label: str, n: int, concurrency: int, one: Callable[[int], Awaitable[None]], progress: Progress
) -> dict[str, float]:
    """Run `one(i)` n times at the given concurrency; wall time and per-call latencies."""
    latencies: list[float] = []
    errors = 0
    task = progress.add_task(label, total=n)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def runner() -> None:
        nonlocal errors
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(one(i), timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # counted and reported, the run goes on
                errors += 1
                if errors <= 3:
                    console.print(f"[red]{label}: {type(exc).__name__}: {exc}")
            latencies.append(time.perf_counter() - t0)
            progress.advance(task)

    t0 = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "n": n,
        "errors": errors,
        "wall_s": round(wall, 3),
        "per_s": round(n / wall, 2),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 1),
    }


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU milliseconds per operation, by process, over one phase: where the two cores went."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self.start = {name: cpu_s(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *_: object) -> None:
        self.used = {name: cpu_s(pid) - self.start[name] for name, pid in self.pids.items()}

    def per_op_ms(self, n: int) -> dict[str, float]:
        return {name: round(1000 * used / n, 1) for name, used in self.used.items() if used > 0}


class Profiler:
    """py-spy samples of the worker and the API over one phase (`--profile DIR`), as collapsed
    stacks (<name>.txt: speedscope or flamegraph.pl read them)."""

    def __init__(self, out: Path | None, pids: dict[str, int]) -> None:
        self.out, self.pids, self.procs = out, pids, list[subprocess.Popen[bytes]]()

    def __enter__(self) -> Profiler:
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            for name, pid in self.pids.items():
                argv = [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    "50",
                    "--format",
                    "raw",
                    "-o",
                    str(self.out / f"{name}.txt"),
                ]
                self.procs.append(
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs:
            proc.wait(timeout=60)


def child_pid(parent: int, marker: str) -> int:
    """The pid of `paysaga up`'s child whose command line ends with `marker` (worker / api)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and marker.encode() in argv:
            return int(proc.name)
    raise RuntimeError(f"no {marker} process under {parent}")


class Bench:
    def __init__(self, stack: Any, n: int, concurrency: int) -> None:
        self.stack = stack
        self.n = n
        self.concurrency = concurrency
        self.http = httpx.AsyncClient(
            base_url=stack.api_url,
            headers={"Authorization": f"Bearer {stack.merchant_key}"},
            timeout=120,
            limits=httpx.Limits(max_connections=concurrency + 8),
        )
        self.pairs: list[tuple[str, str]] = []
        self.client: Client | None = None

    async def setup(self, customers: int) -> None:
        # a load test is not fraud: lift the velocity limit of the bench merchant
        engine = create_engine(self.stack.database_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE merchants SET max_payments_per_hour = 1000000000"))
        engine.dispose()
        for _ in range(customers):
            cus = (
                await self.http.post(
                    "/v1/customers",
                    json={"email": f"b{uuid.uuid4().hex[:8]}@example.com", "name": "Bench", "country": "US"},
                )
            ).json()
            pm = (
                await self.http.post(
                    "/v1/payment_methods",
                    json={
                        "type": "card",
                        "customer": cus["id"],
                        "card": {"number": _card("succeed"), "exp_month": 12, "exp_year": 2035, "cvc": "123"},
                    },
                )
            ).json()
            otp = (
                await self.http.post(
                    "/v1/payment_methods",
                    json={
                        "type": "card",
                        "customer": cus["id"],
                        "card": {"number": _card("otp"), "exp_month": 12, "exp_year": 2035, "cvc": "123"},
                    },
                )
            ).json()
            self.pairs.append((cus["id"], pm["id"], otp["id"]))  # type: ignore[arg-type]
        self.client = await connect(Settings(temporal_address=self.stack.env["TEMPORAL_ADDRESS"]))

    async def checkout(self, i: int, *, otp: bool = False) -> None:
        cus, pm, otp_pm = self.pairs[i % len(self.pairs)]  # type: ignore[misc]
        r = await self.http.post(
            "/v1/payments",
            json={
                "amount": 1000 + i % 5000,
                "currency": "usd",
                "customer": cus,
                "payment_method": otp_pm if otp else pm,
            },
        )
        want = "requires_action" if otp else "succeeded"
        if r.status_code != 200 or r.json()["status"] != want:
            raise RuntimeError(f"{r.status_code} {r.text[:200]}")

    async def ceiling(self, i: int) -> None:
        assert self.client is not None
        pid = f"pay_ceiling_{uuid.uuid4().hex}"
        inp = CheckoutInput(
            payment_id=pid,
            merchant_id=self.stack.merchant_id,
            customer_id="cus_x",
            payment_method_id="pm_x",
            psp="sandbox",
            psp_token="tok_x",
            amount=1000 + i % 5000,
            currency="usd",
        )
        op: WithStartWorkflowOperation[Any, CheckoutResult] = WithStartWorkflowOperation(
            CEILING_WORKFLOW,
            inp,
            id=f"ceiling:{pid}",
            task_queue=CEILING_QUEUE,
            result_type=CheckoutResult,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(SA_MERCHANT_ID, inp.merchant_id),
                    SearchAttributePair(SA_AMOUNT_MINOR, inp.amount),
                    SearchAttributePair(SA_CURRENCY, inp.currency),
                    SearchAttributePair(SA_PAYMENT_STATUS, "processing"),
                ]
            ),
        )
        state = await self.client.execute_update_with_start_workflow(
            Upd.WAIT_FOR_STABLE, start_workflow_operation=op, result_type=PaymentState
        )
        if state.status != "succeeded":
            raise RuntimeError(state.status)

    async def events_per(self, query: str, sample: int = 10) -> float:
        assert self.client is not None
        counts = []
        async for wf in self.client.list_workflows(query, limit=sample):
            history = await self.client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
            counts.append(len(history.events))
        return round(statistics.mean(counts), 1) if counts else float("nan")

    async def aclose(self) -> None:
        await self.http.aclose()


def store_payments(database_url: str, merchant_id: str, count: int) -> float:
    """Bulk-insert `count` succeeded payments (with their timeline and balanced ledger postings)."""
    t0 = time.perf_counter()
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    batch = 5000
    with engine.begin() as conn:
        customers = [
            {
                "id": new_id("cus"),
                "merchant_id": merchant_id,
                "email": f"s{i}@example.com",
                "name": "S",
                "country": "US",
                "metadata": {},
                "created": now,
            }
            for i in range(max(1, count // 10))
        ]
        conn.execute(insert(tables.Customer.__table__), customers)  # type: ignore[attr-defined]
        pms = [
            {
                "id": new_id("pm"),
                "merchant_id": merchant_id,
                "customer_id": c["id"],
                "type": "card",
                "psp": "sandbox",
                "psp_token": "tok_stored",
                "brand": "visa",
                "funding": "credit",
                "last4": "0000",
                "exp_month": 1,
                "exp_year": 2035,
                "country": "US",
                "fingerprint": "f" * 32,
                "created": now,
            }
            for c in customers
        ]
        conn.execute(insert(tables.PaymentMethod.__table__), pms)  # type: ignore[attr-defined]
        for start in range(0, count, batch):
            rows, events, txns, entries = [], [], [], []
            for i in range(start, min(count, start + batch)):
                c = customers[i % len(customers)]
                pid = new_id("pay")
                created = now - timedelta(days=2, seconds=i)
                rows.append(
                    {
                        "id": pid,
                        "merchant_id": merchant_id,
                        "customer_id": c["id"],
                        "payment_method_id": pms[i % len(pms)]["id"],
                        "order_id": None,
                        "amount": 1000,
                        "currency": "usd",
                        "status": "succeeded",
                        "capture_method": "automatic",
                        "amount_capturable": 0,
                        "amount_received": 1000,
                        "psp": "sandbox",
                        "psp_payment_id": f"psp_{pid}",
                        "failure_code": None,
                        "decline_code": None,
                        "failure_message": None,
                        "next_action": None,
                        "description": None,
                        "metadata": {},
                        "workflow_id": f"checkout:{pid}",
                        "idempotency_key": None,
                        "created": created,
                        "updated": created,
                    }
                )
                events.append(
                    {"payment_id": pid, "status": "succeeded", "reason": "stored", "created": created}
                )
                key = f"payment:{pid}:capture"
                txns.append({"key": key, "kind": "capture", "ref": pid, "created_at": created})
                entries += [
                    {
                        "transaction_key": key,
                        "account": "psp_receivable:sandbox:usd",
                        "currency": "usd",
                        "amount": 1000,
                    },
                    {
                        "transaction_key": key,
                        "account": f"merchant_payable:{merchant_id}:usd",
                        "currency": "usd",
                        "amount": -941,
                    },
                    {
                        "transaction_key": key,
                        "account": "platform_fees:usd",
                        "currency": "usd",
                        "amount": -59,
                    },
                ]
            conn.execute(insert(tables.Payment.__table__), rows)  # type: ignore[attr-defined]
            conn.execute(insert(tables.PaymentEvent.__table__), events)  # type: ignore[attr-defined]
            conn.execute(insert(tables.LedgerTransaction.__table__), txns)  # type: ignore[attr-defined]
            conn.execute(insert(tables.LedgerEntry.__table__), entries)  # type: ignore[attr-defined]
    engine.dispose()
    return time.perf_counter() - t0


def start_ceiling_worker(stack: Any) -> subprocess.Popen[bytes]:
    log = (stack.data_dir / "ceiling-worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ceiling"], env=stack.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    time.sleep(3)
    if proc.poll() is not None:
        raise RuntimeError(f"the ceiling worker exited: see {stack.data_dir / 'ceiling-worker.log'}")
    return proc


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from tests.stack import create_pg_database, drop_pg_database, start_stack, stop_stack

    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "n": args.n,
        "concurrency": args.concurrency,
        "cores": os.cpu_count(),
    }
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        stack = start_stack(data / f"sqlite-{uuid.uuid4().hex[:6]}", "")
        ceiling_worker = start_ceiling_worker(stack)
        bench = Bench(stack, args.n, args.concurrency)
        try:
            await bench.setup(customers=max(4, args.concurrency))
            assert stack.proc is not None
            up_pid = stack.proc.pid
            worker_pid, api_pid = child_pid(up_pid, "worker"), child_pid(up_pid, "api")
            warm = min(40, args.n)
            await run_load("warm-up ceiling", warm, args.concurrency, bench.ceiling, progress)
            await run_load("warm-up checkout", warm, args.concurrency, bench.checkout, progress)
            pids = {
                "temporal": child_pid(up_pid, "start-dev"),
                "worker": worker_pid,
                "api": api_pid,
                "sandbox": child_pid(up_pid, "psp"),
                "ceiling_worker": ceiling_worker.pid,
                "bench": os.getpid(),
            }
            with CpuMeter(pids) as cpu_ceiling:
                results["ceiling"] = await run_load(
                    "ceiling", args.n, args.concurrency, bench.ceiling, progress
                )
            profile = Path(args.profile) if args.profile else None
            with CpuMeter(pids) as cpu_checkout, Profiler(profile, {"worker": worker_pid, "api": api_pid}):
                results["checkout_sqlite"] = await run_load(
                    "checkout (sqlite)", args.n, args.concurrency, bench.checkout, progress
                )
            results["cpu_ms_per_op"] = {
                "ceiling": cpu_ceiling.per_op_ms(args.n),
                "checkout_sqlite": cpu_checkout.per_op_ms(args.n),
            }
            results["events_per_checkout"] = await bench.events_per(
                "WorkflowType = 'CheckoutWorkflow' AND ExecutionStatus = 'Completed'"
            )
            results["events_per_ceiling"] = await bench.events_per(
                "WorkflowType = 'CeilingWorkflow' AND ExecutionStatus = 'Completed'"
            )
            if args.stored:
                task = progress.add_task(f"store {args.stored:,} payments", total=1)
                results["store_s"] = round(
                    store_payments(stack.database_url, stack.merchant_id, args.stored), 1
                )
                progress.advance(task)
                results["checkout_stored"] = await run_load(
                    f"checkout ({args.stored // 1000}k stored)",
                    args.n,
                    args.concurrency,
                    bench.checkout,
                    progress,
                )
            results["peak_rss_mb"] = {
                "worker": rss_kb(worker_pid, "VmHWM") // 1024,
                "api": rss_kb(api_pid, "VmHWM") // 1024,
            }
            if args.waiting:
                await run_load(
                    f"park {args.waiting} in OTP",
                    args.waiting,
                    args.concurrency,
                    lambda i: bench.checkout(i, otp=True),
                    progress,
                )
                await asyncio.sleep(2)
                results["waiting"] = {
                    "payments": args.waiting,
                    "worker_rss_mb": rss_kb(worker_pid, "VmRSS") // 1024,
                }
        finally:
            await bench.aclose()
            ceiling_worker.terminate()
            stop_stack(stack)
        if not args.skip_pg:
            pg_name, pg_url = create_pg_database()
            stack = start_stack(data / f"pg-{uuid.uuid4().hex[:6]}", pg_url)
            bench = Bench(stack, args.n, args.concurrency)
            try:
                await bench.setup(customers=max(4, args.concurrency))
                await run_load(
                    "warm-up (postgres)", min(40, args.n), args.concurrency, bench.checkout, progress
                )
                results["checkout_postgres"] = await run_load(
                    "checkout (postgres)", args.n, args.concurrency, bench.checkout, progress
                )
            finally:
                await bench.aclose()
                stop_stack(stack)
                drop_pg_database(pg_name)
    return results


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    ceil, co = r["ceiling"], r["checkout_sqlite"]
    ratios: dict[str, Any] = {
        "throughput_vs_ceiling": round(co["per_s"] / ceil["per_s"], 2),
        "p99_vs_ceiling_p99": round(co["p99_ms"] / ceil["p99_ms"], 2),
    }
    if "checkout_stored" in r:
        ratios["stored_vs_empty"] = round(r["checkout_stored"]["per_s"] / co["per_s"], 2)
    if "checkout_postgres" in r:
        ratios["postgres_vs_sqlite"] = round(r["checkout_postgres"]["per_s"] / co["per_s"], 2)
    goals = {
        "throughput >= 0.8 x ceiling": ratios["throughput_vs_ceiling"] >= 0.8,
        "p99 <= 2 x ceiling p99": ratios["p99_vs_ceiling_p99"] <= 2,
    }
    if "stored_vs_empty" in ratios:
        goals["50k stored >= 0.9 x empty"] = ratios["stored_vs_empty"] >= 0.9
    if "waiting" in r:
        goals["worker RSS <= 400 MB with parked payments"] = r["waiting"]["worker_rss_mb"] <= 400
    r["ratios"], r["goals"] = ratios, goals
    return r


def print_table(r: dict[str, Any]) -> None:
    t = Table(title=f"paysaga bench: N={r['n']} C={r['concurrency']} on {r['cores']} cores")
    for col in ("phase", "per s", "p50 ms", "p99 ms", "errors"):
        t.add_column(col, justify="right" if col != "phase" else "left")
    for key in ("ceiling", "checkout_sqlite", "checkout_stored", "checkout_postgres"):
        if key in r:
            v = r[key]
            t.add_row(key, str(v["per_s"]), str(v["p50_ms"]), str(v["p99_ms"]), str(v["errors"]))
    console.print(t)
    console.print(f"history events: checkout {r['events_per_checkout']}, ceiling {r['events_per_ceiling']}")
    console.print(
        f"peak RSS MB: {r['peak_rss_mb']}" + (f"; waiting: {r['waiting']}" if "waiting" in r else "")
    )
    for phase, per_process in r["cpu_ms_per_op"].items():
        console.print(f"CPU ms per {phase} op: {per_process}")
    console.print(f"ratios: {r['ratios']}")
    for goal, ok in r["goals"].items():
        console.print(f"  [{'green' if ok else 'red'}]{'met ' if ok else 'MISSED'}[/] {goal}")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--stored", type=int, default=50_000)
    p.add_argument("--waiting", type=int, default=2_000)
    p.add_argument("--skip-pg", action="store_true")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy profiles of worker and API over the checkout phase (collapsed stacks: speedscope)",
    )
    p.add_argument("--data-dir", default=str(ROOT / ".data" / "bench"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    args = p.parse_args()
    results = summarize(asyncio.run(main(args)))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    console.print(f"written {args.out}")


if __name__ == "__main__":
    cli()
