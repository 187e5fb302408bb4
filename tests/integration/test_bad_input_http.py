"""Bad input gets a clear 4xx in the documented shape, never a 500, and writes nothing.
Card numbers and cvc never reach our database, our logs or Temporal."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.integration.conftest import Api, Stack
from tests.integration.helpers import CVC, VISA, customer, customer_with_card, payment_body

pytestmark = pytest.mark.integration


def assert_error(r: Any, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"type", "code", "message", "param"}, err
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return dict(err)


async def count_payments(api: Api) -> int:
    n, after = 0, None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after:
            params["starting_after"] = after
        page = (await api.get("/v1/payments", params=params)).json()
        n += len(page["data"])
        if not page["has_more"]:
            return n
        after = page["data"][-1]["id"]


async def test_bad_payments_are_4xx_and_write_nothing(api: Api, other_api: Api) -> None:
    cus, pm = await customer_with_card(api)
    before = await count_payments(api)
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({**payment_body(cus, pm), "amount": -5}, 400, "amount"),
        ({**payment_body(cus, pm), "amount": 0}, 400, "amount"),
        ({**payment_body(cus, pm), "amount": 12.5}, 400, "amount"),
        ({**payment_body(cus, pm), "amount": "1000"}, 400, "amount"),
        ({**payment_body(cus, pm), "currency": "xyz"}, 400, "currency"),
        ({**payment_body(cus, pm), "capture_method": "later"}, 400, "capture_method"),
        ({k: v for k, v in payment_body(cus, pm).items() if k != "amount"}, 400, "amount"),
        ({k: v for k, v in payment_body(cus, pm).items() if k != "payment_method"}, 400, "payment_method"),
    ]
    for body, status, param in cases:
        assert_error(await api.post("/v1/payments", json=body), status, param=param)
    assert_error(
        await api.post("/v1/payments", content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
    )
    assert_error(await api.post("/v1/payments", json=payment_body("cus_nope", pm)), 404, "resource_missing")
    # another merchant's customer and card are invisible: 404, not 403
    assert_error(await other_api.post("/v1/payments", json=payment_body(cus, pm)), 404, "resource_missing")
    other_cus, other_pm = await customer_with_card(other_api)
    assert_error(await api.post("/v1/payments", json=payment_body(cus, other_pm)), 404, "resource_missing")
    assert_error(await api.get(f"/v1/customers/{other_cus}"), 404, "resource_missing")
    # a card of another customer of the same merchant cannot be charged for this one
    cus2 = (await customer(api))["id"]
    assert_error(await api.post("/v1/payments", json=payment_body(cus2, pm)), 404)
    assert await count_payments(api) == before


async def test_auth_errors(stack: Stack) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        assert_error(await http.get("/v1/payments"), 401)
        assert_error(await http.get("/v1/payments", headers={"Authorization": "Bearer sk_test_wrong"}), 401)


async def test_bad_cards_are_rejected_without_echoing_the_number(api: Api) -> None:
    cus = (await customer(api))["id"]
    base = {"number": VISA, "exp_month": 12, "exp_year": 2034, "cvc": CVC}
    cases = [
        ({**base, "number": "4242424242424241"}, "card.number"),
        ({**base, "exp_month": 13}, "card.exp_month"),
        ({**base, "exp_year": 2001}, "card.exp_year"),
        ({**base, "cvc": "12"}, "card.cvc"),
    ]
    for card, param in cases:
        r = await api.post("/v1/payment_methods", json={"type": "card", "customer": cus, "card": card})
        assert_error(r, 400, param=param)
        assert str(card["number"]) not in r.text and f'"{card["cvc"]}"' not in r.text
    listed = (await api.get(f"/v1/customers/{cus}/payment_methods")).json()
    assert listed["data"] == []
    r = await api.post("/v1/customers", json={"email": "not-an-email", "name": "x", "country": "US"})
    assert_error(r, 400, param="email")


async def test_card_data_is_shown_masked_only(api: Api) -> None:
    cus = (await customer(api))["id"]
    r = await api.post(
        "/v1/payment_methods",
        json={
            "type": "card",
            "customer": cus,
            "card": {"number": VISA, "exp_month": 1, "exp_year": 2033, "cvc": "987"},
        },
    )
    pm = r.json()
    assert (
        pm["card"]["last4"] == "4242" and pm["card"]["brand"] == "visa" and pm["card"]["funding"] == "credit"
    )
    assert len(pm["card"]["fingerprint"]) >= 16
    assert VISA not in r.text and "987" not in r.text
    again = (await api.get(f"/v1/customers/{cus}/payment_methods")).json()["data"][0]
    assert again["card"]["fingerprint"] == pm["card"]["fingerprint"]


def _db_text(stack: Stack) -> str:
    """Every value in every table of the app database, as text."""
    engine = create_engine(stack.database_url)
    parts = []
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                parts.append(" ".join(str(v) for v in row))
    engine.dispose()
    return "\n".join(parts)


async def test_card_numbers_never_reach_db_logs_or_temporal(api: Api, stack: Stack) -> None:
    # exercise a payment so the workflow history exists
    cus, pm = await customer_with_card(api, VISA)
    assert (await api.post("/v1/payments", json=payment_body(cus, pm))).status_code == 200
    cvc_marker = f'"{CVC}"'
    db = _db_text(stack)
    assert VISA not in db
    assert cvc_marker not in db
    logs = stack.logs()
    assert VISA not in logs
    temporal_db = stack.data_dir / "temporal.db"
    assert temporal_db.exists()
    raw = temporal_db.read_bytes()
    for suffix in ("-wal", "-shm"):
        extra = temporal_db.with_name(temporal_db.name + suffix)
        if extra.exists():
            raw += extra.read_bytes()
    assert VISA.encode() not in raw
    # and the payload codec is on: the workflow input (which carries the PSP token) is not readable
    engine = create_engine(stack.database_url)
    with engine.connect() as conn:
        token = conn.execute(
            text("SELECT psp_token FROM payment_methods WHERE id = :id"), {"id": pm}
        ).scalar_one()
    engine.dispose()
    assert token.encode() not in raw


async def test_unstorable_text_is_a_400_not_a_500(api: Api) -> None:
    # found by the fuzzer: a NUL byte (PostgreSQL refuses it) or an unpaired surrogate in any string
    for body in (
        b'{"customer": "\\u0000oq"}',
        b'{"customer": "cus_\\ud8f6"}',
    ):
        r = await api.post("/v1/carts", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 404), r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = await api.post(
        "/v1/customers",
        content=b'{"email": "a@example.com", "name": "x\\u0000y", "country": "US"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 or r.status_code == 200, r.text
