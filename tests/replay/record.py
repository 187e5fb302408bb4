"""Record workflow histories for the replay gate.

Every distinct branch (distinct sequence of history event types) of every workflow type that ran
on a Temporal server is written to tests/replay/histories/<type>-<status>-<hash>.json. The
integration tests call this at the end of their SQLite stack when PAYSAGA_RECORD_HISTORIES=1:

    PAYSAGA_RECORD_HISTORIES=1 .venv/bin/pytest tests/integration -k sqlite

Histories keep their payloads encrypted with the dev payload key (the stack runs on it), so they
hold no customer data in clear.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from temporalio.client import Client

from workflows.contracts import SA_PAYMENT_STATUS

HISTORIES = Path(__file__).parent / "histories"


async def record(client: Client, out_dir: Path = HISTORIES) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    seen = {p.stem.rsplit("-", 1)[-1] for p in out_dir.glob("*.json")}
    written = []
    async for wf in client.list_workflows("ExecutionStatus != 'Running'"):
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        shape = ",".join(str(e.event_type) for e in history.events)
        digest = hashlib.sha256(f"{wf.workflow_type}:{shape}".encode()).hexdigest()[:12]
        if digest in seen:
            continue
        seen.add(digest)
        status = wf.typed_search_attributes.get(SA_PAYMENT_STATUS) or (
            wf.status.name if wf.status else "unknown"
        )
        path = out_dir / f"{wf.workflow_type}-{str(status).lower()}-{digest}.json"
        path.write_text(history.to_json())
        written.append(path)
    return written
