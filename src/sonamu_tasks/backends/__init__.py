"""Storage backends. The engine talks to storage only through `base.Backend`."""

from __future__ import annotations

from .base import Backend, ClaimedRun, RunRecord, StepRecord, WorkerRecord

__all__ = ["Backend", "ClaimedRun", "RunRecord", "StepRecord", "WorkerRecord"]
