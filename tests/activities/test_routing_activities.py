"""Routing in the worker: choose_psp, the breakers fed by PspActivities (a scripted PSP that counts
calls, a hand-driven clock), the API's multi-PSP tokenization and route (fake PSPs, a Temporal
stand-in that records the start), and migration 0003 over existing rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import select
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment

from activities.psp import CIRCUIT_OPEN, PspActivities
from activities.routing import Circuits, RoutingActivities
from api.app import create_app
from api.auth import issue_merchant
from core.config import Settings
from core.db import make_engine, session_factory, transaction
from core.migrate import downgrade, upgrade
from core.tables import Merchant, PaymentMethod
from domain.routing import CircuitState
from psp.base import (
    AuthorizeRequest,
    CardDetails,
    CardToken,
    PSPAmbiguous,
    PSPPayment,
    PSPRefund,
    PSPRejected,
    PSPUnavailable,
)
from workflows.contracts import (
    Act,
    AuthorizeInput,
    CaptureInput,
    CheckoutInput,
    ChoosePspInput,
    ChoosePspResult,
    LookupInput,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedPSP:
    """Answers every call with the next scripted outcome (an exception to raise, or success)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.script: list[Exception | None] = []
        self.calls: list[str] = []
        self.found: list[PSPPayment] = []  # what find_payments answers

    def _next(self, call: str) -> None:
        self.calls.append(call)
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome

    def _payment(self, status: Any = "authorized") -> PSPPayment:
        return PSPPayment(
            id=f"{self.name}_pay_1", reference="pay_1", status=status, amount=1000, currency="usd"
        )

    async def tokenize_card(self, card: CardDetails) -> CardToken:
        self._next("tokenize")
        return CardToken(
            f"tok_{self.name}", "visa", "credit", "US", card.number[-4:], card.exp_month, card.exp_year
        )

    async def authorize(self, req: AuthorizeRequest) -> PSPPayment:
        self._next("authorize")
        return self._payment()

    async def capture(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPPayment:
        self._next("capture")
        return self._payment("captured")

    async def find_payments(self, reference: str) -> list[PSPPayment]:
        self._next("find_payments")
        return list(self.found)

    async def get_payment(self, psp_payment_id: str) -> PSPPayment:
        self._next("get_payment")
        return self._payment()

    async def refund(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPRefund:
        self._next("refund")
        return PSPRefund("re_1", psp_payment_id, amount, "succeeded")


def env(attempt: int = 1) -> ActivityEnvironment:
    e = ActivityEnvironment()
    e.info = dataclasses.replace(e.info, attempt=attempt)
    return e


def auth_input(psp: str = "a") -> AuthorizeInput:
    return AuthorizeInput(payment_id="pay_1", psp=psp, psp_token="tok", amount=1000, currency="usd")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def circuits(clock: Clock) -> Circuits:
    return Circuits(failure_threshold=3, cooldown_s=30, clock=clock)


@pytest.fixture
def psps() -> dict[str, ScriptedPSP]:
    return {"a": ScriptedPSP("a"), "b": ScriptedPSP("b")}


@pytest.fixture
def acts(psps: dict[str, ScriptedPSP], circuits: Circuits) -> PspActivities:
    return PspActivities(psps, circuits)  # type: ignore[arg-type]


@pytest.fixture
def routing(circuits: Circuits) -> RoutingActivities:
    return RoutingActivities(circuits, ["a", "b"])


async def authorize_fails(acts: PspActivities, error_type: str) -> ApplicationError:
    with pytest.raises(ApplicationError) as err:
        await env().run(acts.authorize_payment, auth_input())
    assert err.value.type == error_type
    return err.value


async def choose(routing: RoutingActivities, *candidates: str) -> ChoosePspResult:
    return await env().run(routing.choose_psp, ChoosePspInput("pay_1", list(candidates)))


def test_choose_psp_is_registered_under_its_name(routing: RoutingActivities) -> None:
    names = [activity._Definition.must_from_callable(fn).name for fn in routing.activities()]
    assert names == [Act.CHOOSE_PSP]


async def test_consecutive_unavailable_open_the_circuit_and_authorize_then_fails_fast(
    acts: PspActivities, psps: dict[str, ScriptedPSP], circuits: Circuits, routing: RoutingActivities
) -> None:
    psps["a"].script = [PSPUnavailable("503")] * 3
    for _ in range(3):
        err = await authorize_fails(acts, "PSPUnavailable")
        assert not err.non_retryable
    assert circuits.state("a") is CircuitState.OPEN
    err = await authorize_fails(acts, CIRCUIT_OPEN)
    assert err.non_retryable and "nothing was sent" in err.message
    assert psps["a"].calls == ["authorize"] * 3  # the fourth never reached the PSP
    # routing now passes it over, with the reason; the other PSP is untouched
    assert await choose(routing, "a", "b") == ChoosePspResult(
        psp="b", skipped={"a": "circuit open, next trial in 30 s"}
    )
    assert (await env().run(acts.authorize_payment, auth_input("b"))).psp_payment_id == "b_pay_1"


async def test_refusals_count_as_up_and_ambiguity_counts_as_nothing(
    acts: PspActivities, psps: dict[str, ScriptedPSP], circuits: Circuits
) -> None:
    psps["a"].script = [
        PSPUnavailable("503"),
        PSPUnavailable("503"),
        PSPRejected("bad token", code="resource_missing"),  # it answered: count starts over
        PSPUnavailable("503"),
        PSPAmbiguous("read timeout"),  # says nothing either way
        PSPUnavailable("503"),
    ]
    for expected in ("PSPUnavailable", "PSPUnavailable", "PSPRejected", "PSPUnavailable", "PSPAmbiguous"):
        await authorize_fails(acts, expected)
    assert circuits.state("a") is CircuitState.CLOSED
    await authorize_fails(acts, "PSPUnavailable")
    assert circuits.state("a") is CircuitState.CLOSED  # 2 in a row since the refusal, threshold 3


async def test_settling_calls_go_out_while_open_and_a_success_closes(
    acts: PspActivities, psps: dict[str, ScriptedPSP], circuits: Circuits
) -> None:
    psps["a"].script = [PSPUnavailable("down")] * 3
    for _ in range(3):
        with pytest.raises(ApplicationError):
            await env().run(acts.lookup_psp_payment, LookupInput("pay_1", "a"))
    assert circuits.state("a") is CircuitState.OPEN
    # a capture is owed money: it is sent whatever the circuit says, and it tells us the PSP is back
    cap = await env().run(acts.capture_payment, CaptureInput("pay_1", "a", "a_pay_1", 1000))
    assert cap.status == "captured"
    assert circuits.state("a") is CircuitState.CLOSED
    assert (await env().run(acts.authorize_payment, auth_input())).status == "authorized"


async def test_after_the_cooldown_one_trial_goes_out(
    acts: PspActivities,
    psps: dict[str, ScriptedPSP],
    circuits: Circuits,
    clock: Clock,
    routing: RoutingActivities,
) -> None:
    psps["a"].script = [PSPUnavailable("503")] * 4
    for _ in range(3):
        await authorize_fails(acts, "PSPUnavailable")
    clock.now += 29
    assert (await choose(routing, "a", "b")).psp == "b"
    clock.now += 1
    assert (await choose(routing, "a", "b")).psp == "a"  # half-open: worth a try
    await authorize_fails(acts, "PSPUnavailable")  # the trial fails: open again, for a full cool-down
    await authorize_fails(acts, CIRCUIT_OPEN)
    clock.now += 30
    assert (await env().run(acts.authorize_payment, auth_input())).status == "authorized"
    assert circuits.state("a") is CircuitState.CLOSED
    assert psps["a"].calls == ["authorize"] * 5


async def test_choose_psp_skips_unconfigured_and_reports_when_every_circuit_is_open(
    acts: PspActivities, psps: dict[str, ScriptedPSP], routing: RoutingActivities
) -> None:
    assert await choose(routing, "stripe", "a") == ChoosePspResult(
        psp="a", skipped={"stripe": "not configured on this worker"}
    )
    for name in ("a", "b"):
        psps[name].script = [PSPUnavailable("503")] * 3
        for _ in range(3):
            with pytest.raises(ApplicationError):
                await env().run(acts.authorize_payment, auth_input(name))
    got = await choose(routing, "a", "b")
    assert got.psp is None and list(got.skipped) == ["a", "b"]


async def test_a_retry_while_open_looks_up_before_refusing(
    acts: PspActivities, psps: dict[str, ScriptedPSP], circuits: Circuits
) -> None:
    # an earlier attempt of this activity may have charged: the look-up goes out whatever the circuit
    psps["a"].script = [PSPUnavailable("503")] * 3
    for _ in range(3):
        await authorize_fails(acts, "PSPUnavailable")
    psps["a"].script = [PSPUnavailable("503")]
    with pytest.raises(ApplicationError) as err:
        await env(attempt=2).run(acts.authorize_payment, auth_input())
    assert (err.value.type, err.value.non_retryable) == ("PSPUnavailable", False)  # unknown: retry
    assert psps["a"].calls[-1] == "find_payments"
    # the look-up finds the earlier attempt's authorization: that is the answer, circuit or not
    psps["a"].found = [psps["a"]._payment()]
    psps["a"].script = [None]
    circuits.record("a", "unavailable")  # keep it open
    assert circuits.state("a") is CircuitState.OPEN
    res = await env(attempt=3).run(acts.authorize_payment, auth_input())
    assert res.psp_payment_id == "a_pay_1"
    assert psps["a"].calls.count("authorize") == 3


async def test_a_retry_whose_look_up_answers_closes_the_circuit_and_charges(
    acts: PspActivities, psps: dict[str, ScriptedPSP], circuits: Circuits
) -> None:
    psps["a"].script = [PSPUnavailable("503")] * 3
    for _ in range(3):
        await authorize_fails(acts, "PSPUnavailable")
    # the look-up answers (nothing there): the PSP is reachable again, which closes the circuit
    res = await env(attempt=2).run(acts.authorize_payment, auth_input())
    assert res.status == "authorized"
    assert psps["a"].calls[-2:] == ["find_payments", "authorize"]
    assert circuits.state("a") is CircuitState.CLOSED


# ---------------------------------------------------------------- the API: tokens and route


@dataclasses.dataclass
class RecordingTemporal:
    """Keeps the CheckoutInput of every start, then fails like an unreachable server."""

    inputs: list[CheckoutInput] = dataclasses.field(default_factory=list)

    async def execute_update_with_start_workflow(self, update: str, **kw: Any) -> Any:
        self.inputs.append(kw["start_workflow_operation"]._start_workflow_input.args[0])
        raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")


@dataclasses.dataclass
class Api:
    client: TestClient
    psps: dict[str, ScriptedPSP]
    temporal: RecordingTemporal
    sessions: Any
    merchant_id: str
    key: str

    def post(self, path: str, body: Any) -> Any:
        return self.client.post(path, json=body, headers={"Authorization": f"Bearer {self.key}"})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    settings = Settings(env="test", data_dir=tmp_path, database_url=url, update_wait_seconds=1.0)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        merchant, key = issue_merchant(s, "Acme", settings)
    psps = {"sandbox": ScriptedPSP("sandbox"), "sandbox_b": ScriptedPSP("sandbox_b")}
    temporal = RecordingTemporal()
    app = create_app(settings, temporal_client=temporal, psps=psps)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, psps, temporal, sessions, merchant.id, key)
    engine.dispose()


def _card(api: Api) -> Any:
    r = api.post("/v1/customers", {"email": "ada@example.com"})
    assert r.status_code == 200, r.text
    cus = r.json()["id"]
    card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "314"}
    return cus, api.post("/v1/payment_methods", {"type": "card", "customer": cus, "card": card})


