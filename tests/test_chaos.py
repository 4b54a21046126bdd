"""The chaos runner's short version passes: nothing lost, no step re-executed after its checkpoint, no cron doubled."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sonamu_tasks.testing import PostgresNotInstalled
from sonamu_tasks.testing.postgres_cluster import find_postgres_bin

ROOT = Path(__file__).resolve().parents[1]
# The scenarios no other test of the suite drives with real processes. The others have their own tests, which the
# suite runs (postgres_restart: test_postgres_restart.py; cron: test_schedules.py's several worker processes;
# pgbouncer: test_pgbouncer.py and the behaviour suite through PgBouncer; failover: test_failover.py), or
# measure what an asynchronous standby loses (failover_async, a figure for the docs, not a pass or fail). The
# whole runner (`python -m chaos --short`, every scenario) is run before a change lands; running them here too
# took 45 s of a suite that must stay under 15 minutes.
SCENARIOS = [
    "worker_kills",
    "connections_killed",
    "bulk_starts",
    "lease_loss",
    "sleep_restart",
    "bad_input",
    "hostile_neighbours",
    "composition",
    "messages",
    "queues",
]


@pytest.mark.timeout(420)  # the runner's own deadlines come first; pytest's default 120 s would cut it short
def test_chaos_short_run_loses_and_doubles_nothing() -> None:
    try:
        find_postgres_bin()
    except PostgresNotInstalled as error:
        pytest.skip(str(error))
    # Every wait inside the runner has its own deadline; this timeout is only the last safety net.
    done = subprocess.run(
        [sys.executable, "-m", "chaos", "--short", "--only", ",".join(SCENARIOS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
    )
    output = done.stdout
    assert done.returncode == 0, output + done.stderr[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("scenario=")]
    assert [re.search(r"scenario=(\S+)", line).group(1) for line in lines] == SCENARIOS, output  # type: ignore[union-attr]
    for line in lines:
        for field in ("lost", "steps_reexecuted_after_checkpoint", "duplicate_cron_runs"):
            assert f" {field}=0 " in line, line
