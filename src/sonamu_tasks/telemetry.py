"""What the engine reports as it works: OpenTelemetry spans and Prometheus metrics, each when installed.

Both are optional extras (`otel`: opentelemetry-api; `metrics`: prometheus_client). Without them nothing is
imported and the engine skips every report (`Telemetry.enabled` is False). With opentelemetry installed:
- `run()` stores the caller's trace context (W3C traceparent) with the run;
- each attempt is a span `workflow {name}` that continues that trace, whichever process runs it, with the run
  id, workflow, version, attempt and outcome as attributes; each executed step is a child span
  `step {name}` (an exception is recorded on it); a child workflow started by a step continues the step's trace.
Spans are made only while the process has a tracer provider set (`trace.set_tracer_provider`, as the SDK or an
exporter's setup does): without one, OpenTelemetry's API hands out spans that record nothing, and making them
cost a worker 21 us of CPU per 3-step workflow (36 us for its telemetry, 15 now). A worker without one still
carries the caller's trace context through each attempt, so the children it starts join the caller's trace.
With prometheus_client installed, the counters and histograms below are kept in this process's default
registry, served by `worker --metrics-port` (`WorkerOptions.metrics_port`) and by the dashboard's `/metrics`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

try:  # the `otel` extra
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - depends on the environment
    otel_context = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

try:  # the `metrics` extra
    import prometheus_client
except ImportError:  # pragma: no cover - depends on the environment
    prometheus_client = None  # type: ignore[assignment]

logger = logging.getLogger("sonamu_tasks.telemetry")

STEP_LABELS_PER_WORKFLOW = 100
"""Distinct step labels a process keeps per workflow in the step-duration histogram; its later ones count as
OTHER_STEPS. Each label is a series per outcome, kept for as long as the process lives (about 2 kB of
`/metrics` text and 5 kB of memory each): steps named after ids would otherwise grow both without end."""
OTHER_STEPS = "(other)"

_BRACKETED = re.compile(r"\[[^\[\]]*\]")
_UUID = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}(?![0-9A-Za-z])")
_ID_WORD = re.compile(r"(?<![0-9A-Za-z])(?:\d+|(?=[a-fA-F]*\d)[0-9a-fA-F]{16,})(?![0-9A-Za-z])")
"""A word of digits ("17", "2024"), or of 16 hex digits or more (a hash, a hex id), between non-alphanumerics."""


@functools.lru_cache(maxsize=1024)
def step_label(name: str) -> str:
    """A step name as a metric label, without the parts of it that vary from item to item: what is in square
    brackets ("charge[17]" and "charge[alice]" count as "charge[]", as step.map and fan-outs name their items),
    and words that are numbers, UUIDs or long hex ids ("charge-17", "charge-3f2a...c9" count as "charge-#";
    "step2" and "v2-load" stay as they are). Other ids are left to the per-workflow limit (Metrics.step_series).
    (Cached: a worker asks at every step, mostly for the same few names.)"""
    return _ID_WORD.sub("#", _UUID.sub("#", _BRACKETED.sub("[]", name)))


@dataclass
class AttemptOutcome:
    """Filled by the attempt as it ends: completed, failed, retrying, parked, handed_back, stopped, lease_lost."""

    value: str = "unknown"
    error: BaseException | None = None
    """What failed the attempt (failed, retrying), recorded on its span."""


class Metrics:
    """The Prometheus series of the engine (in the default registry, created once per process)."""

    _instance: Metrics | None = None

    def __init__(self) -> None:
        assert prometheus_client is not None
        p = prometheus_client
        self.runs_started = p.Counter("sonamu_tasks_runs_started", "Runs claimed for the first time", ["workflow"])
        self.runs_completed = p.Counter("sonamu_tasks_runs_completed", "Runs completed", ["workflow"])
        self.runs_failed = p.Counter("sonamu_tasks_runs_failed", "Runs failed for good", ["workflow"])
        self.attempts = p.Counter("sonamu_tasks_attempts", "Attempts by how they ended", ["workflow", "outcome"])
        self.attempt_seconds = p.Histogram(
            "sonamu_tasks_attempt_duration_seconds", "Attempt durations", ["workflow", "outcome"]
        )
        self.step_seconds = p.Histogram(
            "sonamu_tasks_step_duration_seconds", "Executed steps (not replays)", ["workflow", "step", "outcome"]
        )
        self.claim_seconds = p.Histogram("sonamu_tasks_claim_duration_seconds", "Claim statements")
        self.claimed = p.Counter("sonamu_tasks_runs_claimed", "Runs claimed", ["workflow"])
        self.take_overs = p.Counter(
            "sonamu_tasks_take_overs", "Runs claimed after their previous worker's lease expired", ["workflow"]
        )
        self.lease_losses = p.Counter(
            "sonamu_tasks_lease_losses", "Attempts stopped because another worker took their run", ["workflow"]
        )
        self.backlog = p.Gauge(
            "sonamu_tasks_backlog", "Runs due and not claimed, per queue and workflow", ["queue", "workflow", "version"]
        )
        self.backlog_age = p.Gauge(
            "sonamu_tasks_backlog_oldest_seconds",
            "How long the oldest due, unclaimed run has waited, per queue and workflow",
            ["queue", "workflow", "version"],
        )
        self.backlog_seen: set[tuple[str, str, str]] = set()
        """The (queue, workflow, version) the backlog gauges have shown: 0 once their backlog empties."""
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._step_labels: dict[str, set[str]] = {}
        """The step labels each workflow has used, at most STEP_LABELS_PER_WORKFLOW."""
        self._capped: set[str] = set()
        """Workflows that have reached the limit (and had their warning)."""

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept for the next time: prometheus_client checks the labels and takes a
        lock at every call, several times per step and per attempt. (Not for the backlog gauges, which are
        cleared.)"""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def step_series(self, workflow: str, name: str, outcome: str) -> Any:
        """The step-duration series of step `name`: labelled `step_label(name)` if the workflow has used fewer
        than STEP_LABELS_PER_WORKFLOW labels or this one already, else OTHER_STEPS (said once per workflow)."""
        label = step_label(name)
        used = self._step_labels.setdefault(workflow, set())
        if label not in used:
            if len(used) < STEP_LABELS_PER_WORKFLOW:
                used.add(label)
            else:
                if workflow not in self._capped:
                    self._capped.add(workflow)
                    logger.warning(
                        "workflow %r has used %d distinct step labels in sonamu_tasks_step_duration_seconds, the "
                        'most this process keeps per workflow: its further steps count as step="%s" (the first: '
                        "%r). Step names that carry an id make one label each: put the part that varies in square "
                        'brackets (f"charge[{id}]" counts as "charge[]") or use step.map; numbers and UUIDs are '
                        'left out already (docs/operations/metrics-and-alerts.md, "Step labels")',
                        workflow,
                        STEP_LABELS_PER_WORKFLOW,
                        OTHER_STEPS,
                        name,
                    )
                label = OTHER_STEPS
        return self.child(self.step_seconds, workflow, label, outcome)

    @classmethod
    def shared(cls) -> Metrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


