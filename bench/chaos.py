"""`make chaos`: payments through HTTP while the worker is SIGKILLed, the API and the Temporal dev
server restarted; then every payment must reach a terminal state that agrees with the PSP and the
ledger. Seeded and bounded; exits non-zero on any violation.

    python -m bench.chaos --n 200 --kills 5 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

from bench.run import child_pid
from psp.sandbox.cards import TEST_CARDS, VALID_OTP

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True)
TERMINAL = {"succeeded", "failed", "canceled", "refunded", "partially_refunded"}
CHARGED = {"succeeded", "refunded", "partially_refunded"}


def card_for(behaviour: str, decline_code: str | None = None) -> str:
    return next(
        n
        for n, p in TEST_CARDS.items()
        if p.behavior == behaviour and (decline_code is None or p.decline_code == decline_code)
    )


# (scenario, weight): what a client does with one payment
SCENARIOS = [
    ("auto", 40),
    ("decline", 8),
    ("insufficient", 4),
    ("otp_ok", 10),
    ("otp_wrong", 4),
    ("manual_capture", 10),
    ("manual_partial", 4),
    ("manual_cancel", 5),
    ("flaky", 8),
    ("fault", 7),
]


@dataclass
class Outcome:
    key: str
    scenario: str
    payment_ids: set[str] = field(default_factory=set)
    refunded: int = 0
    errors: list[str] = field(default_factory=list)


class Client:
    """A merchant back end that retries like a good one: same Idempotency-Key, backoff, re-read."""

    def __init__(self, api_url: str, key: str, deadline: float) -> None:
        self.http = httpx.AsyncClient(
            base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        self.deadline = deadline

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        delay = 0.2
        while True:
            try:
                r = await self.http.request(method, path, **kw)
                if r.status_code not in (409, 429, 500, 502, 503, 504) or time.monotonic() > self.deadline:
                    return r
                if r.status_code == 409 and r.json()["error"]["code"] != "idempotency_key_in_use":
                    return r
            except httpx.TransportError:
                if time.monotonic() > self.deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    async def aclose(self) -> None:
        await self.http.aclose()


async def one_payment(
    client: Client, rng: random.Random, cus: str, pms: dict[str, str], refunds: bool, out: Outcome
) -> None:
    sc = out.scenario
    pm = pms[
        {
            "decline": "decline",
            "insufficient": "insufficient",
            "otp_ok": "otp",
            "otp_wrong": "otp",
            "flaky": "flaky",
        }.get(sc, "ok")
    ]
    body: dict[str, Any] = {
        "amount": rng.randint(500, 20_000),
        "currency": "usd",
        "customer": cus,
        "payment_method": pm,
    }
    if sc.startswith("manual"):
        body["capture_method"] = "manual"
    if sc == "fault":
        body["metadata"] = {"sandbox_fault": rng.choice(["timeout_after_commit", "error", "reset"])}
    r = await client.call("POST", "/v1/payments", json=body, headers={"Idempotency-Key": out.key})
    data = r.json()
    pay = data.get("error", {}).get("payment") if "error" in data else data
    if not pay:
        out.errors.append(f"create {r.status_code}: {r.text[:200]}")
        return
    out.payment_ids.add(pay["id"])
    pid, status = pay["id"], pay["status"]
    await asyncio.sleep(rng.random() * 0.5)
    if status == "requires_action":
        otp = VALID_OTP if sc == "otp_ok" else "000000"
        await client.call("POST", f"/v1/payments/{pid}/authenticate", json={"otp": otp})
    elif status == "requires_capture":
        if sc == "manual_cancel":
            await client.call("POST", f"/v1/payments/{pid}/cancel", json={})
        else:
            amount = body["amount"] // 2 if sc == "manual_partial" else None
            await client.call(
                "POST", f"/v1/payments/{pid}/capture", json={"amount": amount} if amount else {}
            )
    if refunds and rng.random() < 0.3:
        got = (await client.call("GET", f"/v1/payments/{pid}")).json()
        if got.get("status") == "succeeded":
            amount = rng.choice([None, got["amount_received"] // 3])
            rb: dict[str, Any] = {"payment": pid, "reason": "requested_by_customer"}
            if amount:
                rb["amount"] = amount
            rr = await client.call(
                "POST", "/v1/refunds", json=rb, headers={"Idempotency-Key": f"{out.key}:refund"}
            )
            if rr.status_code >= 500:
                out.errors.append(f"refund {rr.status_code}: {rr.text[:200]}")


async def chaos_monkey(stack: Any, rng: random.Random, kills: int, window: float, log: list[str]) -> None:
    """SIGKILL the worker `kills` times, the API once and the Temporal dev server once, at seeded moments."""
    events = [("worker", rng.uniform(0.05, 0.9) * window) for _ in range(kills)]
    events += [("api", rng.uniform(0.2, 0.8) * window), ("temporal", rng.uniform(0.3, 0.7) * window)]
    t0 = time.monotonic()
    for name, at in sorted(events, key=lambda e: e[1]):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        marker = {"worker": "worker", "api": "api", "temporal": "start-dev"}[name]
        try:
            pid = child_pid(stack.proc.pid, marker)
        except RuntimeError:
            log.append(f"{time.monotonic() - t0:6.1f}s {name}: not running (restarting?)")
            continue
        os.kill(pid, signal.SIGKILL)
        log.append(f"{time.monotonic() - t0:6.1f}s SIGKILL {name} (pid {pid})")
        await asyncio.sleep(3)  # let the supervisor bring it back before the next blow


async def wait_terminal(client: Client, ids: list[str], limit_s: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + limit_s
    final: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for pid in [p for p in ids if p not in final]:
            try:
                r = await client.http.get(f"/v1/payments/{pid}")
            except httpx.TransportError:
                continue
            if r.status_code == 200 and r.json()["status"] in TERMINAL and not _refund_pending(r.json()):
                final[pid] = r.json()
        if len(final) == len(ids):
            break
        await asyncio.sleep(1)
    for pid in ids:
        if pid not in final:
            r = await client.http.get(f"/v1/payments/{pid}")
            final[pid] = r.json() if r.status_code == 200 else {"id": pid, "status": f"http {r.status_code}"}
    return final


def _refund_pending(payment: dict[str, Any]) -> bool:
    return bool(payment.get("refunds_pending"))


async def run(args: argparse.Namespace) -> int:
    from tests.stack import SANDBOX_KEY, start_stack, stop_stack

    rng = random.Random(args.seed)
    stack = start_stack(
        Path(args.data_dir) / f"chaos-{uuid.uuid4().hex[:6]}", args.database_url, restart=True
    )
    deadline = time.monotonic() + args.timeout
    client = Client(stack.api_url, stack.merchant_key, deadline)
    sandbox = httpx.AsyncClient(
        base_url=stack.sandbox_url, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}
    )
    log: list[str] = []
    try:
        engine = create_engine(stack.database_url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE merchants SET max_payments_per_hour = 1000000000, review_amount_limit = 10000000"
                )
            )
        customers = []
        for _ in range(10):
            cus = (
                await client.call(
                    "POST",
                    "/v1/customers",
                    json={"email": f"x{uuid.uuid4().hex[:6]}@example.com", "name": "Chaos", "country": "US"},
                )
            ).json()["id"]
            pms = {}
            for label, number in (
                ("ok", card_for("succeed")),
                ("decline", card_for("decline", "generic_decline")),
                ("insufficient", card_for("decline", "insufficient_funds")),
                ("otp", card_for("otp")),
                ("flaky", card_for("processing_error")),
            ):
                pms[label] = (
                    await client.call(
                        "POST",
                        "/v1/payment_methods",
                        json={
                            "type": "card",
                            "customer": cus,
                            "card": {"number": number, "exp_month": 12, "exp_year": 2035, "cvc": "123"},
                        },
                    )
                ).json()["id"]
            customers.append((cus, pms))
        refunds = (await client.http.get("/v1/refunds", params={"limit": 1})).status_code == 200
        names, weights = zip(*SCENARIOS, strict=True)
        outcomes = [
            Outcome(key=f"chaos-{args.seed}-{i}", scenario=rng.choices(names, weights)[0])
            for i in range(args.n)
        ]
        sem = asyncio.Semaphore(args.concurrency)

        async def guarded(i: int, o: Outcome) -> None:
            async with sem:
                cus, pms = customers[i % len(customers)]
                try:
                    await one_payment(client, random.Random(args.seed * 100_003 + i), cus, pms, refunds, o)
                except Exception as exc:
                    o.errors.append(f"{type(exc).__name__}: {exc}")

        t0 = time.monotonic()
        monkey = asyncio.create_task(chaos_monkey(stack, rng, args.kills, args.window, log))
        await asyncio.gather(*(guarded(i, o) for i, o in enumerate(outcomes)))
        await monkey
        drive_s = time.monotonic() - t0
        ids = sorted({p for o in outcomes for p in o.payment_ids})
        final = await wait_terminal(client, ids, args.settle)
        settle_s = time.monotonic() - t0 - drive_s

        # ---- the checks
        violations: list[str] = []
        by_status = Counter(p["status"] for p in final.values())
        for o in outcomes:
            if len(o.payment_ids) != 1:
                violations.append(f"key {o.key} -> {len(o.payment_ids)} payments {o.errors[:1]}")
        with engine.connect() as conn:
            captures = {
                r[0]: r[1]
                for r in conn.execute(
                    text(
                        "SELECT t.ref, SUM(e.amount) FROM ledger_transactions t JOIN ledger_entries e "
                        "ON e.transaction_key = t.key "
                        "WHERE t.kind = 'capture' AND e.account LIKE 'psp_receivable:%' "
                        "GROUP BY t.ref"
                    )
                )
            }
            ledger_refunds = defaultdict(
                int,
                {
                    r[0]: -r[1]
                    for r in conn.execute(
                        text(
                            "SELECT t.ref, SUM(e.amount) FROM ledger_transactions t JOIN ledger_entries e "
                            "ON e.transaction_key = t.key "
                            "WHERE t.kind LIKE 'refund%' AND e.account LIKE 'psp_receivable:%' "
                            "GROUP BY t.ref"
                        )
                    )
                },
            )
            unbalanced = conn.execute(
                text(
                    "SELECT transaction_key, currency, SUM(amount) FROM ledger_entries "
                    "GROUP BY transaction_key, currency HAVING SUM(amount) <> 0"
                )
            ).fetchall()
        if unbalanced:
            violations.append(f"ledger unbalanced: {unbalanced[:3]}")
        charged_n = 0
        for pid, pay in final.items():
            if pay["status"] not in TERMINAL:
                violations.append(f"{pid} not terminal: {pay['status']}")
                continue
            psp = (await sandbox.get("/v1/payments", params={"reference": pid})).json()["data"]
            auths = sum(int(p.get("authorizations", 0)) for p in psp)
            captured = sum(int(p.get("amount_captured", 0)) for p in psp)
            psp_refunded = sum(int(p.get("amount_refunded", 0)) for p in psp)
            if auths > 1:
                violations.append(f"{pid}: {auths} authorizations at the PSP")
            charged = captured > 0
            charged_n += charged
            ours = pay["status"] in CHARGED
            posted = captures.get(pid, 0)
            if not (charged == ours == (posted > 0)):
                violations.append(
                    f"{pid}: psp captured {captured}, status {pay['status']}, ledger capture {posted}"
                )
            if charged and posted != captured:
                violations.append(f"{pid}: psp captured {captured} != ledger {posted}")
            if psp_refunded > captured:
                violations.append(f"{pid}: refunded {psp_refunded} > captured {captured}")
            if psp_refunded != ledger_refunds[pid]:
                violations.append(
                    f"{pid}: psp refunded {psp_refunded} != ledger refunds {ledger_refunds[pid]}"
                )
        engine.dispose()

        table = Table(title=f"paysaga chaos: seed {args.seed}, {args.n} payments, {args.kills} worker kills")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for k, v in [
            ("payments", len(final)),
            ("drive s", f"{drive_s:.1f}"),
            ("settle s", f"{settle_s:.1f}"),
            ("charged at PSP", charged_n),
            *sorted(by_status.items()),
            ("client errors", sum(len(o.errors) for o in outcomes)),
            ("violations", len(violations)),
        ]:
            table.add_row(str(k), str(v))
        console.print(table)
        for line in log:
            console.print(f"  {line}")
        for v in violations[:30]:
            console.print(f"[red]VIOLATION[/] {v}")
        return 1 if violations else 0
    finally:
        await client.aclose()
        await sandbox.aclose()
        stop_stack(stack)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--window", type=float, default=40.0, help="seconds over which the kills are spread")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on the client phase")
    p.add_argument("--settle", type=float, default=180.0, help="bound on waiting for terminal states")
    p.add_argument("--database-url", default="")
    p.add_argument("--data-dir", default=str(ROOT / ".data" / "chaos"))
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
