"""OpenTelemetry spans joined to the caller's trace through the database, and Prometheus metrics after known
runs, on every backend (see BACKENDS). Uses the SDK's in-memory exporter and prometheus_client's registry."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from sonamu_tasks import BackendUnavailable, RetryPolicy, WorkflowFailed, WorkflowManager, workflow
from sonamu_tasks.backends.base import NewRun
from sonamu_tasks.ids import new_run_id
from sonamu_tasks.telemetry import OTHER_STEPS, STEP_LABELS_PER_WORKFLOW, metrics_text, step_label

from .conftest import wait_until
from .test_processes import client, start_worker  # noqa: F401 - fixtures

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> Iterator[None]:
    # The global provider can be set once per process: this module's, for the whole session.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    yield


@pytest.fixture
def spans() -> InMemorySpanExporter:
    _EXPORTER.clear()
    return _EXPORTER


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def test_an_attempt_joins_the_callers_trace_through_the_database(
    make_config: Any, spans: InMemorySpanExporter
) -> None:
    async def charge(amount: int) -> int:
        return amount

    async def breaks() -> None:
        raise ValueError("card declined")

    @workflow(version="1", name=unique("traced"), retry_policy=RetryPolicy(max_attempts=1))
    async def traced(input: Any, step: Any) -> Any:
        await step.define("charge", charge).run(input)
        if input < 0:
            await step.define("refund", breaks).run()
        return input

    # The caller has no worker: the run is executed by another manager, which finds the trace in the run.
    async with (
        WorkflowManager(make_config(enable_worker=False)) as caller,
        WorkflowManager(make_config(), workflows=[traced]),
    ):
        tracer = trace.get_tracer("the-callers-web-app")
        with tracer.start_as_current_span("POST /orders") as request:
            handle = await caller.run({"name": traced.name, "version": "1"}, 5)
            failing = await caller.run({"name": traced.name, "version": "1"}, -1)
        assert await handle.result(timeout=15) == 5
        with pytest.raises(WorkflowFailed):
            await failing.result(timeout=15)

    finished = spans.get_finished_spans()
    attempts = [s for s in finished if s.name == f"workflow {traced.name}"]
    assert len(attempts) == 2
    caller_trace = request.get_span_context().trace_id
    for span in attempts:
        assert span.context.trace_id == caller_trace  # joined the caller's trace
        assert span.parent is not None and span.parent.span_id == request.get_span_context().span_id
    by_run = {span.attributes["sonamu_tasks.run_id"]: span for span in attempts}
    assert by_run[handle.id].attributes["sonamu_tasks.outcome"] == "completed"
    assert by_run[failing.id].attributes["sonamu_tasks.outcome"] == "failed"
    assert by_run[handle.id].attributes["sonamu_tasks.workflow"] == traced.name
    steps = {(s.name, s.parent.span_id if s.parent else None) for s in finished if s.name.startswith("step ")}
    assert ("step charge", by_run[handle.id].context.span_id) in steps
    refund = next(s for s in finished if s.name == "step refund")
    assert refund.events and refund.events[0].name == "exception"  # the error is recorded on the step span
    assert refund.attributes is not None
    assert (refund.attributes["sonamu_tasks.version"], refund.attributes["sonamu_tasks.attempt"]) == ("1", 1)
    # ... and on the attempt's span, with its status
    failed = by_run[failing.id]
    assert [event.name for event in failed.events] == ["exception"]
    assert failed.events[0].attributes is not None
    assert failed.events[0].attributes["exception.message"] == "card declined"
    assert failed.status.description == "ValueError: card declined"


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_metrics_count_known_runs_steps_and_the_backlog(manager_for: Any, make_config: Any) -> None:
    name = unique("metered")

    async def work(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    @workflow(version="1", name=name, retry_policy=RetryPolicy(max_attempts=1))
    async def metered(input: Any, step: Any) -> Any:
        return await step.map("work", work, [input, input])

    manager = await manager_for([metered])
    for value in (1, 2, 3, -1):
        with contextlib.suppress(WorkflowFailed):
            await (await manager.run(metered, value)).result(timeout=15)
    assert metric("sonamu_tasks_runs_started_total", workflow=name) == 4
    assert metric("sonamu_tasks_runs_completed_total", workflow=name) == 3
    assert metric("sonamu_tasks_runs_failed_total", workflow=name) == 1
    assert metric("sonamu_tasks_attempts_total", workflow=name, outcome="failed") == 1
    # step.map's items share one label: "work[]"
    assert metric("sonamu_tasks_step_duration_seconds_count", workflow=name, step="work[]", outcome="completed") == 6

    # Runs of a version no worker serves wait: the backlog gauge shows them.
    other = unique("unserved")
    for _ in range(3):
        await manager.run({"name": other, "version": "1"}, None)

    def backlog() -> bool:
        return metric("sonamu_tasks_backlog", queue="default", workflow=other, version="1") == 3

    await wait_until(backlog, timeout=20, what="the backlog gauge")
    assert metric("sonamu_tasks_backlog_oldest_seconds", queue="default", workflow=other, version="1") >= 0


async def test_a_run_taken_over_once_counts_one_take_over_however_often_it_sleeps_after(manager_for: Any) -> None:
    name = unique("taken_once")

    @workflow(version="1", name=name)
    async def naps(step: Any) -> str:
        for n in range(3):
            await step.sleep(f"nap-{n}", "50ms")
        return "rested"

    starter = await manager_for([], enable_worker=False)
    run_id, _ = await starter.backend.create_run(NewRun(new_run_id(), name, "1", "null"))
    (held,) = await starter.backend.claim_runs("dead-worker", [(name, "1")], 1, timedelta(milliseconds=100))
    await wait_until(lambda: datetime.now(UTC) > held.claimed_at + timedelta(milliseconds=150), what="the lease")

    manager = await manager_for([naps])
    assert await manager.handle(run_id).result(timeout=15) == "rested"  # taken over, then three wakes
    assert (await manager.handle(run_id).info()).recoveries == 1
    assert metric("sonamu_tasks_take_overs_total", workflow=name) == 1


async def test_the_backlog_gauge_reads_0_once_the_backlog_empties(manager_for: Any) -> None:
    """A queue whose backlog emptied reads 0, not "no data" (the series used to vanish: a panel showed a gap and
    an alert on it saw nothing)."""
    manager = await manager_for([])
    other = unique("emptied")
    handle = await manager.run({"name": other, "version": "1"}, None)
    labels = {"queue": "default", "workflow": other, "version": "1"}
    await wait_until(lambda: REGISTRY.get_sample_value("sonamu_tasks_backlog", labels) == 1, what="a backlog of 1")
    await manager.cancel(handle.id)
    await wait_until(lambda: REGISTRY.get_sample_value("sonamu_tasks_backlog", labels) == 0, what="a backlog of 0")
    assert REGISTRY.get_sample_value("sonamu_tasks_backlog_oldest_seconds", labels) == 0


def test_the_grafana_dashboard_takes_the_max_of_the_database_wide_backlog_gauges() -> None:
    """Every process reports the whole database's backlog: a sum over processes counted it once per process."""
    path = Path(__file__).parent.parent / "docs" / "operations" / "grafana-dashboard.json"
    exprs = [t["expr"] for panel in json.loads(path.read_text())["panels"] for t in panel.get("targets", [])]
    uses = [e for e in exprs if "sonamu_tasks_backlog" in e]
    assert uses
    for expr in uses:
        bare = re.sub(r"max by \([^)]*\) \(sonamu_tasks_backlog(_oldest_seconds)?\)", "", expr)
        assert "sonamu_tasks_backlog" not in bare, f"{expr}: not first the max over processes"