class Telemetry:
    """The engine's reports. `enabled` is False when neither extra is installed: callers skip every report."""

    def __init__(self, *, tracing: bool | None = None, metrics: bool | None = None) -> None:
        self.tracer = trace.get_tracer("sonamu_tasks") if trace is not None and tracing is not False else None
        self.metrics = Metrics.shared() if prometheus_client is not None and metrics is not False else None
        self.enabled = self.tracer is not None or self.metrics is not None

    # trace context

    def caller_context(self) -> str | None:
        """The current trace context as JSON, to store with a new run (None when not tracing, or outside any
        trace: the common case of a run() is answered without building a carrier)."""
        if self.tracer is None or propagate is None or not trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return json.dumps(carrier) if carrier else None

    # reports

    @contextlib.contextmanager
    def attempt(
        self, run_id: str, workflow: str, version: str, attempt: int, context: dict[str, str] | None, first: bool
    ) -> Iterator[AttemptOutcome]:
        outcome = AttemptOutcome()
        began = time.perf_counter()
        metrics = self.metrics
        if metrics is not None and first:
            metrics.child(metrics.runs_started, workflow).inc()
        span_scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.tracer is not None and propagate is not None:
            parent = propagate.extract(context) if context else None
            if _recording():
                span_scope = self.tracer.start_as_current_span(
                    f"workflow {workflow}",
                    context=parent,
                    attributes=_run_attributes(run_id, workflow, version, attempt),
                    record_exception=False,
                )
            elif parent is not None:  # no span here, but the children this attempt starts join the caller's trace
                span_scope = _attached(parent)
        with span_scope as span:
            try:
                yield outcome
            finally:
                if span is not None:
                    span.set_attribute("sonamu_tasks.outcome", outcome.value)
                    if outcome.value == "failed" or outcome.value == "retrying":
                        error = outcome.error
                        if error is not None:
                            span.record_exception(error)
                        described = None if error is None else f"{type(error).__name__}: {error}"
                        span.set_status(trace.Status(trace.StatusCode.ERROR, described))
                if metrics is not None:
                    metrics.child(metrics.attempts, workflow, outcome.value).inc()
                    metrics.child(metrics.attempt_seconds, workflow, outcome.value).observe(time.perf_counter() - began)
                    if outcome.value == "completed":
                        metrics.child(metrics.runs_completed, workflow).inc()
                    elif outcome.value == "failed":
                        metrics.child(metrics.runs_failed, workflow).inc()
                    elif outcome.value == "lease_lost":
                        metrics.child(metrics.lease_losses, workflow).inc()

    @contextlib.contextmanager
    def step(self, workflow: str, version: str, run_id: str, attempt: int, name: str) -> Iterator[None]:
        began = time.perf_counter()
        outcome = "completed"
        span_scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        # A step span only inside a recording attempt span (whose attempt asked _recording(), which reads the
        # environment): the current span says so from a context variable.
        if self.tracer is not None and trace.get_current_span().is_recording():
            attributes = {**_run_attributes(run_id, workflow, version, attempt), "sonamu_tasks.step": name}
            span_scope = self.tracer.start_as_current_span(f"step {name}", attributes=attributes)
        try:
            with span_scope:
                yield
        except BaseException:
            outcome = "failed"
            raise
        finally:
            metrics = self.metrics
            if metrics is not None:
                metrics.step_series(workflow, name, outcome).observe(time.perf_counter() - began)

    def claimed(self, seconds: float, runs: list[tuple[str, bool]]) -> None:
        """A claim statement took `seconds` and returned `runs` (workflow, whether a take-over)."""
        metrics = self.metrics
        if metrics is None:
            return
        metrics.claim_seconds.observe(seconds)
        for workflow, taken_over in runs:
            metrics.child(metrics.claimed, workflow).inc()
            if taken_over:
                metrics.child(metrics.take_overs, workflow).inc()

    def overdue_failed(self, workflows: list[str]) -> None:
        """Pending runs of these workflows (one entry per run) were failed because their deadline passed: failed
        for good, with no attempt of theirs ending to count them."""
        metrics = self.metrics
        if metrics is None:
            return
        for workflow in workflows:
            metrics.child(metrics.runs_failed, workflow).inc()

    def backlog(self, rows: list[tuple[str, str, str, int, float]]) -> None:
        """Due, unclaimed runs per (queue, workflow, version): how many and the oldest's wait in seconds. A
        series shown before and not in `rows` reads 0 (its backlog emptied): a panel or alert then sees 0, not
        "no data". The database's whole backlog, the same from every process (not this worker's share)."""
        metrics = self.metrics
        if metrics is None:
            return
        current = {(queue, workflow, version) for queue, workflow, version, _, _ in rows}
        for labels in metrics.backlog_seen - current:
            metrics.backlog.labels(*labels).set(0)
            metrics.backlog_age.labels(*labels).set(0)
        for queue, workflow, version, count, oldest in rows:
            metrics.backlog.labels(queue, workflow, version).set(count)
            metrics.backlog_age.labels(queue, workflow, version).set(oldest)
        metrics.backlog_seen |= current

    def backlog_unknown(self) -> None:
        """The backlog could not be read: its gauges are left out rather than shown stale."""
        if self.metrics is not None:
            self.metrics.backlog.clear()
            self.metrics.backlog_age.clear()


