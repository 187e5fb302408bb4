"""The chaos run in a small configuration (the full one is `make chaos`): payments through HTTP
while the worker is SIGKILLed twice and the API and the Temporal dev server once; the script
exits non-zero on any violated invariant (not terminal, charged twice, PSP / database / ledger
disagreeing, unbalanced ledger, one key -> two payments)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_small_chaos_run_has_no_violations(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.chaos",
            "--n",
            "24",
            "--kills",
            "2",
            "--window",
            "12",
            "--settle",
            "150",
            "--timeout",
            "240",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "violations" in run.stderr and "SIGKILL worker" in run.stderr
