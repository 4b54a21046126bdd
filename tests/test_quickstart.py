"""The README's first command: the quick start runs end to end on the embedded default, twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SONAMU_TASKS_DATABASE_URL"}

    def run() -> str:
        done = subprocess.run(
            [sys.executable, str(QUICKSTART)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = run()
    assert "database: sqlite:///sonamu_tasks.db" in first
    assert "completed after 1 failed attempt(s)" in first
    assert "step charge-card   completed  attempts=2" in first
    # Keys in jsonb's order (shortest first), on SQLite as on PostgreSQL.
    assert "result: {'message': 'receipt R-" in first and "'payment': {'order': 42, " in first
    assert (tmp_path / "sonamu_tasks.db").exists()
    # The idempotency key finds the finished run: the same result, no new run.
    second = run()
    assert second.split("result: ")[1] == first.split("result: ")[1]


def test_the_approval_example_waits_for_its_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SONAMU_TASKS_DATABASE_URL"}
    example = QUICKSTART.parent / "approval.py"
    done = subprocess.run(
        [sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "{'amount': 820.0, 'waiting_for': 'manager approval'}; its status is waiting" in done.stdout
    assert "result: {'outcome': 'paid 820.00 to kim', 'decided_by': 'lee'}" in done.stdout
