"""Double submit: 20 keys x 50 parallel POST /v1/payments with the same Idempotency-Key ->
exactly one payment and one sandbox authorization per key; every response is the stored
response or a 409 (the first request still in flight)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.integration.conftest import Api, Stack, authorizations
from tests.integration.helpers import customer_with_card, payment_body

pytestmark = pytest.mark.integration

KEYS = 20
PARALLEL = 50


async def test_twenty_keys_times_fifty_parallel_submits(api: Api, stack: Stack) -> None:
    cards = [await customer_with_card(api) for _ in range(4)]
    bodies = {
        f"dbl-{uuid.uuid4()}": payment_body(*cards[i % len(cards)], amount=1000 + i) for i in range(KEYS)
    }
    requests = [(key, body) for key, body in bodies.items() for _ in range(PARALLEL)]
    responses = await asyncio.gather(
        *(api.post("/v1/payments", json=body, headers={"Idempotency-Key": key}) for key, body in requests)
    )
    by_key: dict[str, list[tuple[int, dict[str, Any]]]] = {k: [] for k in bodies}
    for (key, _), r in zip(requests, responses, strict=True):
        by_key[key].append((r.status_code, r.json()))
    for key, answers in by_key.items():
        ok = [body for status, body in answers if status == 200]
        assert all(status in (200, 409) for status, _ in answers), (key, {s for s, _ in answers})
        assert all(
            body["error"]["code"] == "idempotency_key_in_use" for status, body in answers if status == 409
        )
        assert ok, f"{key}: no request got the payment"
        ids = {body["id"] for body in ok}
        assert len(ids) == 1, f"{key}: {len(ids)} payments"
        # every 200 is the one stored response, byte for byte the same object
        assert all(body == ok[0] for body in ok[1:]), key
        payment_id = ids.pop()
        assert await authorizations(stack, payment_id) == 1
        # and the key keeps answering it afterwards
        again = await api.post("/v1/payments", json=bodies[key], headers={"Idempotency-Key": key})
        assert again.status_code == 200 and again.json() == ok[0]
