"""POST /v1/psp/{psp}/webhooks and the /v1/disputes routes, through the real API app (TestClient, a
migrated SQLite file) with a Temporal stand-in that records every start and signal and can fail.

The events are signed like the sandbox signs them, and one test feeds the receiver the events the
REAL sandbox emitted for a capture, a dispute and its evidence, so both ends agree on the wire.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, func, select
from temporalio.client import WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.app import create_app
from api.auth import issue_merchant, issue_operator
from api.routes import psp_webhooks
from api.routes.psp_webhooks import dispute_id_for
from core.config import Settings
from core.db import make_engine, session_factory, transaction
from core.migrate import upgrade
from core.tables import Dispute, Payment, PspEvent
from psp.base import PSPPayment, PSPRejected, PSPUnavailable
from psp.sandbox.app import create_app as create_sandbox
from psp.sandbox.client import SandboxPSP
from psp.signing import sign_header
from tests.factories import make_customer, make_payment, make_payment_method
from workflows.contracts import (
    DISPUTE_WORKFLOW,
    PSP_EVENT_SIGNAL,
    DisputeInput,
    DisputeOutcome,
    DisputeState,
    DisputeUpd,
    EvidenceRequest,
    PSPEvent,
)

SECRET = "whsec_test_webhooks"
SANDBOX_KEY = "sk_sandbox_webhooks"
URL = "/v1/psp/sandbox/webhooks"


# ---- a Temporal stand-in ----


@dataclass
class FakeTemporal:
    starts: list[dict[str, Any]] = field(default_factory=list)
    signals: list[tuple[str, str, Any]] = field(default_factory=list)
    updates: list[tuple[str, str, Any]] = field(default_factory=list)
    down: int = 0  # the next N calls fail as if the server were unreachable
    finished: set[str] = field(default_factory=set)  # workflow ids that already completed
    update_error: Exception | None = None
    after_update: Callable[[], None] | None = None  # what the workflow would write meanwhile

    def _maybe_down(self) -> None:
        if self.down > 0:
            self.down -= 1
            raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

    async def start_workflow(self, workflow: str, arg: Any, **kw: Any) -> None:
        self._maybe_down()
        self.starts.append({"workflow": workflow, "arg": arg, **kw})
        if kw["id"] in self.finished:
            raise WorkflowAlreadyStartedError(kw["id"], workflow)

    def get_workflow_handle(self, workflow_id: str) -> Any:
        outer = self

        class Handle:
            async def signal(self, name: str, arg: Any) -> None:
                outer._maybe_down()
                if workflow_id in outer.finished or not workflow_id.startswith("checkout:pay_"):
                    raise RPCError("workflow execution already completed", RPCStatusCode.NOT_FOUND, b"")
                outer.signals.append((workflow_id, name, arg))

            async def execute_update(self, name: str, arg: Any, **kw: Any) -> Any:
                outer._maybe_down()
                outer.updates.append((workflow_id, name, arg))
                if outer.update_error is not None:
                    raise outer.update_error
                if outer.after_update is not None:
                    outer.after_update()
                return DisputeState(dispute_id=workflow_id.removeprefix("dispute:"), status="under_review")

        return Handle()


@dataclass
class LookupPSP:
    """Answers GET payment for the PSP payments it knows (psp id -> our reference)."""

    name: str = "sandbox"
    references: dict[str, str] = field(default_factory=dict)
    down: bool = False

    async def get_payment(self, psp_payment_id: str) -> PSPPayment:
        if self.down:
            raise PSPUnavailable("503")
        if psp_payment_id not in self.references:
            raise PSPRejected("No such payment", code="resource_missing")
        return PSPPayment(
            id=psp_payment_id,
            reference=self.references[psp_payment_id],
            status="captured",
            amount=1,
            currency="usd",
        )


@dataclass
class Env:
    client: TestClient
    sessions: sessionmaker[Session]
    temporal: FakeTemporal
    merchant_id: str
    key: str
    other_key: str
    operator_key: str
    payment: Payment
    psp: LookupPSP

    def deliver(
        self, event: dict[str, Any], *, secret: str = SECRET, at: int | None = None
    ) -> httpx.Response:
        body = json.dumps(event).encode()
        header = sign_header(body, secret, int(time.time()) if at is None else at)
        return self.client.post(URL, content=body, headers={"Paysaga-Signature": header})

    def get(self, path: str, key: str | None = None, **params: Any) -> httpx.Response:
        return self.client.get(path, params=params, headers={"Authorization": f"Bearer {key or self.key}"})

    def post(self, path: str, body: Any, key: str | None = None, **headers: str) -> httpx.Response:
        return self.client.post(
            path, json=body, headers={"Authorization": f"Bearer {key or self.key}", **headers}
        )

    def set_status(self, status: str) -> None:
        with self.sessions() as session, session.begin():
            row = session.get(Payment, self.payment.id)
            assert row is not None
            row.status = status

    def count(self, table: type[Any]) -> int:
        with self.sessions() as s:
            return int(s.exec(select(func.count()).select_from(table)).one())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        database_url=url,
        sandbox_webhook_secret=SECRET,
        update_wait_seconds=2.0,
    )
    engine = make_engine(url)
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        merchant, key = issue_merchant(s, "Acme", settings)
        _other, other_key = issue_merchant(s, "Other", settings)
        _op, operator_key = issue_operator(s, "ops")
        customer = make_customer(s, merchant.id)
        method = make_payment_method(s, customer)
        payment = make_payment(
            s, method, amount=5_000, status="succeeded", amount_received=5_000, psp_payment_id="psp_pay_A"
        )
    temporal, psp = FakeTemporal(), LookupPSP()
    app = create_app(settings, temporal_client=temporal, psps={"sandbox": psp})
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Env(client, sessions, temporal, merchant.id, key, other_key, operator_key, payment, psp)
    engine.dispose()


def dispute_object(status: str = "needs_response", **kw: Any) -> dict[str, Any]:
    return {
        "id": "dp_psp_1",
        "object": "dispute",
        "payment": "psp_pay_A",
        "amount": 5_000,
        "currency": "usd",
        "reason": "fraudulent",
        "status": status,
        "evidence": {},
        "evidence_due_by": 1_900_000_000,
        "created": 1_800_000_000,
        **kw,
    }


def event(
    type_: str, obj: dict[str, Any], id_: str = "evt_1", created: int = 1_800_000_000
) -> dict[str, Any]:
    return {"id": id_, "object": "event", "type": type_, "created": created, "data": {"object": obj}}


def error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["type"] in ("invalid_request_error", "api_error")
    return dict(err)


OUR_ID = dispute_id_for("sandbox", "dp_psp_1", 1_800_000_000)


# ---- signatures ----


def test_dispute_ids_are_derived_time_ordered_and_distinct() -> None:
    assert OUR_ID == dispute_id_for("sandbox", "dp_psp_1", 1_800_000_000)
    assert OUR_ID.startswith("dp_") and len(OUR_ID) == len("dp_") + 26
    assert dispute_id_for("sandbox", "dp_psp_2", 1_800_000_000) != OUR_ID
    assert dispute_id_for("stripe", "dp_psp_1", 1_800_000_000) != OUR_ID
    assert (
        dispute_id_for("sandbox", "dp_psp_0", 1_700_000_000)
        < OUR_ID
        < dispute_id_for("sandbox", "x", 1_800_000_001)
    )


@pytest.mark.parametrize(
    ("secret", "offset"),
    [
        ("whsec_someone_else", 0),
        (SECRET, -310),  # outside the 300 s tolerance, either way
        (SECRET, 310),
    ],
)
def test_bad_signatures_are_refused_and_change_nothing(env: Env, secret: str, offset: int) -> None:
    r = env.deliver(event("dispute.created", dispute_object()), secret=secret, at=int(time.time()) + offset)
    error(r, 400, "signature_invalid")
    assert env.temporal.starts == [] and env.count(PspEvent) == 0 and env.count(Dispute) == 0


def test_a_signature_within_the_tolerance_is_accepted(env: Env) -> None:
    r = env.deliver(event("dispute.created", dispute_object()), at=int(time.time()) - 250)
    assert r.status_code == 200, r.text


def test_missing_signature_and_tampered_body(env: Env) -> None:
    body = json.dumps(event("dispute.created", dispute_object())).encode()
    error(env.client.post(URL, content=body), 400, "signature_missing")
    header = sign_header(body, SECRET, int(time.time()))
    tampered = body.replace(b"5000", b"9000")
    error(
        env.client.post(URL, content=tampered, headers={"Paysaga-Signature": header}),
        400,
        "signature_invalid",
    )
    assert env.count(PspEvent) == 0


def test_unknown_psp_and_malformed_events(env: Env) -> None:
    error(env.client.post("/v1/psp/acme/webhooks", content=b"{}"), 404, "resource_missing")
    for body in (b"not json", b'{"id": "evt_x"}'):
        header = sign_header(body, SECRET, int(time.time()))
        error(
            env.client.post(URL, content=body, headers={"Paysaga-Signature": header}),
            400,
            "parameter_invalid",
        )
    error(env.deliver(event("dispute.created", dispute_object(amount="5000"))), 400, "parameter_invalid")


# ---- disputes ----


def test_dispute_created_starts_the_workflow_and_records_the_row(env: Env) -> None:
    r = env.deliver(event("dispute.created", dispute_object()))
    assert r.status_code == 200, r.text
    assert r.json() == {"received": True, "duplicate": False}

    [start] = env.temporal.starts
    assert start["workflow"] == DISPUTE_WORKFLOW
    assert start["id"] == f"dispute:{OUR_ID}"
    assert start["id_conflict_policy"] == WorkflowIDConflictPolicy.USE_EXISTING
    assert start["id_reuse_policy"] == WorkflowIDReusePolicy.REJECT_DUPLICATE
    assert "start_signal" not in start
    assert start["arg"] == DisputeInput(
        dispute_id=OUR_ID,
        payment_id=env.payment.id,
        merchant_id=env.merchant_id,
        psp="sandbox",
        psp_dispute_id="dp_psp_1",
        amount=5_000,
        currency="usd",
        reason="fraudulent",
        evidence_due_by=1_900_000_000,
    )
    with env.sessions() as s:
        row = s.get(Dispute, OUR_ID)
        assert s.get(PspEvent, "evt_1") is not None
    assert row is not None
    assert (row.status, row.payment_id, row.psp_dispute_id, row.workflow_id) == (
        "needs_response",
        env.payment.id,
        "dp_psp_1",
        f"dispute:{OUR_ID}",
    )
    assert int(row.evidence_due_by.timestamp()) == 1_900_000_000

    again = env.deliver(event("dispute.created", dispute_object()))  # the PSP redelivers
    assert again.json() == {"received": True, "duplicate": True}
    assert len(env.temporal.starts) == 1 and env.count(Dispute) == 1


def test_temporal_down_records_nothing_so_the_redelivery_applies_it(env: Env) -> None:
    env.temporal.down = 1
    error(env.deliver(event("dispute.created", dispute_object())), 503, "service_unavailable")
    assert env.count(PspEvent) == 0 and env.count(Dispute) == 0

    r = env.deliver(event("dispute.created", dispute_object()))
    assert r.json() == {"received": True, "duplicate": False}
    assert [s["id"] for s in env.temporal.starts] == [f"dispute:{OUR_ID}"]
    assert env.count(PspEvent) == 1 and env.count(Dispute) == 1


def test_a_failed_commit_after_the_start_is_redone_idempotently(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = psp_webhooks._record
    calls = {"n": 0}

    def flaky(*args: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database went away")
        return real(*args)

    monkeypatch.setattr(psp_webhooks, "_record", flaky)
    assert env.deliver(event("dispute.created", dispute_object())).status_code == 500
    assert env.count(PspEvent) == 0
    assert env.deliver(event("dispute.created", dispute_object())).json()["duplicate"] is False
    # both deliveries reached the same workflow (USE_EXISTING makes the second a no-op)
    assert [s["id"] for s in env.temporal.starts] == [f"dispute:{OUR_ID}"] * 2
    assert env.temporal.starts[0]["arg"] == env.temporal.starts[1]["arg"]
    assert env.count(Dispute) == 1


def test_dispute_closed_signals_the_outcome_with_start(env: Env) -> None:
    env.deliver(event("dispute.created", dispute_object()))
    r = env.deliver(event("dispute.closed", dispute_object("won"), id_="evt_2"))
    assert r.status_code == 200, r.text
    closed = env.temporal.starts[-1]
    assert closed["id"] == f"dispute:{OUR_ID}"  # the same workflow as dispute.created
    assert closed["start_signal"] == DisputeUpd.OUTCOME
    assert closed["start_signal_args"] == [DisputeOutcome(status="won", event_id="evt_2")]


def test_a_closed_event_for_a_finished_dispute_is_accepted(env: Env) -> None:
    env.temporal.finished.add(f"dispute:{OUR_ID}")
    r = env.deliver(event("dispute.closed", dispute_object("lost"), id_="evt_3"))
    assert r.json() == {"received": True, "duplicate": False}


def test_a_payment_without_the_psps_id_is_found_through_the_psp(env: Env) -> None:
    """The row of an automatically captured payment may lack the PSP's id: the PSP names our
    payment (its reference)."""
    with env.sessions() as s, s.begin():
        row = s.get(Payment, env.payment.id)
        assert row is not None
        row.psp_payment_id = None
    env.psp.down = True
    error(env.deliver(event("dispute.created", dispute_object())), 503, "psp_unavailable")
    assert env.count(PspEvent) == 0
    env.psp.down = False
    env.psp.references["psp_pay_A"] = env.payment.id
    assert env.deliver(event("dispute.created", dispute_object())).status_code == 200
    assert env.temporal.starts[0]["arg"].payment_id == env.payment.id


def test_dispute_on_an_unknown_payment_is_not_recorded(env: Env) -> None:
    error(
        env.deliver(event("dispute.created", dispute_object(payment="psp_pay_nobody"))),
        404,
        "resource_missing",
    )
    assert env.count(PspEvent) == 0 and env.temporal.starts == []


# ---- payment and refund events ----


def test_payment_events_signal_the_running_checkout(env: Env) -> None:
    env.set_status("requires_capture")  # a running checkout: its saga still watches the PSP
    obj = {"id": "psp_pay_A", "object": "payment", "reference": env.payment.id, "status": "captured"}
    assert env.deliver(event("payment.captured", obj, id_="evt_p1", created=5)).status_code == 200
    refund = {"id": "re_1", "object": "refund", "payment": "psp_pay_A", "status": "succeeded"}
    assert env.deliver(event("refund.succeeded", refund, id_="evt_r1", created=6)).status_code == 200
    assert env.temporal.signals == [
        (
            f"checkout:{env.payment.id}",
            PSP_EVENT_SIGNAL,
            PSPEvent("evt_p1", "payment.captured", "sandbox", "psp_pay_A", "captured", 5),
        ),
        (
            f"checkout:{env.payment.id}",
            PSP_EVENT_SIGNAL,
            PSPEvent("evt_r1", "refund.succeeded", "sandbox", "re_1", "succeeded", 6),
        ),
    ]
    assert env.count(PspEvent) == 2


@pytest.mark.parametrize("final", ["succeeded", "canceled", "refunded"])
def test_events_after_the_final_status_are_recorded_without_a_signal(env: Env, final: str) -> None:
    """The saga settles with the PSP before it records a final status: a webhook after that has
    nothing to tell it, so it costs no signal (most of the sandbox's webhooks come that late)."""
    env.set_status(final)
    obj = {"id": "psp_pay_A", "object": "payment", "reference": env.payment.id, "status": "captured"}
    assert env.deliver(event("payment.captured", obj, id_="evt_late")).json()["duplicate"] is False
    refund = {"id": "re_1", "object": "refund", "payment": "psp_pay_A", "status": "succeeded"}
    assert env.deliver(event("refund.succeeded", refund, id_="evt_late_r")).status_code == 200
    assert env.temporal.signals == []
    assert env.count(PspEvent) == 2


def test_events_for_finished_or_unknown_owners_are_recorded_and_ignored(env: Env) -> None:
    env.temporal.finished.add(f"checkout:{env.payment.id}")
    obj = {"id": "psp_pay_A", "reference": env.payment.id, "status": "refunded"}
    assert env.deliver(event("payment.refunded", obj, id_="evt_p2")).json()["duplicate"] is False
    orphan = {"id": "re_9", "payment": "psp_pay_unknown", "status": "succeeded"}
    assert env.deliver(event("refund.succeeded", orphan, id_="evt_r2")).status_code == 200
    assert env.deliver(event("payout.paid", {"id": "po_1"}, id_="evt_o1")).status_code == 200
    assert env.temporal.signals == []
    assert env.count(PspEvent) == 3


# ---- the real sandbox's events ----


def test_the_sandboxs_own_events_are_accepted(env: Env, tmp_path: Path) -> None:
    env.set_status("requires_capture")  # a running checkout: its saga still watches the PSP
    sent: list[httpx.Request] = []

    def collect(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    sandbox = create_sandbox(
        db_path=":memory:",
        api_key=SANDBOX_KEY,
        webhook_secret=SECRET,
        webhook_url="http://api.test" + URL,
        webhook_transport=httpx.MockTransport(collect),
    )
    auth = {"Authorization": f"Bearer {SANDBOX_KEY}"}
    with TestClient(sandbox) as psp:
        tok = psp.post(
            "/v1/tokens",
            json={"number": "4242424242424242", "exp_month": 12, "exp_year": 2040, "cvc": "123"},
            headers=auth,
        ).json()
        pay = psp.post(
            "/v1/payments",
            json={"amount": 5_000, "currency": "usd", "token": tok["id"], "reference": env.payment.id},
            headers={**auth, "Idempotency-Key": "k1"},
        ).json()
        psp.post(f"/v1/payments/{pay['id']}/capture", headers={**auth, "Idempotency-Key": "k2"})
        disputed = psp.post(
            f"/admin/payments/{pay['id']}/dispute", json={"reason": "duplicate"}, headers=auth
        )
        assert disputed.status_code == 200, disputed.text
        with env.sessions() as s, s.begin():  # our side knows the PSP's payment id after authorize
            row = s.get(Payment, env.payment.id)
            assert row is not None
            row.psp_payment_id = pay["id"]
        psp.post(
            f"/v1/disputes/{disputed.json()['id']}/evidence",
            json={"evidence": {"receipt": "r-1"}},
            headers={**auth, "Idempotency-Key": "k3"},
        )
    sandbox.state.webhooks.close()

    types = [json.loads(r.content)["type"] for r in sent]
    assert types == [
        "payment.authorized",
        "payment.captured",
        "dispute.created",
        "dispute.updated",
        "dispute.closed",
    ]
    for request in sent:  # replayed into our receiver exactly as the sandbox sent them
        r = env.client.post(
            URL, content=request.content, headers={"Paysaga-Signature": request.headers["Paysaga-Signature"]}
        )
        assert r.status_code == 200, r.text
    ours = dispute_id_for("sandbox", disputed.json()["id"], disputed.json()["created"])
    assert [s["id"] for s in env.temporal.starts] == [f"dispute:{ours}"] * 3
    assert env.temporal.starts[-1]["start_signal_args"] == [
        DisputeOutcome(status="won", event_id=json.loads(sent[-1].content)["id"])
    ]
    assert [sig[1] for sig in env.temporal.signals] == [PSP_EVENT_SIGNAL] * 2
    with env.sessions() as s:
        row_ = s.get(Dispute, ours)
    assert row_ is not None and row_.reason == "duplicate"


# ---- /v1/disputes ----


def _dispute(env: Env) -> str:
    assert env.deliver(event("dispute.created", dispute_object())).status_code == 200
    return OUR_ID


def test_list_and_retrieve_are_scoped_to_the_merchant(env: Env) -> None:
    dp = _dispute(env)
    got = env.get(f"/v1/disputes/{dp}")
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["id"], body["object"], body["payment"], body["amount"], body["status"]) == (
        dp,
        "dispute",
        env.payment.id,
        5_000,
        "needs_response",
    )
    assert body["evidence_due_by"] == 1_900_000_000 and body["livemode"] is False
    listed = env.get("/v1/disputes", status="needs_response").json()
    assert (listed["object"], [d["id"] for d in listed["data"]], listed["has_more"]) == ("list", [dp], False)
    assert env.get("/v1/disputes", payment="pay_other").json()["data"] == []
    error(env.get(f"/v1/disputes/{dp}", key=env.other_key), 404, "resource_missing")
    assert env.get("/v1/disputes", key=env.other_key).json()["data"] == []
    assert env.get(f"/v1/disputes/{dp}", key=env.operator_key).status_code == 200
    error(env.get("/v1/disputes", status="open"), 400, "parameter_invalid")
    error(env.get("/v1/disputes", starting_after="pay_1"), 400, "parameter_invalid")


def _set_status(env: Env, dispute_id: str, status: str) -> None:
    with env.sessions() as s, s.begin():
        row = s.get(Dispute, dispute_id)
        assert row is not None
        row.status = status


def test_evidence_is_an_update_on_the_disputes_workflow(env: Env) -> None:
    dp = _dispute(env)
    env.temporal.after_update = lambda: _set_status(env, dp, "under_review")
    r = env.post(
        f"/v1/disputes/{dp}/evidence",
        {"evidence": {"receipt": " r-1 ", "customer_name": ""}},
        **{"Idempotency-Key": "ev-1"},
    )
    assert r.status_code == 200, r.text
    assert env.temporal.updates == [
        (f"dispute:{dp}", DisputeUpd.SUBMIT_EVIDENCE, EvidenceRequest(evidence={"receipt": "r-1"}))
    ]
    # same key, same body: the stored answer, no second update
    again = env.post(
        f"/v1/disputes/{dp}/evidence",
        {"evidence": {"receipt": " r-1 ", "customer_name": ""}},
        **{"Idempotency-Key": "ev-1"},
    )
    assert again.headers.get("Idempotent-Replayed") == "true" and len(env.temporal.updates) == 1


def test_evidence_is_validated_before_the_workflow_sees_it(env: Env) -> None:
    dp = _dispute(env)
    error(env.post(f"/v1/disputes/{dp}/evidence", {"evidence": {"reciept": "x"}}), 400, "parameter_invalid")
    error(env.post(f"/v1/disputes/{dp}/evidence", {"evidence": {"receipt": "  "}}), 400, "parameter_missing")
    error(env.post(f"/v1/disputes/{dp}/evidence", {"evidence": {"receipt": 5}}), 400, "parameter_invalid")
    error(
        env.post(f"/v1/disputes/{dp}/evidence", {"evidence": {"receipt": "r"}}, key=env.other_key),
        404,
        "resource_missing",
    )
    assert env.temporal.updates == []


def test_evidence_refused_by_the_workflow_is_a_409(env: Env) -> None:
    dp = _dispute(env)
    env.temporal.update_error = WorkflowUpdateFailedError(
        ApplicationError("dispute is needs_response and no longer accepts evidence", type="InvalidState")
    )
    err = error(
        env.post(f"/v1/disputes/{dp}/evidence", {"evidence": {"receipt": "r"}}),
        409,
        "dispute_unexpected_state",
    )
    assert "no longer accepts evidence" in err["message"]
    _set_status(env, dp, "lost")
    error(
        env.post(f"/v1/disputes/{dp}/evidence", {"evidence": {"receipt": "r"}}),
        409,
        "dispute_unexpected_state",
    )
    env.temporal.update_error = None
    env.temporal.down = 0


# ---- the sandbox's dispute API and its client ----


@pytest.fixture
def sandbox() -> Iterator[tuple[TestClient, list[dict[str, Any]]]]:
    events: list[dict[str, Any]] = []

    def collect(request: httpx.Request) -> httpx.Response:
        events.append(json.loads(request.content))
        return httpx.Response(200)

    app = create_sandbox(
        db_path=":memory:",
        api_key=SANDBOX_KEY,
        webhook_secret=SECRET,
        webhook_url="http://api.test/hooks",
        webhook_transport=httpx.MockTransport(collect),
    )
    with TestClient(app, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}) as client:
        yield client, events
    app.state.webhooks.close()


