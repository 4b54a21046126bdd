"""Attempts that misbehave, for the tests of what the worker does about it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sonamu_tasks.attempt import Attempt


@dataclass
class AttemptCount:
    started: int = 0


def first_attempt_vanishes(monkeypatch: pytest.MonkeyPatch) -> AttemptCount:
    """The first attempt of this test ends without a word, as one lost to a bug or an outage would: its run stays
    'running', leased, until the lease runs out. Every later attempt runs as usual. Counts the attempts."""
    real_execute = Attempt.execute
    count = AttemptCount()

    async def vanishes_first(self: Attempt) -> None:
        count.started += 1
        if count.started > 1:
            await real_execute(self)

    monkeypatch.setattr(Attempt, "execute", vanishes_first)
    return count
