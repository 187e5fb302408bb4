"""Workflow tests run on one time-skipping test server per session (this fixture); each test module
brings its own fake activities, and each test its own task queue and Worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from workflows.contracts import SEARCH_ATTRIBUTES

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_SERVER = REPO_ROOT / ".venv" / "bin" / "temporal-test-server"


async def register_search_attributes(client: Client, namespace: str = "default") -> None:
    """The test server rejects unknown search attributes (a start that sets them fails with
    INVALID_ARGUMENT, an upsert fails every workflow task), exactly like a real cluster, so the
    test environment registers ours the way `temporal operator search-attribute create` would."""
    for key in SEARCH_ATTRIBUTES:
        # The SDK's SearchAttributeIndexedValueType mirrors the proto enum's numbers.
        kind = IndexedValueType.ValueType(key.indexed_value_type.value)
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace, search_attributes={key.name: kind})
            )
        except RPCError as err:
            # ListSearchAttributes is not implemented by the test server; "already exists" is fine.
            if err.status != RPCStatusCode.ALREADY_EXISTS and "already exists" not in err.message:
                raise


@pytest.fixture(scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=str(TEST_SERVER),
    )
    try:
        await register_search_attributes(environment.client)
        yield environment
    finally:
        await environment.shutdown()
