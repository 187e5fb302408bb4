"""Replay gate: every recorded history replays against today's workflow code without a
nondeterminism error. A change that alters a workflow's commands needs workflow.patched()."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from core.config import Settings
from core.temporal import data_converter
from workflows.checkout import CheckoutWorkflow
from workflows.dispute import DisputeWorkflow
from workflows.refund import RefundWorkflow
from workflows.returns import ReturnWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
WORKFLOWS = [CheckoutWorkflow, DisputeWorkflow, RefundWorkflow, ReturnWorkflow]


def test_every_workflow_type_has_recorded_histories() -> None:
    types = {p.name.split("-", 1)[0] for p in HISTORIES}
    assert {w.__temporal_workflow_definition.name for w in WORKFLOWS} <= types  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    # the histories were recorded with the dev payload key (the test stack runs on it)
    replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter(Settings(env="dev")))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"