STEP_SECONDS = "sonamu_tasks_step_duration_seconds"


def word(number: int) -> str:
    """A number spelled in letters ("17" -> "bh"): an id the step label cannot tell from a word."""
    return "".join(chr(ord("a") + int(digit)) for digit in str(number))


def test_the_step_label_leaves_out_indexes_numbers_and_uuids_and_keeps_names() -> None:
    assert step_label("charge[17]") == "charge[]" and step_label("a[1]b[2]") == "a[]b[]"
    assert step_label("charge[alice@example.com]") == "charge[]"
    assert step_label("charge-17") == step_label("charge-18") == "charge-#"
    assert step_label("refund-01a234d2-1354-8c2a-b322-e2e91b20b2a6") == "refund-#"
    assert step_label("blob 3f2a9c0d1e2b3a4c5d6e") == "blob #" and step_label("report-2024-01-05") == "report-#-#-#"
    for kept in ("charge", "step2", "v2-load", "sha256", "sendWelcomeEmail2", "charge-alice"):
        assert step_label(kept) == kept


async def test_steps_named_after_ids_keep_a_bounded_number_of_series_and_warn_once(
    manager_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker keeps every series it reports for as long as it lives: step names carrying ids (the loop
    advice of the steps guide) must not add one each, run after run."""
    name = unique("ledger")

    async def noop() -> None:
        return None

    @workflow(version="1", name=name)
    async def ledger(input: int, step: Any) -> None:
        await step.define(f"charge-{input}", noop).run()  # numbers and UUIDs are left out: one label each
        await step.define(f"refund-{uuid.UUID(int=input)}", noop).run()
        await step.define(f"audit[{word(input)}]", noop).run()
        for item in range(6):  # ids the label keeps: 120 names, past the limit of 100 labels per workflow
            await step.define(f"notify-{word(input * 6 + item)}", noop).run()

    manager = await manager_for([ledger])
    caplog.set_level("WARNING", logger="sonamu_tasks.telemetry")
    for batch in range(20):
        await (await manager.run(ledger, batch)).result(timeout=15)

    # What a scrape of the worker reads.
    [family] = [f for f in text_string_to_metric_families(metrics_text()[0].decode()) if f.name == STEP_SECONDS]
    counts = {
        sample.labels["step"]: sample.value
        for sample in family.samples
        if sample.name == STEP_SECONDS + "_count" and sample.labels["workflow"] == name
    }
    assert len(counts) == STEP_LABELS_PER_WORKFLOW + 1  # 100 labels and "(other)", of 123 distinct labels
    assert counts["charge-#"] == counts["refund-#"] == counts["audit[]"] == 20
    assert counts[OTHER_STEPS] == 23 and sum(counts.values()) == 20 * 9  # every step counted, once
    warnings = [r.getMessage() for r in caplog.records if r.name == "sonamu_tasks.telemetry" and name in r.getMessage()]
    assert len(warnings) == 1 and "square brackets" in warnings[0] and 'step="(other)"' in warnings[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_worker_serves_metrics_on_its_port(manager_for: Any) -> None:
    port = free_port()
    await manager_for([], metrics_port=port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "sonamu_tasks_claim_duration_seconds" in body


def test_worker_metrics_port_from_the_command_line(tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "metrics_config.py").write_text(
        "from sonamu_tasks import define_config\n"
        f"config = define_config(database_url='sqlite:///{tmp_path}/db.sqlite', "
        "tasks={'worker_options': {'concurrency': 1}})\n"
    )
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "sonamu_tasks", "--config", "metrics_config:config", "worker"]
    worker = subprocess.Popen([*command, "--metrics-port", str(port)], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    assert b"sonamu_tasks_claim_duration_seconds" in response.read()
                    break
            except OSError:
                assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
                assert time.monotonic() < deadline, "the worker never served its metrics"
                time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


async def test_a_worker_process_continues_the_callers_trace(
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
    tmp_path: Any,
) -> None:
    """The caller (this process) starts a run inside a span; a real worker process executes it, and its
    spans (written to a file by that process's own exporter) belong to the caller's trace."""
    import json

    spans_file = tmp_path / "spans.jsonl"
    start_worker("traced", lease_ms=1000, spans_file=str(spans_file))
    (tmp_path / "release").touch()  # three_steps' second step waits for this file
    tracer = trace.get_tracer("the-caller")
    with tracer.start_as_current_span("POST /orders") as request:
        handle = await client.run({"name": "three_steps", "version": "1"}, {"dir": str(tmp_path)})
    await handle.result(timeout=30)

    def attempt_span() -> Any:
        lines = spans_file.read_text().splitlines() if spans_file.exists() else []
        spans = [json.loads(line) for line in lines]
        return next((s for s in spans if s["name"] == "workflow three_steps"), None), spans

    await wait_until(lambda: attempt_span()[0], what="the worker's attempt span")
    attempt, spans = attempt_span()
    assert attempt["trace_id"] == request.get_span_context().trace_id
    assert attempt["parent_span_id"] == request.get_span_context().span_id
    assert attempt["attributes"]["sonamu_tasks.run_id"] == handle.id
    assert {s["name"] for s in spans} >= {"step one", "step two", "step three"}


async def test_without_a_tracer_provider_no_span_is_made_and_children_still_join_the_callers_trace(
    make_config: Any, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process that never set a provider: OpenTelemetry's proxy would hand out spans that record
    nothing, so the engine makes none, yet a child started by a step still carries the caller's trace."""

    async def trace_id_here() -> int:
        return trace.get_current_span().get_span_context().trace_id

    @workflow(version="1", name=unique("child"))
    async def child(step: Any) -> int:
        return int(await step.define("where", trace_id_here).run())

    @workflow(version="1", name=unique("parent"))
    async def parent(step: Any) -> int:
        handle = await step.start_workflow("child", child)
        return int(await handle.result())

    async with (
        WorkflowManager(make_config(enable_worker=False)) as caller,
        WorkflowManager(make_config(), workflows=[parent, child]),
    ):
        tracer = trace.get_tracer("the-callers-web-app")  # the caller's own spans are recorded
        monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)  # for the engine: never set
        with tracer.start_as_current_span("POST /orders") as request:
            handle = await caller.run({"name": parent.name, "version": "1"})
        assert await handle.result(timeout=15) == request.get_span_context().trace_id
    assert not [s for s in spans.get_finished_spans() if s.name.startswith(("workflow ", "step "))]


async def test_a_child_started_by_a_step_continues_its_parents_trace(
    make_config: Any, spans: InMemorySpanExporter
) -> None:
    @workflow(version="1", name=unique("child"))
    async def child(input: Any) -> Any:
        return input

    @workflow(version="1", name=unique("parent"))
    async def parent(step: Any) -> Any:
        return await (await step.start_workflow("child", child, 3)).result()

    async with (
        WorkflowManager(make_config(enable_worker=False)) as caller,
        WorkflowManager(make_config(), workflows=[parent, child]),
    ):
        with trace.get_tracer("the-callers-web-app").start_as_current_span("POST /orders") as request:
            handle = await caller.run({"name": parent.name, "version": "1"})
        assert await handle.result(timeout=15) == 3
    finished = spans.get_finished_spans()
    parents = [s for s in finished if s.name == f"workflow {parent.name}"]
    children = [s for s in finished if s.name == f"workflow {child.name}"]
    assert parents and children
    assert {s.context.trace_id for s in parents + children} == {request.get_span_context().trace_id}
    parent_spans = {s.context.span_id for s in parents}
    assert all(s.parent is not None and s.parent.span_id in parent_spans for s in children)


async def test_a_worker_leaves_its_backlog_gauges_out_while_it_cannot_read_the_backlog(
    manager_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During an outage the gauges stopped where they were, read as current by every scrape."""
    monkeypatch.setattr("sonamu_tasks.worker.BACKLOG_EVERY_S", 0.1)
    manager = await manager_for([])
    other = unique("unread")
    await manager.run({"name": other, "version": "1"}, None)
    labels = {"queue": "default", "workflow": other, "version": "1"}
    await wait_until(lambda: REGISTRY.get_sample_value("sonamu_tasks_backlog", labels) == 1, what="a backlog of 1")

    async def down() -> Any:
        raise BackendUnavailable("the database is down")

    manager.backend.due_backlog = down  # type: ignore[method-assign]
    await wait_until(
        lambda: REGISTRY.get_sample_value("sonamu_tasks_backlog", labels) is None, timeout=20, what="no backlog gauge"
    )
