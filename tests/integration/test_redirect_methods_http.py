"""Redirect payment methods end to end through HTTP: a wallet approved on the sandbox's page and
brought back by the return URL, net banking declined at the bank, the return URL's JSON answer,
a cancel while the customer is away, and the API's checks on the new method types."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Api, Stack, sandbox_payments
from tests.integration.helpers import customer
from tests.integration.psp_truth import assert_agrees, browser, netbanking, pay, wait_final, wallet

pytestmark = pytest.mark.integration


async def test_wallet_approved_on_the_page_and_back_by_the_return_url(
    api: Api, ops: Api, stack: Stack
) -> None:
    cus = (await customer(api))["id"]
    method = await wallet(api, cus)
    assert method["type"] == "wallet" and method["wallet"]["provider"] == "sandbox_wallet"
    assert method["card"] is None and method["id"].startswith("pm_")
    listed = (await api.get(f"/v1/customers/{cus}/payment_methods")).json()["data"]
    assert [m["type"] for m in listed] == ["wallet"]

    payment = await pay(api, cus, method["id"], 2300)
    assert payment["status"] == "requires_action"
    action = payment["next_action"]
    assert action["type"] == "redirect_to_url" and action["url"].startswith(f"{stack.sandbox_url}/redirect/")

    async with browser(stack) as customer_browser:
        page = await customer_browser.get(action["url"])
        assert page.status_code == 200 and "Approve" in page.text and "2300" in page.text
        back = await customer_browser.post(f"{action['url']}/approve")
        assert back.status_code == 303
        return_url = back.headers["location"]
        assert return_url == f"{stack.api_url}/v1/payments/{payment['id']}/return"
        # the browser follows: our return page (no API key) re-checks at the PSP, shows the status
        shown = await customer_browser.get(return_url, headers={"Accept": "text/html"})
    assert shown.status_code == 200 and "text/html" in shown.headers["content-type"]
    assert "succeeded" in shown.text, shown.text

    final = await wait_final(api, payment["id"], timeout=30)
    assert (final["status"], final["amount_received"]) == ("succeeded", 2300)
    assert any(e["status"] == "requires_action" for e in final["timeline"])
    await assert_agrees(api, ops, stack, final)


async def test_netbanking_declined_at_the_bank(api: Api, ops: Api, stack: Stack) -> None:
    cus = (await customer(api))["id"]
    method = await netbanking(api, cus, "icici")
    assert (method["type"], method["netbanking"], method["card"]) == ("netbanking", {"bank": "icici"}, None)

    payment = await pay(api, cus, method["id"], 1800)
    assert payment["status"] == "requires_action"
    async with browser(stack) as customer_browser:
        page = await customer_browser.get(payment["next_action"]["url"])
        assert "icici" in page.text
        r = await customer_browser.post(f"{payment['next_action']['url']}/decline")
    assert r.status_code == 303  # the browser is not brought back: the webhook tells the workflow

    final = await wait_final(api, payment["id"], timeout=60)
    assert final["status"] == "failed"
    err = final["last_payment_error"]
    assert (err["code"], err["decline_code"]) == ("payment_method_provider_decline", "bank_declined")
    [psp] = await sandbox_payments(stack, payment["id"])
    assert (psp["status"], psp["amount_captured"]) == ("failed", 0)
    await assert_agrees(api, ops, stack, final)


async def test_return_url_answers_json_with_the_status(api: Api, ops: Api, stack: Stack) -> None:
    cus = (await customer(api))["id"]
    method = await wallet(api, cus)
    payment = await pay(api, cus, method["id"], 1700)
    async with browser(stack) as customer_browser:
        # approve and follow the redirect to our return URL, asking for JSON
        r = await customer_browser.post(
            f"{payment['next_action']['url']}/approve",
            headers={"Accept": "application/json"},
            follow_redirects=True,
        )
        # the customer comes back once more (a reload): nothing left to check, same answer
        again = await customer_browser.get(str(r.url), headers={"Accept": "application/json"})
        missing = await customer_browser.get(f"{stack.api_url}/v1/payments/pay_nope/return")
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "payment_return", "id": payment["id"], "status": "succeeded"}
    assert again.json() == r.json()
    assert missing.status_code == 404
    await assert_agrees(api, ops, stack, await wait_final(api, payment["id"]))


async def test_cancel_while_the_customer_is_on_the_page(api: Api, ops: Api, stack: Stack) -> None:
    cus = (await customer(api))["id"]
    method = await wallet(api, cus)
    payment = await pay(api, cus, method["id"], 1600)
    r = await api.post(f"/v1/payments/{payment['id']}/cancel", json={"cancellation_reason": "abandoned"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"
    async with browser(stack) as customer_browser:
        late = await customer_browser.post(f"{payment['next_action']['url']}/approve")
    assert late.status_code == 409  # the sandbox voided it: too late to approve
    [psp] = await sandbox_payments(stack, payment["id"])
    assert psp["status"] == "canceled"
    await assert_agrees(api, ops, stack, await wait_final(api, payment["id"]))


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"type": "netbanking"}, 400, "parameter_missing", "netbanking"),
        ({"type": "netbanking", "netbanking": {"bank": "No Such Bank"}}, 400, None, "netbanking.bank"),
        ({"type": "wallet", "netbanking": {"bank": "hdfc"}}, 400, "parameter_unknown", "netbanking"),
        (
            {
                "type": "wallet",
                "card": {"number": "4242424242424242", "exp_month": 1, "exp_year": 2040, "cvc": "1"},
            },
            400,
            "parameter_unknown",
            "card",
        ),
        ({"type": "card"}, 400, "parameter_missing", "card"),
        ({"type": "paypal"}, 400, None, "type"),
    ],
)
async def test_payment_method_type_checks(
    api: Api, body: dict[str, object], status: int, code: str | None, param: str
) -> None:
    cus = (await customer(api))["id"]
    r = await api.post("/v1/payment_methods", json={**body, "customer": cus})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert "4242424242424242" not in r.text
