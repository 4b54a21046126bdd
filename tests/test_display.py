"""What the command line and the dashboard print about workers, from the records alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sonamu_tasks.display import heartbeat_text
from sonamu_tasks.records import STALE_AFTER, WorkerRecord


def worker(silent_for: float, now: datetime) -> WorkerRecord:
    seen = now - timedelta(seconds=silent_for)
    return WorkerRecord("w1", "host", 7, [("mail", "1")], 4, seen, seen, queues=["default"])


def test_a_worker_silent_past_stale_after_is_marked_stale_as_the_lists_take_it_as_gone() -> None:
    now = datetime.now(UTC)
    assert heartbeat_text(worker(3.25, now), now) == "3.2s"
    assert heartbeat_text(worker(STALE_AFTER, now), now) == "60.0s"  # the lists still count it live
    assert heartbeat_text(worker(75, now), now) == "75.0s (stale)"
