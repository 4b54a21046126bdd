"""A real worker process: `python -m tests.support.worker_process`, configured by environment variables."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from sonamu_tasks import WorkflowManager, define_config
from tests.support import process_workflows


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    worker_options = {
        "concurrency": int(os.environ.get("SONAMU_TEST_CONCURRENCY", "2")),
        "listen_delay": float(os.environ.get("SONAMU_TEST_LISTEN_DELAY", "0")),
        "lease_ms": float(os.environ.get("SONAMU_TEST_LEASE_MS", "1000")),
        "shutdown_grace_ms": float(os.environ.get("SONAMU_TEST_GRACE_MS", "10000")),
    }
    if "SONAMU_TEST_POLL_MS" in os.environ:
        worker_options["poll_interval_ms"] = float(os.environ["SONAMU_TEST_POLL_MS"])
    if "SONAMU_TEST_BLOCKED_LOOP_LIMIT_MS" in os.environ:
        worker_options["blocked_loop_limit_ms"] = float(os.environ["SONAMU_TEST_BLOCKED_LOOP_LIMIT_MS"])
    config = define_config(
        database_url=os.environ["SONAMU_TEST_URL"],
        schema=os.environ["SONAMU_TEST_SCHEMA"],
        tasks={"worker_options": worker_options},
    )
    if "SONAMU_TEST_SPANS_FILE" in os.environ:
        record_spans(os.environ["SONAMU_TEST_SPANS_FILE"])
    names = os.environ.get("SONAMU_TEST_WORKFLOWS", "three_steps").split(",")
    workflows = [getattr(process_workflows, name) for name in names]
    asyncio.run(WorkflowManager(config, workflows=workflows).serve())


def record_spans(path: str) -> None:
    """Write every finished span to `path`, one JSON line each (what a test of cross-process traces reads)."""
    import json

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class LinesExporter(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            with open(path, "a") as out:
                for span in spans:  # type: ignore[attr-defined]
                    parent = span.parent.span_id if span.parent else None
                    line = {"name": span.name, "trace_id": span.context.trace_id, "parent_span_id": parent}
                    out.write(json.dumps({**line, "attributes": dict(span.attributes)}) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(LinesExporter()))
    trace.set_tracer_provider(provider)


if __name__ == "__main__":
    main()