def _stored(api: Api, pm_id: str) -> PaymentMethod:
    with api.sessions() as s:
        row = s.get(PaymentMethod, pm_id)
        assert row is not None
        return row


def test_a_card_is_tokenized_at_every_psp_and_the_payment_gets_the_route(api: Api) -> None:
    cus, r = _card(api)
    assert r.status_code == 200, r.text
    row = _stored(api, r.json()["id"])
    assert (row.psp, row.psp_token) == ("sandbox", "tok_sandbox")
    assert row.psp_tokens == {"sandbox": "tok_sandbox", "sandbox_b": "tok_sandbox_b"}
    assert "4242424242424242" not in str(row.psp_tokens)

    body = {"amount": 2000, "currency": "usd", "customer": cus, "payment_method": row.id}
    assert api.post("/v1/payments", body).status_code == 503  # our Temporal stand-in is "down"
    [inp] = api.temporal.inputs
    assert (inp.psp, inp.psp_token, inp.route) == ("sandbox", "tok_sandbox", ["sandbox", "sandbox_b"])
    assert inp.psp_tokens == {"sandbox": "tok_sandbox", "sandbox_b": "tok_sandbox_b"}

    # the merchant's rule puts EUR on sandbox_b first
    with transaction(api.sessions) as s:
        merchant = s.get(Merchant, api.merchant_id)
        assert merchant is not None
        merchant.routing_rules = [{"currency": "eur", "psps": ["sandbox_b", "sandbox"]}]
    api.post("/v1/payments", {**body, "currency": "eur"})
    eur = api.temporal.inputs[-1]
    assert (eur.psp, eur.psp_token, eur.route) == ("sandbox_b", "tok_sandbox_b", ["sandbox_b", "sandbox"])