def _captured(psp: TestClient, amount: int = 4_000, capture: bool = True) -> str:
    tok = psp.post(
        "/v1/tokens", json={"number": "4242424242424242", "exp_month": 12, "exp_year": 2040, "cvc": "123"}
    )
    pay = psp.post(
        "/v1/payments",
        json={"amount": amount, "currency": "eur", "token": tok.json()["id"], "reference": "pay_x"},
        headers={"Idempotency-Key": f"a-{time.monotonic_ns()}"},
    ).json()
    if capture:
        psp.post(f"/v1/payments/{pay['id']}/capture", headers={"Idempotency-Key": f"c-{pay['id']}"})
    return str(pay["id"])


def test_sandbox_opens_disputes_on_captured_payments_only(
    sandbox: tuple[TestClient, list[dict[str, Any]]],
) -> None:
    psp, _ = sandbox
    authorized = _captured(psp, capture=False)
    assert (
        psp.post(f"/admin/payments/{authorized}/dispute").json()["error"]["code"]
        == "payment_unexpected_state"
    )
    pay = _captured(psp)
    assert psp.post(f"/admin/payments/{pay}/dispute", json={"amount": 4_001}).status_code == 400
    assert psp.post(f"/admin/payments/{pay}/dispute", json={"reason": "because"}).status_code == 400
    dp = psp.post(f"/admin/payments/{pay}/dispute", json={"amount": 1_500, "reason": "duplicate"})
    assert dp.status_code == 200, dp.text
    body = dp.json()
    assert (body["object"], body["payment"], body["amount"], body["currency"], body["status"]) == (
        "dispute",
        pay,
        1_500,
        "eur",
        "needs_response",
    )
    assert body["id"].startswith("dp_") and body["evidence_due_by"] == body["created"] + 7 * 24 * 3600
    assert psp.post(f"/admin/payments/{pay}/dispute").json()["error"]["code"] == "charge_already_disputed"
    assert psp.get(f"/v1/disputes/{body['id']}").json() == body
    assert psp.get("/v1/disputes/dp_nope").status_code == 404
    assert (
        psp.post(f"/admin/payments/{pay}/dispute", headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )


@pytest.mark.parametrize(
    ("evidence", "outcome"), [({"receipt": "r-1"}, "won"), ({}, "lost"), ({"receipt": " "}, "lost")]
)
def test_sandbox_decides_from_the_evidence(
    sandbox: tuple[TestClient, list[dict[str, Any]]], evidence: dict[str, str], outcome: str
) -> None:
    psp, events = sandbox
    dp = psp.post(f"/admin/payments/{_captured(psp)}/dispute").json()["id"]
    path = f"/v1/disputes/{dp}/evidence"
    assert psp.post(path, json={"evidence": evidence}).json()["error"]["code"] == "idempotency_key_missing"
    r = psp.post(path, json={"evidence": evidence}, headers={"Idempotency-Key": "ev"})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["evidence"]) == ("under_review", evidence)  # as submitted
    replay = psp.post(path, json={"evidence": evidence}, headers={"Idempotency-Key": "ev"})
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.json() == r.json()
    assert psp.get(f"/v1/disputes/{dp}").json()["status"] == outcome
    again = psp.post(path, json={"evidence": evidence}, headers={"Idempotency-Key": "ev-2"})
    assert again.json()["error"]["code"] == "dispute_unexpected_state"
    psp.app.state.webhooks.close()  # type: ignore[attr-defined]
    mine = [e for e in events if e["type"].startswith("dispute.")]
    assert [(e["type"], e["data"]["object"]["status"]) for e in mine] == [
        ("dispute.created", "needs_response"),
        ("dispute.updated", "under_review"),
        ("dispute.closed", outcome),
    ]


