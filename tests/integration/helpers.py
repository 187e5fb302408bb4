from __future__ import annotations

import uuid
from typing import Any

from tests.integration.conftest import Api

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
DEBIT = "4000056655665556"
DECLINE = "4000000000000002"
INSUFFICIENT = "4000000000009995"
EXPIRED = "4000000000000069"
OTP_CARD = "4000002760003184"
FLAKY = "4000000000000119"
CVC = "314"


async def customer(api: Api, country: str = "US") -> dict[str, Any]:
    r = await api.post(
        "/v1/customers",
        json={"email": f"c{uuid.uuid4().hex[:8]}@example.com", "name": "Ada Lovelace", "country": country},
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def card(api: Api, customer_id: str, number: str = VISA) -> dict[str, Any]:
    r = await api.post(
        "/v1/payment_methods",
        json={
            "type": "card",
            "customer": customer_id,
            "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": CVC, "name": "Ada"},
        },
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def customer_with_card(api: Api, number: str = VISA) -> tuple[str, str]:
    cus = await customer(api)
    pm = await card(api, cus["id"], number)
    return cus["id"], pm["id"]


def payment_body(cus: str, pm: str, amount: int = 2000, **extra: Any) -> dict[str, Any]:
    return {"amount": amount, "currency": "usd", "customer": cus, "payment_method": pm, **extra}


async def product(api: Api, price: int = 1500, stock: int = 10, currency: str = "usd") -> dict[str, Any]:
    r = await api.post(
        "/v1/products",
        json={"name": f"Widget {uuid.uuid4().hex[:4]}", "price": price, "currency": currency, "stock": stock},
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


SHIPPING = {"line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"}
