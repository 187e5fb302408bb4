"""DisputeWorkflow: one chargeback from the PSP's dispute.created to its outcome.

reserve the disputed amount (dispute row, ledger posting and payment -> disputed, one DB
transaction) -> notify the merchant -> accept evidence (the submit_evidence Update) until the
deadline timer -> submit it to the PSP (empty when none came: conceded) -> under_review -> wait for
the outcome (the dispute_outcome signal from the PSP webhook; the PSP is polled with backoff if no
webhook arrives) -> won: reserve released; lost: charged back plus the chargeback fee.

An outcome can arrive at any point (the PSP closed the dispute on its own); the workflow then
skips what is left of the evidence phase. Every activity runs to completion (run_shielded), so an
operator cancelling the workflow never leaves a posting with an unknown outcome; a cancelled
dispute keeps its reserve until an operator settles it.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

# passed through the sandbox, helpers included: see workflows/__init__.py
with workflow.unsafe.imports_passed_through():
    from domain.disputes import clean_evidence, evidence_deadline
    from workflows import options
    from workflows.contracts import (
        DISPUTE_WORKFLOW,
        SA_AMOUNT_MINOR,
        SA_CURRENCY,
        SA_MERCHANT_ID,
        CloseDisputeInput,
        CloseDisputeResult,
        DisputeAct,
        DisputeInput,
        DisputeNotice,
        DisputeOutcome,
        DisputeOutcomeName,
        DisputeResult,
        DisputeState,
        DisputeStatusUpdate,
        DisputeUpd,
        EvidenceRequest,
        LookupDisputeInput,
        OpenDisputeResult,
        PSPDisputeResult,
        SubmitEvidenceInput,
    )
    from workflows.saga import run_shielded

# Evidence must reach the PSP, deadline or not: retried without an attempt limit (a stuck call is
# visible in the UI as a pending activity); a request the PSP refuses is not retried.
PSP_EVIDENCE: Final[options.ActivityOptions] = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(minutes=5),
        maximum_attempts=0,
        non_retryable_error_types=["PSPRejected", "UnknownPSP"],
    ),
}
# The outcome normally arrives as a webhook. Without one, the PSP is asked after OUTCOME_FIRST_POLL,
# then at doubling intervals up to OUTCOME_MAX_POLL (issuers take weeks: a day apart is plenty).
OUTCOME_FIRST_POLL: Final = timedelta(hours=6)
OUTCOME_MAX_POLL: Final = timedelta(days=1)
# ApplicationError types the update validator rejects with (the API maps them to 409 / 400).
INVALID_STATE = "InvalidState"
INVALID_REQUEST = "InvalidRequest"


def _unix(dt: datetime) -> int:
    return int(dt.timestamp())


@workflow.defn(name=DISPUTE_WORKFLOW)
class DisputeWorkflow:
    @workflow.init
    def __init__(self, inp: DisputeInput) -> None:
        self._inp = inp
        self._state = DisputeState(
            dispute_id=inp.dispute_id, status="needs_response", evidence_due_by=inp.evidence_due_by
        )
        self._evidence: dict[str, str] | None = None
        # False once the deadline fired or the evidence is on its way: no more evidence accepted
        self._accepting = True
        self._outcome: DisputeOutcomeName | None = None

    # ---------------------------------------------------------------- run

    @workflow.run
    async def run(self, inp: DisputeInput) -> DisputeResult:
        workflow.upsert_search_attributes(
            [
                SA_MERCHANT_ID.value_set(inp.merchant_id),
                SA_AMOUNT_MINOR.value_set(inp.amount),
                SA_CURRENCY.value_set(inp.currency),
            ]
        )
        await self._act(DisputeAct.OPEN_DISPUTE, inp, options.DB, OpenDisputeResult)
        await self._notify("dispute_opened")

        deadline = evidence_deadline(
            workflow.now(),
            datetime.fromtimestamp(inp.evidence_due_by, UTC) if inp.evidence_due_by > 0 else None,
        )
        self._state.evidence_due_by = _unix(deadline)
        await self._collect_evidence(deadline)
        if self._outcome is None:
            await self._submit_evidence()
        outcome = await self._wait_for_outcome()

        closed: CloseDisputeResult = await self._act(
            DisputeAct.CLOSE_DISPUTE,
            CloseDisputeInput(dispute_id=inp.dispute_id, outcome=outcome),
            options.DB,
            CloseDisputeResult,
        )
        self._state.status = outcome
        self._state.outcome = outcome
        await self._notify("dispute_won" if outcome == "won" else "dispute_lost")
        await workflow.wait_condition(workflow.all_handlers_finished)
        return DisputeResult(dispute_id=inp.dispute_id, status=outcome, chargeback_fee=closed.chargeback_fee)

    # ---------------------------------------------------------------- steps

    async def _collect_evidence(self, deadline: datetime) -> None:
        """Until the merchant's evidence, an outcome, or the deadline, whichever comes first."""
        remaining = deadline - workflow.now()
        if remaining > timedelta(0):
            try:
                await workflow.wait_condition(
                    lambda: self._evidence is not None or self._outcome is not None,
                    timeout=remaining,
                    timeout_summary="evidence_deadline",
                )
            except TimeoutError:
                workflow.logger.info("dispute %s: no evidence by the deadline", self._inp.dispute_id)
        self._accepting = False

    async def _submit_evidence(self) -> None:
        inp = self._inp
        evidence = self._evidence or {}  # none by the deadline: submitted empty (conceded)
        try:
            res: PSPDisputeResult = await self._act(
                DisputeAct.SUBMIT_DISPUTE_EVIDENCE,
                SubmitEvidenceInput(
                    dispute_id=inp.dispute_id,
                    psp=inp.psp,
                    psp_dispute_id=inp.psp_dispute_id,
                    evidence=evidence,
                ),
                PSP_EVIDENCE,
                PSPDisputeResult,
            )
        except ActivityError as err:
            # Refused: most likely the PSP closed the dispute meanwhile. Its own view decides.
            workflow.logger.warning("evidence for %s refused by the PSP: %s", inp.dispute_id, err.cause)
            res = await self._lookup()
            if res.status == "needs_response":
                raise ApplicationError(
                    f"the PSP refused the evidence for {inp.dispute_id} and still awaits it",
                    type="EvidenceRefused",
                    non_retryable=True,
                ) from err
        self._take_outcome(res.status)
        await self._act(
            DisputeAct.UPDATE_DISPUTE,
            DisputeStatusUpdate(
                dispute_id=inp.dispute_id,
                status="under_review",
                evidence=evidence,
                note=(
                    f"dispute {inp.dispute_id}: evidence submitted ({', '.join(sorted(evidence))})"
                    if evidence
                    else f"dispute {inp.dispute_id}: no evidence by the deadline, submitted empty"
                ),
            ),
            options.DB,
        )
        if self._outcome is None:
            self._state.status = "under_review"
        self._state.evidence_submitted = bool(evidence)

    async def _wait_for_outcome(self) -> DisputeOutcomeName:
        wait = OUTCOME_FIRST_POLL
        while self._outcome is None:
            try:
                await workflow.wait_condition(
                    lambda: self._outcome is not None, timeout=wait, timeout_summary="dispute_outcome_poll"
                )
            except TimeoutError:
                try:
                    self._take_outcome((await self._lookup()).status)
                except ActivityError as err:  # PSP unreachable for now: ask again later
                    workflow.logger.warning("dispute %s: PSP look-up failed: %s", self._inp.dispute_id, err)
                wait = min(wait * 2, OUTCOME_MAX_POLL)
        return self._outcome

    async def _lookup(self) -> PSPDisputeResult:
        res: PSPDisputeResult = await self._act(
            DisputeAct.LOOKUP_PSP_DISPUTE,
            LookupDisputeInput(psp=self._inp.psp, psp_dispute_id=self._inp.psp_dispute_id),
            options.PSP,
            PSPDisputeResult,
        )
        return res

    async def _notify(self, kind: Any) -> None:
        try:
            await self._act(
                DisputeAct.NOTIFY_DISPUTE,
                DisputeNotice(dispute_id=self._inp.dispute_id, kind=kind),
                options.NOTIFY,
            )
        except ActivityError as err:  # a notice never holds up a dispute
            workflow.logger.warning("dispute notice %s not recorded: %s", kind, err.cause)

    # ---------------------------------------------------------------- helpers

    def _take_outcome(self, status: str) -> None:
        if self._outcome is None and status in ("won", "lost"):
            self._outcome = "won" if status == "won" else "lost"

    async def _act(
        self, name: str, arg: Any, preset: options.ActivityOptions, result_type: type | None = None
    ) -> Any:
        # Shielded: a cancellation waits for the call instead of abandoning it mid-posting.
        return await run_shielded(workflow.execute_activity(name, arg, result_type=result_type, **preset))

    def _snapshot(self) -> DisputeState:
        return dataclasses.replace(self._state)

    # ---------------------------------------------------------------- update, signal, query

    @workflow.update(name=DisputeUpd.SUBMIT_EVIDENCE)
    async def submit_evidence(self, req: EvidenceRequest) -> DisputeState:
        """The merchant's evidence; answers once it is with the PSP (under_review, or closed)."""
        self._evidence = clean_evidence(req.evidence)
        await workflow.wait_condition(lambda: self._state.status != "needs_response")
        return self._snapshot()

    @submit_evidence.validator
    def _validate_submit_evidence(self, req: EvidenceRequest) -> None:
        if not self._accepting or self._evidence is not None or self._outcome is not None:
            raise ApplicationError(
                f"dispute is {self._state.status} and no longer accepts evidence", type=INVALID_STATE
            )
        try:
            cleaned = clean_evidence(req.evidence)
        except ValueError as err:
            raise ApplicationError(str(err), type=INVALID_REQUEST) from None
        if not cleaned:
            raise ApplicationError("evidence needs at least one non-empty field", type=INVALID_REQUEST)

    @workflow.signal(name=DisputeUpd.OUTCOME)
    def outcome(self, sig: DisputeOutcome) -> None:
        """The PSP's decision (webhook). The first outcome counts; a redelivery changes nothing."""
        self._take_outcome(sig.status)

    @workflow.query(name=DisputeUpd.QUERY_STATE)
    def state(self) -> DisputeState:
        return self._state
