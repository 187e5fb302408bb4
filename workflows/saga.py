"""A small saga for workflows: undo steps registered before their forward step, run in reverse.

Cancellation: a Temporal workflow cancellation arrives as `asyncio.Task.cancel()` on the task that
runs `@workflow.run`, and an activity awaited in that task gets a cancel request. An undo therefore
runs in its own asyncio task (`asyncio.create_task`), which the cancellation never reaches; the
caller only waits for it, the way `asyncio.shield` does (with `workflow.wait([task])`: the
deterministic `asyncio.wait`, which unlike `asyncio.shield` logs no "exception in shielded future"
when the work fails after the caller was cancelled). The activities the undo starts are therefore
never cancelled. When the waiting task is cancelled it catches the CancelledError, keeps waiting
and reports the cancellation once the work is done. Tested in tests/workflows/test_checkout.py
(test_cancel_during_authorize_*, test_cancel_during_compensation_*).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from temporalio import workflow

T = TypeVar("T")


async def _wait_through_cancel(task: asyncio.Task[Any]) -> asyncio.CancelledError | None:
    """Wait until `task` is done, ignoring cancellation of the waiting task; return the
    CancelledError that arrived meanwhile, if any."""
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await workflow.wait([task])
        except asyncio.CancelledError as err:
            cancelled = err
            current = asyncio.current_task()
            if current is not None:
                # Python 3.11+: without this the next await in this task is cancelled again.
                current.uncancel()
    return cancelled


async def run_shielded(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to completion even if the calling workflow task is cancelled meanwhile.

    Returns its result or raises its exception. If the caller was cancelled while waiting and the
    work succeeded, the CancelledError is raised afterwards, so the caller still sees it.
    """
    task = asyncio.create_task(work)
    cancelled = await _wait_through_cancel(task)
    result = task.result()
    if cancelled is not None:
        raise cancelled
    return result


class Saga:
    """Undo steps in registration order; `compensate` runs them newest first.

    Register an undo BEFORE its forward step: if the forward step's outcome is unknown (a timeout
    after the other side may have acted) the undo must still run, so every undo is idempotent.
    """

    def __init__(self) -> None:
        self._undos: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        # Set when a workflow cancellation arrived while compensate() was running; the undos were
        # completed anyway and the caller decides what the cancellation means.
        self.cancel_requested = False

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._undos]

    def add(self, undo: Callable[[], Awaitable[None]], name: str) -> None:
        """Register `undo` under `name` (a name registered twice keeps only the newest undo)."""
        self.discard(name)
        self._undos.append((name, undo))

    def discard(self, name: str) -> bool:
        """Drop the undo `name` (it no longer applies); True if there was one."""
        before = len(self._undos)
        self._undos = [(n, u) for n, u in self._undos if n != name]
        return len(self._undos) != before

    def clear(self) -> None:
        """Forget every undo: the saga reached a point that must not be undone."""
        self._undos.clear()

    async def compensate(self) -> list[str]:
        """Run every registered undo, newest first, each to completion despite cancellation.

        A failing undo is logged and skipped; the others still run. Raises nothing. Returns the
        names of the undos that failed. The saga is empty afterwards, so a second call is a no-op.
        """
        failed: list[str] = []
        while self._undos:
            name, undo = self._undos.pop()
            task = asyncio.create_task(_call(undo))
            if await _wait_through_cancel(task) is not None:
                self.cancel_requested = True
            if task.cancelled():
                failed.append(name)
                workflow.logger.error("saga undo %r was cancelled", name)
            elif (err := task.exception()) is not None:
                failed.append(name)
                workflow.logger.error("saga undo %r failed: %s", name, err)
        return failed


async def _call(undo: Callable[[], Awaitable[None]]) -> None:
    await undo()