def test_sandbox_forced_outcome(sandbox: tuple[TestClient, list[dict[str, Any]]]) -> None:
    psp, _ = sandbox
    dp = psp.post(f"/admin/payments/{_captured(psp)}/dispute").json()["id"]
    assert psp.post(f"/admin/disputes/{dp}/close", json={"outcome": "won"}).json()["status"] == "won"
    assert psp.post(f"/admin/disputes/{dp}/close", json={"outcome": "won"}).status_code == 200  # no-op
    assert psp.post(f"/admin/disputes/{dp}/close", json={"outcome": "lost"}).status_code == 409
    r = psp.post(
        f"/v1/disputes/{dp}/evidence", json={"evidence": {"receipt": "r"}}, headers={"Idempotency-Key": "k"}
    )
    assert r.status_code == 409


async def test_sandbox_client_dispute_calls() -> None:
    app = create_sandbox(db_path=":memory:", api_key=SANDBOX_KEY, webhook_secret=SECRET)
    auth = {"Authorization": f"Bearer {SANDBOX_KEY}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox") as http:
        tok = (
            await http.post(
                "/v1/tokens",
                json={"number": "4242424242424242", "exp_month": 12, "exp_year": 2040, "cvc": "123"},
                headers=auth,
            )
        ).json()
        pay = (
            await http.post(
                "/v1/payments",
                json={"amount": 4_000, "currency": "eur", "token": tok["id"], "reference": "pay_c"},
                headers={**auth, "Idempotency-Key": "a"},
            )
        ).json()
        await http.post(f"/v1/payments/{pay['id']}/capture", headers={**auth, "Idempotency-Key": "c"})
        dp = (await http.post(f"/admin/payments/{pay['id']}/dispute", headers=auth)).json()
        client = SandboxPSP(http, "http://sandbox", SANDBOX_KEY)
        got = await client.get_dispute(dp["id"])
        assert (got.id, got.status, got.amount, got.currency, got.evidence_due_by) == (
            dp["id"],
            "needs_response",
            4_000,
            "eur",
            dp["evidence_due_by"],
        )
        sent = await client.submit_dispute_evidence(
            dp["id"], {"receipt": "r"}, idempotency_key="dp_1:evidence"
        )
        assert sent.status == "under_review"
        assert (
            await client.submit_dispute_evidence(dp["id"], {"receipt": "r"}, idempotency_key="dp_1:evidence")
        ) == sent
        assert (await client.get_dispute(dp["id"])).status == "won"
        with pytest.raises(PSPRejected) as info:
            await client.submit_dispute_evidence(dp["id"], {}, idempotency_key="other")
        assert info.value.code == "dispute_unexpected_state"
    app.state.sandbox.close()


