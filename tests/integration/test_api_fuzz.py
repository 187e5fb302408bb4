"""API fuzzing with schemathesis against the app's own OpenAPI schema, on the running stack:
bounded examples, derandomized (fixed seed). Every operation: no 5xx, every response matches its
documented schema and content type.

(schemathesis' own pytest plugin does not run on pytest 9 yet, so the operations are driven
with hypothesis directly: the same strategies and the same checks.)"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from tests.stack import Stack

pytestmark = pytest.mark.integration

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
EXAMPLES_PER_OPERATION = 12


def _fuzzer(strategy: Any, headers: dict[str, str], excluded: list[Any]) -> Any:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same examples on every run
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS, excluded_checks=excluded)

    return fuzz


def test_no_5xx_and_responses_match_the_schema(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json")
    excluded = [c for c in schemathesis.checks.CHECKS.get_all() if c not in CHECKS]
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        operations += 1
        # operator routes are fuzzed with an operator key, the rest with a merchant key
        operator_route = operation.path.startswith("/v1/ledger") or operation.path.endswith("/review")
        headers = {"Authorization": f"Bearer {stack.operator_key if operator_route else stack.merchant_key}"}

        fuzz = _fuzzer(operation.as_strategy(), headers, excluded)
        try:
            fuzz()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures[operation.label] = f"{type(exc).__name__}: {str(exc)[:1500]}"
    assert operations >= 15
    assert not failures, "\n\n".join(f"{op}\n{msg}" for op, msg in failures.items())