DISABLED = Telemetry(tracing=False, metrics=False)
"""Reports nothing (for tests and for backends given without a manager)."""


def _run_attributes(run_id: str, workflow: str, version: str, attempt: int) -> dict[str, str | int]:
    """What an attempt's span and its steps' spans say of the run."""
    return {
        "sonamu_tasks.run_id": run_id,
        "sonamu_tasks.workflow": workflow,
        "sonamu_tasks.version": version,
        "sonamu_tasks.attempt": attempt,
    }


def _recording() -> bool:
    """Whether this process has set a tracer provider (until it does, the API's is a proxy that records
    nothing). Asked at each attempt: a provider set after the manager started counts from the next one."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


@contextlib.contextmanager
def _attached(parent: Any) -> Iterator[None]:
    """`parent` (an extracted trace context) as the current context, while the block runs."""
    token = otel_context.attach(parent)
    try:
        yield None
    finally:
        otel_context.detach(token)


def serve_metrics(port: int, host: str = "127.0.0.1") -> Callable[[], None]:
    """Serve this process's metrics at http://host:port/metrics (a thread of prometheus_client's); returns
    the function that stops it."""
    if prometheus_client is None:
        raise RuntimeError("metrics need prometheus_client: pip install 'sonamu-tasks[metrics]'")
    server, thread = prometheus_client.start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def metrics_available() -> bool:
    return prometheus_client is not None


def metrics_text() -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format, and its content type (for the dashboard)."""
    if prometheus_client is None:
        raise RuntimeError("metrics need prometheus_client: pip install 'sonamu-tasks[metrics]'")
    return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