# ---- Stripe's webhooks: the same receiver, Stripe's signature header and event shapes ----


def _stripe_event(payment_id: str, event_id: str = "evt_stripe_1") -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": "payment_intent.succeeded",
        "created": int(time.time()),
        "data": {
            "object": {
                "id": "pi_123",
                "object": "payment_intent",
                "status": "succeeded",
                "amount": 5_000,
                "amount_received": 5_000,
                "amount_capturable": 0,
                "currency": "usd",
                "capture_method": "manual",
                "metadata": {"paysaga_payment_id": payment_id},
            }
        },
    }


def test_stripe_signed_events_signal_the_checkout_once_and_forgeries_are_refused(env: Env) -> None:
    env.set_status("requires_capture")  # a running checkout: its saga still watches the PSP
    secret = "whsec_test_secret"
    env.client.app.state.settings.stripe_webhook_secret = secret  # type: ignore[attr-defined]
    url = "/v1/psp/stripe/webhooks"
    body = json.dumps(_stripe_event(env.payment.id)).encode()

    def post(payload: bytes, key: str = secret) -> httpx.Response:
        header = sign_header(payload, key, int(time.time()))
        return env.client.post(url, content=payload, headers={"Stripe-Signature": header})

    assert post(body, "whsec_wrong").status_code == 400
    signed = sign_header(body, secret, int(time.time()))
    mutated = body.replace(b'"amount": 5000', b'"amount": 1')
    assert mutated != body
    assert env.client.post(url, content=mutated, headers={"Stripe-Signature": signed}).status_code == 400
    assert env.temporal.signals == []
    first = post(body)
    assert first.status_code == 200, first.text
    assert first.json() == {"received": True, "duplicate": False}
    [(workflow_id, _name, signal)] = env.temporal.signals
    assert workflow_id == f"checkout:{env.payment.id}"
    assert (signal.type, signal.psp, signal.status, signal.object_id) == (
        "payment.captured",
        "stripe",
        "captured",
        "pi_123",
    )
    again = post(body)  # Stripe redelivers: applied once
    assert again.json()["duplicate"] is True and len(env.temporal.signals) == 1
