"""The API's error handling without Temporal: TestClient against create_app on a migrated SQLite
file, a fake PSP, and a Temporal stand-in that only records what it was asked to start (and then
reports the service as unavailable). Every request here is answered by our own code paths."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, select
from temporalio.service import RPCError, RPCStatusCode

from api import auth
from api.app import create_app
from api.auth import hash_key, issue_merchant, issue_operator
from core.config import Settings
from core.db import make_engine, session_factory, transaction
from core.ids import new_id
from core.migrate import upgrade
from core.tables import ApiKey, Customer, IdempotencyKey, Payment, PaymentEvent, PaymentMethod
from psp.base import CardDetails, CardToken, PSPRejected, PSPUnavailable

VISA = "4242424242424242"
CVC = "314"


@dataclass
class FakePSP:
    """Tokenizes like a PSP would (brand/last4 from the number) and counts calls."""

    name: str = "sandbox"
    calls: int = 0
    fail_with: Exception | None = None

    async def tokenize_card(self, card: CardDetails) -> CardToken:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        return CardToken(
            token=f"tok_{self.calls}",
            brand="visa" if card.number.startswith("4") else "mastercard",
            funding="credit",
            country="US",
            last4=card.number[-4:],
            exp_month=card.exp_month,
            exp_year=card.exp_year,
        )


@dataclass
class UnavailableTemporal:
    """Records the workflow ids the API tried to start, then fails like an unreachable server."""

    started: list[str] = field(default_factory=list)
    updates: list[str] = field(default_factory=list)

    async def execute_update_with_start_workflow(self, update: str, **kw: Any) -> Any:
        self.started.append(kw["start_workflow_operation"]._start_workflow_input.id)
        raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

    def get_workflow_handle(self, workflow_id: str) -> Any:
        outer = self

        class Handle:
            async def execute_update(self, update: str, *a: Any, **kw: Any) -> Any:
                outer.updates.append(f"{workflow_id}:{update}")
                raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

        return Handle()


@dataclass
class Env:
    client: TestClient
    sessions: sessionmaker[Session]
    psp: FakePSP
    temporal: UnavailableTemporal
    merchant: str
    key: str
    other_key: str
    operator_key: str

    def h(self, key: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}", **extra}

    def post(self, path: str, body: Any = None, key: str | None = None, **headers: str) -> Any:
        return self.client.post(path, json=body, headers=self.h(key, **headers))

    def get(self, path: str, key: str | None = None, **params: Any) -> Any:
        return self.client.get(path, params=params, headers=self.h(key))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    settings = Settings(env="test", data_dir=tmp_path, database_url=url, update_wait_seconds=2.0)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        merchant, key = issue_merchant(s, "Acme", settings)
        _other, other_key = issue_merchant(s, "Other", settings)
        _op, operator_key = issue_operator(s, "ops")
    psp, temporal = FakePSP(), UnavailableTemporal()
    app = create_app(settings, temporal_client=temporal, psps={"sandbox": psp})
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Env(client, sessions, psp, temporal, merchant.id, key, other_key, operator_key)
    engine.dispose()


def err(r: Any, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    e = body["error"]
    assert {"type", "code", "message", "param"} <= set(e), e
    assert isinstance(e["message"], str) and e["message"]
    if code is not None:
        assert e["code"] == code, e
    if param is not None:
        assert e["param"] == param, e
    return dict(e)


def customer(env: Env, key: str | None = None) -> str:
    r = env.post("/v1/customers", {"email": "ada@example.com", "name": "Ada", "country": "us"}, key)
    assert r.status_code == 200, r.text
    assert r.json()["country"] == "US"
    return str(r.json()["id"])


def card_body(cus: str, **card: Any) -> dict[str, Any]:
    return {
        "type": "card",
        "customer": cus,
        "card": {"number": VISA, "exp_month": 12, "exp_year": 2034, "cvc": CVC, **card},
    }


def payment_method(env: Env, cus: str, key: str | None = None) -> str:
    r = env.post("/v1/payment_methods", card_body(cus), key)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def count(env: Env, table: type[Any]) -> int:
    with env.sessions() as s:
        return len(s.exec(select(table)).all())


# ---- authentication -----------------------------------------------------------------------------


def test_missing_or_bad_key_is_401(env: Env) -> None:
    e = err(env.client.get("/v1/payments"), 401, "invalid_api_key")
    assert e["type"] == "authentication_error"
    for header in ("Bearer sk_test_wrong", "Basic abc", "Bearer ", f"Token {env.key}"):
        err(env.client.get("/v1/payments", headers={"Authorization": header}), 401, "invalid_api_key")
    assert env.get("/v1/payments").status_code == 200


def test_keys_are_stored_hashed_and_revocation_is_honoured(env: Env) -> None:
    with env.sessions() as s:
        rows = s.exec(select(ApiKey)).all()
    assert {r.key_hash for r in rows} >= {hash_key(env.key), hash_key(env.operator_key)}
    assert all(env.key not in r.key_hash and len(r.key_hash) == 64 for r in rows)
    assert env.key.startswith("sk_test_") and env.operator_key.startswith("op_test_")
    with transaction(env.sessions) as s:
        row = s.get(ApiKey, hash_key(env.key))
        assert row is not None
        row.revoked = True
    env.client.app.state.key_cache.clear()  # type: ignore[attr-defined]
    err(env.get("/v1/payments"), 401, "invalid_api_key")


def test_the_key_lookup_is_cached(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = auth.lookup_key

    def counting(*a: Any) -> Any:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(auth, "lookup_key", counting)
    env.client.app.state.key_cache.clear()  # type: ignore[attr-defined]
    for _ in range(5):
        assert env.get("/v1/payments").status_code == 200
    assert len(calls) == 1


def test_issue_merchant_commits_on_a_plain_session(env: Env) -> None:
    settings = env.client.app.state.settings  # type: ignore[attr-defined]
    with env.sessions() as s:
        merchant, key = issue_merchant(s, "Plain", settings)
    assert merchant.fee_bps == settings.default_fee_bps
    r = env.get("/v1/payments", key=key)
    assert r.status_code == 200, r.text


def test_key_kinds_are_kept_apart(env: Env) -> None:
    e = err(env.post("/v1/customers", {"email": "a@b.co"}, env.operator_key), 403, "insufficient_permissions")
    assert e["type"] == "permission_error"
    err(env.get("/v1/ledger/check"), 403, "insufficient_permissions")
    r = env.get("/v1/ledger/check", env.operator_key)
    assert r.status_code == 200 and r.json()["balanced"] is True and r.json()["transactions"] == 0
    err(env.post("/v1/payments/pay_x/review", {"decision": "approve"}), 403)


# ---- validation ---------------------------------------------------------------------------------


def test_validation_errors_name_the_field_and_write_nothing(env: Env) -> None:
    cus = customer(env)
    pm = payment_method(env, cus)
    good = {"amount": 1000, "currency": "usd", "customer": cus, "payment_method": pm}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({**good, "amount": 12.5}, "amount", "parameter_invalid"),
        ({**good, "amount": 1000.0}, "amount", "parameter_invalid"),
        ({**good, "amount": "1000"}, "amount", "parameter_invalid"),
        ({**good, "amount": -5}, "amount", "parameter_invalid"),
        ({**good, "amount": 0}, "amount", "parameter_invalid"),
        ({**good, "amount": True}, "amount", "parameter_invalid"),
        ({**good, "amount": 10**13}, "amount", "parameter_invalid"),
        ({**good, "currency": "xyz"}, "currency", "parameter_invalid"),
        ({**good, "currency": 840}, "currency", "parameter_invalid"),
        ({**good, "capture_method": "later"}, "capture_method", "parameter_invalid"),
        ({**good, "metadata": {"k": 1}}, "metadata.k", "parameter_invalid"),
        ({**good, "surprise": 1}, "surprise", "parameter_unknown"),
        ({k: v for k, v in good.items() if k != "amount"}, "amount", "parameter_missing"),
    ]
    for body, param, code in cases:
        e = err(env.post("/v1/payments", body), 400, code, param)
        assert e["type"] == "invalid_request_error"
    e = err(
        env.client.post(
            "/v1/payments", content=b"{not json", headers=env.h(**{"Content-Type": "application/json"})
        ),
        400,
        "invalid_json",
    )
    assert e["param"] is None
    err(env.client.post("/v1/payments", content=b"[1, 2]", headers=env.h()), 400, "parameter_invalid")
    err(env.client.post("/v1/payments", headers=env.h()), 400, "parameter_missing")
    err(env.get("/v1/payments", limit=0), 400, "parameter_invalid", "limit")
    err(env.get("/v1/payments", limit=101), 400, "parameter_invalid", "limit")
    err(env.get("/v1/payments", status="bogus"), 400, "parameter_invalid", "status")
    err(env.post("/v1/customers", {"email": "not-an-email"}), 400, "parameter_invalid", "email")
    err(env.post("/v1/customers", {"email": "a@b.co", "country": "XX"}), 400, "parameter_invalid", "country")
    err(
        env.post("/v1/products", {"name": "x", "price": 100, "currency": "usd", "stock": -1}),
        400,
        param="stock",
    )
    err(
        env.post("/v1/products", {"name": "x", "price": 1.5, "currency": "usd", "stock": 1}),
        400,
        param="price",
    )
    assert count(env, Payment) == 0 and count(env, IdempotencyKey) == 0
    assert env.temporal.started == []


@pytest.mark.parametrize(
    ("card", "param", "code"),
    [
        ({"number": "4242424242424241"}, "card.number", "incorrect_number"),
        ({"number": "4242 4242 abcd 4242"}, "card.number", "incorrect_number"),
        ({"number": "42424242424242424242"}, "card.number", "incorrect_number"),
        ({"exp_month": 13}, "card.exp_month", "invalid_expiry_month"),
        ({"exp_month": 1, "exp_year": datetime.now(UTC).year - 1}, "card.exp_year", "invalid_expiry_year"),
        ({"exp_year": 2001}, "card.exp_year", "invalid_expiry_year"),
        ({"cvc": "12"}, "card.cvc", "invalid_cvc"),
        ({"cvc": "12a4"}, "card.cvc", "invalid_cvc"),
        ({"cvc": 314}, "card.cvc", "parameter_invalid"),
        ({"number": 4242424242424242}, "card.number", "parameter_invalid"),
        ({"exp_month": "12"}, "card.exp_month", "parameter_invalid"),
        ({"pin": "4242424242424242"}, "card.pin", "parameter_unknown"),
    ],
)
def test_bad_cards_never_echo_the_number(
    env: Env, caplog: pytest.LogCaptureFixture, card: dict[str, Any], param: str, code: str
) -> None:
    caplog.set_level(logging.DEBUG)
    cus = customer(env)
    r = env.post("/v1/payment_methods", card_body(cus, **card))
    e = err(r, 400, code, param)
    assert e["type"] in ("card_error", "invalid_request_error")
    for secret in ("4242424242424242", "4242424242424241", "424242424242"):
        assert secret not in r.text
    assert '"314"' not in r.text and '"12a4"' not in r.text
    assert "route': '/v1/payment_methods" in caplog.text  # the logs are captured here...
    assert "424242424242" not in caplog.text  # ...and hold no card number
    assert env.psp.calls == 0
    assert count(env, PaymentMethod) == 0


def test_card_numbers_in_the_wrong_place_are_not_echoed_either(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cus = customer(env)
    spaced = "4242 4242 4242 4242"
    for r in (
        env.post("/v1/payment_methods", {**card_body(VISA), "customer": VISA}),
        env.post("/v1/payment_methods", {**card_body(cus), VISA: "x"}),
        env.post("/v1/customers", {"email": "a@b.co", "metadata": {spaced: 1}}),
        env.get(f"/v1/customers/{VISA}"),
        env.get(f"/v1/nothing/{VISA}"),
    ):
        assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
        assert VISA not in r.text and spaced not in r.text, r.text
    # the test client's own httpx logger prints the URL it requested; our loggers must not
    ours = "\n".join(str(r.getMessage()) for r in caplog.records if r.name != "httpx")
    assert "'route': 'unmatched'" in ours and VISA not in ours and spaced not in ours
    assert env.psp.calls == 0


def test_a_saved_card_shows_only_masked_data(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cus = customer(env)
    r = env.post("/v1/payment_methods", card_body(cus, number="4242-4242-4242-4242"))
    assert r.status_code == 200, r.text
    pm = r.json()
    assert pm["object"] == "payment_method" and pm["id"].startswith("pm_") and pm["livemode"] is False
    assert pm["card"]["last4"] == "4242" and pm["card"]["brand"] == "visa"
    assert len(pm["card"]["fingerprint"]) == 32
    assert VISA not in r.text and CVC not in json.dumps(pm["card"])
    again = env.post("/v1/payment_methods", card_body(cus))
    assert again.json()["card"]["fingerprint"] == pm["card"]["fingerprint"]
    with env.sessions() as s:
        dump = " ".join(str(v) for row in s.execute(text("SELECT * FROM payment_methods")) for v in row)
    assert VISA not in dump
    assert "/v1/payment_methods" in caplog.text and VISA not in caplog.text
    listed = env.get(f"/v1/customers/{cus}/payment_methods", limit=1).json()
    assert listed["object"] == "list" and listed["has_more"] is True and len(listed["data"]) == 1
    assert listed["url"] == f"/v1/customers/{cus}/payment_methods"
    rest = env.get(f"/v1/customers/{cus}/payment_methods", starting_after=listed["data"][0]["id"]).json()
    assert [p["id"] for p in rest["data"]] == [pm["id"]] and rest["has_more"] is False


def test_psp_refusals_and_outages_map_to_402_and_503(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cus = customer(env)
    env.psp.fail_with = PSPRejected("refused", code="card_declined")
    e = err(env.post("/v1/payment_methods", card_body(cus)), 402, "card_declined")
    assert e["type"] == "card_error" and e["decline_code"] == "generic_decline"
    env.psp.fail_with = PSPRejected("refused", code="invalid_cvc")
    err(env.post("/v1/payment_methods", card_body(cus)), 400, "invalid_cvc", "card.cvc")
    env.psp.fail_with = PSPUnavailable("down")
    e = err(env.post("/v1/payment_methods", card_body(cus)), 503, "psp_unavailable")
    assert e["type"] == "api_error"
    env.psp.fail_with = RuntimeError(f"boom {VISA}")
    r = env.post("/v1/payment_methods", card_body(cus))
    err(r, 500, "internal_error")
    assert VISA not in r.text
    assert "tokenize_failed" in caplog.text and VISA not in caplog.text
    assert count(env, PaymentMethod) == 0


# ---- scoping ------------------------------------------------------------------------------------


def test_another_merchants_objects_are_404(env: Env) -> None:
    cus = customer(env)
    pm = payment_method(env, cus)
    err(env.get(f"/v1/customers/{cus}", env.other_key), 404, "resource_missing", "id")
    err(env.post("/v1/payment_methods", card_body(cus), env.other_key), 404, "resource_missing", "customer")
    err(env.get(f"/v1/customers/{cus}/payment_methods", env.other_key), 404, "resource_missing")
    body = {"amount": 500, "currency": "usd", "customer": cus, "payment_method": pm}
    err(env.post("/v1/payments", body, env.other_key), 404, "resource_missing", "customer")
    other_cus = customer(env, env.other_key)
    err(env.post("/v1/payments", {**body, "customer": other_cus}, env.other_key), 404, param="payment_method")
    # a card of another customer of the same merchant is not chargeable for this one
    cus2 = customer(env)
    err(env.post("/v1/payments", {**body, "customer": cus2}), 404, "resource_missing", "payment_method")
    err(env.post("/v1/carts", {"customer": cus}, env.other_key), 404, param="customer")
    assert env.temporal.started == [] and count(env, Payment) == 0


def _insert_payment(env: Env, cus: str, pm: str, status: str, capturable: int = 0) -> str:
    pid = new_id("pay")
    with transaction(env.sessions) as s:
        s.add(
            Payment(
                id=pid,
                merchant_id=env.merchant,
                customer_id=cus,
                payment_method_id=pm,
                amount=5000,
                currency="usd",
                status=status,
                capture_method="manual",
                amount_capturable=capturable,
                psp="sandbox",
                workflow_id=f"checkout:{pid}",
            )
        )
        s.flush()
        s.add(PaymentEvent(payment_id=pid, status="processing", reason="created"))
        s.add(PaymentEvent(payment_id=pid, status=status, reason="authorized"))
    return pid


def test_payment_reads_and_state_checks_before_the_workflow(env: Env) -> None:
    cus = customer(env)
    pm = payment_method(env, cus)
    held = _insert_payment(env, cus, pm, "requires_capture", capturable=5000)
    done = _insert_payment(env, cus, pm, "succeeded")
    p = env.get(f"/v1/payments/{held}").json()
    assert p["object"] == "payment" and p["status"] == "requires_capture" and p["amount_capturable"] == 5000
    assert [t["status"] for t in p["timeline"]] == ["processing", "requires_capture"]
    assert p["workflow_id"] == f"checkout:{held}" and p["last_payment_error"] is None
    err(env.get(f"/v1/payments/{held}", env.other_key), 404, "resource_missing")
    assert env.get(f"/v1/payments/{held}", env.operator_key).status_code == 200
    err(env.post(f"/v1/payments/{held}/capture", {"amount": 6000}), 400, "amount_too_large", "amount")
    err(env.post(f"/v1/payments/{held}/capture", {"amount": 6.5}), 400, "parameter_invalid", "amount")
    err(env.post(f"/v1/payments/{done}/capture", {}), 409, "payment_unexpected_state")
    err(env.post(f"/v1/payments/{done}/cancel"), 409, "payment_unexpected_state")
    err(env.post(f"/v1/payments/{held}/capture", {}, env.other_key), 404, "resource_missing")
    assert env.temporal.updates == []
    # a reachable state goes to the workflow; an unreachable Temporal is a 503, not a 500
    e = err(env.post(f"/v1/payments/{held}/capture", {"amount": 4000}), 503, "service_unavailable")
    assert e["type"] == "api_error"
    assert env.temporal.updates == [f"checkout:{held}:capture"]
    listed = env.get("/v1/payments", customer=cus, limit=1).json()
    assert listed["has_more"] is True and [p["id"] for p in listed["data"]] == [done]
    assert env.get("/v1/payments", customer="cus_unknown").json()["data"] == []
    assert [p["id"] for p in env.get("/v1/payments", status="requires_capture").json()["data"]] == [held]


# ---- idempotency --------------------------------------------------------------------------------


def test_idempotency_key_reuse_in_use_and_takeover(env: Env) -> None:
    cus = customer(env)
    pm = payment_method(env, cus)
    body = {"amount": 4200, "currency": "usd", "customer": cus, "payment_method": pm}
    key = "order-42"
    # Temporal is unreachable: 503, and the key is released (not stored) for the retry
    err(env.post("/v1/payments", body, **{"Idempotency-Key": key}), 503, "service_unavailable")
    [first_wf] = env.temporal.started
    with env.sessions() as s:
        row = s.get(IdempotencyKey, (env.merchant, key))
        assert row is not None and row.status == "in_flight" and row.resource_id == first_wf.split(":", 1)[1]
    # same key, another body: 422, nothing started
    e = err(env.post("/v1/payments", {**body, "amount": 4300}, **{"Idempotency-Key": key}), 422)
    assert e["code"] == "idempotency_key_reused"
    # key order and an explicit default do not make it another request: the retry re-uses the payment id
    same = {"capture_method": "automatic", **dict(reversed(list(body.items())))}
    err(env.post("/v1/payments", same, **{"Idempotency-Key": key}), 503)
    assert env.temporal.started == [first_wf, first_wf]
    # while a request holds the key: 409
    with transaction(env.sessions) as s:
        row = s.get(IdempotencyKey, (env.merchant, key))
        assert row is not None
        row.locked_until = datetime(2999, 1, 1, tzinfo=UTC)
    err(env.post("/v1/payments", body, **{"Idempotency-Key": key}), 409, "idempotency_key_in_use")
    # a stored answer (a 402 too) is replayed exactly
    stored = {"error": {"type": "card_error", "code": "card_declined", "message": "declined", "param": None}}
    with transaction(env.sessions) as s:
        row = s.get(IdempotencyKey, (env.merchant, key))
        assert row is not None
        row.status, row.response_status, row.response_body = "done", 402, stored
    r = env.post("/v1/payments", body, **{"Idempotency-Key": key})
    assert r.status_code == 402 and r.json() == stored and r.headers["Idempotent-Replayed"] == "true"
    # the key is the merchant's: another merchant's same key is its own
    other_cus = customer(env, env.other_key)
    other_pm = payment_method(env, other_cus, env.other_key)
    other = {**body, "customer": other_cus, "payment_method": other_pm}
    err(env.post("/v1/payments", other, env.other_key, **{"Idempotency-Key": key}), 503)
    assert len(set(env.temporal.started)) == 2
    err(env.post("/v1/payments", body, **{"Idempotency-Key": "x" * 256}), 400, "idempotency_key_invalid")


# ---- carts --------------------------------------------------------------------------------------


def test_cart_items_and_checkout_validation(env: Env) -> None:
    cus = customer(env)
    pm = payment_method(env, cus)

    def product(price: int, currency: str = "usd") -> str:
        r = env.post("/v1/products", {"name": "Widget", "price": price, "currency": currency, "stock": 5})
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    usd, usd2, eur = product(1500), product(250), product(900, "EUR")
    cart = env.post("/v1/carts", {"customer": cus}).json()["id"]
    shipping = {"line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"}
    err(
        env.post(f"/v1/carts/{cart}/checkout", {"payment_method": pm, "shipping_address": shipping}),
        400,
        "cart_empty",
    )
    assert env.post(f"/v1/carts/{cart}/items", {"product": usd, "quantity": 2}).status_code == 200
    c = env.post(f"/v1/carts/{cart}/items", {"product": usd, "quantity": 1}).json()
    assert [(i["product"], i["quantity"]) for i in c["items"]] == [(usd, 3)] and c["amount"] == 4500
    c = env.post(f"/v1/carts/{cart}/items", {"product": usd2, "quantity": 1}).json()
    assert c["amount"] == 4750 and c["currency"] == "usd"
    err(
        env.post(f"/v1/carts/{cart}/items", {"product": eur, "quantity": 1}),
        400,
        "currency_mismatch",
        "product",
    )
    err(env.post(f"/v1/carts/{cart}/items", {"product": usd, "quantity": 0}), 400, param="quantity")
    err(env.post(f"/v1/carts/{cart}/items", {"product": "prod_nope", "quantity": 1}), 404, param="product")
    bad_ship = {**shipping, "country": "Narnia"}
    err(
        env.post(f"/v1/carts/{cart}/checkout", {"payment_method": pm, "shipping_address": bad_ship}),
        400,
        param="shipping_address.country",
    )
    cus2 = customer(env)
    pm2 = payment_method(env, cus2)
    err(
        env.post(f"/v1/carts/{cart}/checkout", {"payment_method": pm2, "shipping_address": shipping}),
        404,
        "resource_missing",
        "payment_method",
    )
    err(env.get(f"/v1/carts/{cart}", env.other_key), 404, "resource_missing")
    assert env.get(f"/v1/carts/{cart}").json()["status"] == "open"
    assert env.temporal.started == []


# ---- routing and the unexpected ----------------------------------------------------------------


def test_unknown_routes_methods_and_crashes_keep_the_shape(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    err(env.get("/v1/nothing"), 404, "unrecognized_url")
    err(env.client.delete("/v1/customers", headers=env.h()), 405, "method_not_allowed")

    @env.client.app.get("/boom")  # type: ignore[attr-defined]
    def boom() -> None:
        raise RuntimeError("secret detail")

    r = env.client.get("/boom")
    e = err(r, 500, "internal_error")
    assert e["type"] == "api_error" and "secret" not in r.text
    # logged with its (plain) traceback for the operator, counted as a 500
    assert "unhandled_error" in caplog.text and "RuntimeError" in caplog.text
    assert 'route="/boom",status="500"' in env.client.get("/metrics").text


def test_health_metrics_and_openapi(env: Env) -> None:
    assert env.client.get("/healthz").json()["database"] == "ok"
    cus = customer(env)
    env.get(f"/v1/customers/{cus}")
    env.get("/v1/customers/cus_nope")
    metrics = env.client.get("/metrics").text
    assert 'route="/v1/customers/{customer_id}",status="200"' in metrics
    assert 'route="/v1/customers/{customer_id}",status="404"' in metrics
    assert "paysaga_http_request_duration_seconds_bucket" in metrics
    paths = env.client.get("/openapi.json").json()["paths"]
    assert {"/v1/payments", "/v1/carts/{cart_id}/checkout", "/v1/ledger/check"} <= set(paths)
    err(env.get("/v1/ledger/accounts/not_an_account", env.operator_key), 400, param="account")
    acct = env.get(f"/v1/ledger/accounts/merchant_payable:{env.merchant}:usd", env.operator_key).json()
    assert acct["balance"] == 0 and acct["entries"] == [] and acct["currency"] == "usd"
    assert env.client.get("/docs").status_code == 200


def test_customer_and_product_objects_follow_the_conventions(env: Env) -> None:
    r = env.post("/v1/customers", {"email": "a@b.co", "metadata": {"crm": "42"}})
    c = r.json()
    assert c["id"].startswith("cus_") and c["object"] == "customer" and c["livemode"] is False
    assert isinstance(c["created"], int) and c["metadata"] == {"crm": "42"}
    assert env.get(f"/v1/customers/{c['id']}").json() == c
    p = env.post("/v1/products", {"name": "Book", "price": 1000, "currency": "JPY", "stock": 3}).json()
    assert p["currency"] == "jpy" and p["id"].startswith("prod_") and p["stock"] == 3
    with env.sessions() as s:
        assert s.get(Customer, c["id"]) is not None