def test_a_secondary_psp_that_is_down_is_skipped(api: Api) -> None:
    api.psps["sandbox_b"].script = [PSPUnavailable("connect refused")]
    cus, r = _card(api)
    assert r.status_code == 200, r.text
    row = _stored(api, r.json()["id"])
    assert row.psp_tokens == {"sandbox": "tok_sandbox"}
    api.post("/v1/payments", {"amount": 500, "currency": "usd", "customer": cus, "payment_method": row.id})
    assert api.temporal.inputs[-1].route == ["sandbox"]  # nowhere to fail over to with this card


def test_the_primary_must_tokenize(api: Api) -> None:
    api.psps["sandbox"].script = [PSPUnavailable("down")]
    _cus, r = _card(api)
    assert r.status_code == 503 and r.json()["error"]["code"] == "psp_unavailable"
    with api.sessions() as s:
        assert s.exec(select(PaymentMethod)).all() == []


# ---------------------------------------------------------------- migration 0003 over existing rows


def test_migration_0003_fills_existing_rows(db_url: str) -> None:
    upgrade(db_url, "0002_refunds_disputes")
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO merchants (id, name, fee_bps, fee_fixed, review_amount_limit,"
                    " max_payments_per_hour, country_mismatch_threshold, refund_fee_policy, chargeback_fee,"
                    " created) VALUES ('mer_1', 'Acme', 290, 30, 100000, 20, 50000, 'keep', 1500, :now)"
                ),
                {"now": "2026-01-01T00:00:00+00:00"},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO customers (id, merchant_id, email, metadata, created)"
                    " VALUES ('cus_1', 'mer_1', 'a@b.co', '{}', :now)"
                ),
                {"now": "2026-01-01T00:00:00+00:00"},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO payment_methods (id, merchant_id, customer_id, type, psp, psp_token, brand,"
                    " funding, last4, exp_month, exp_year, country, fingerprint, created) VALUES ('pm_1',"
                    " 'mer_1', 'cus_1', 'card', 'sandbox', 'tok_1', 'visa', 'credit', '4242', 12, 2034, 'US',"
                    " 'fp', :now)"
                ),
                {"now": "2026-01-01T00:00:00+00:00"},
            )
        upgrade(db_url)
        sessions = session_factory(engine)
        with sessions() as session:
            merchant = session.get(Merchant, "mer_1")
            pm = session.get(PaymentMethod, "pm_1")
            assert merchant is not None and merchant.routing_rules == []
            assert pm is not None and pm.psp_tokens == {} and pm.psp_token == "tok_1"
        downgrade(db_url, "0002_refunds_disputes")
        with engine.connect() as conn:
            assert "routing_rules" not in {c["name"] for c in sa.inspect(conn).get_columns("merchants")}
    finally:
        engine.dispose()
