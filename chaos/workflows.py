"""Workflows run by the chaos workers.

Every call step first appends one row (scenario, run_id, step, pid, at = clock_timestamp()) to the audit
table `public.chaos_audit`, in its own autocommitted statement, before doing its work. So each row is one
*start of an execution* of that step, and re-executions are countable against the step's checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import psycopg
from pydantic import BaseModel

from sonamu_tasks import Queue, RetryPolicy, Schedule, workflow

AUDIT_DDL = (
    "CREATE TABLE IF NOT EXISTS public.chaos_audit ("
    " scenario text NOT NULL, run_id uuid NOT NULL, step text NOT NULL, pid integer NOT NULL,"
    " at timestamptz NOT NULL DEFAULT clock_timestamp())"
)

_conn: psycopg.AsyncConnection[Any] | None = None
_lock: asyncio.Lock | None = None

# Retries absorb a step whose audit insert failed because PostgreSQL was restarting.
RETRY = RetryPolicy(max_attempts=30, initial_interval_ms=100)


def _audit_url() -> str:
    """The runner's own cluster (a failover scenario kills the one the engine uses), or the engine's."""
    return os.environ.get("CHAOS_AUDIT_URL") or os.environ["CHAOS_URL"]


async def audit(run_id: str, step: str) -> None:
    global _conn, _lock
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        try:
            if _conn is None or _conn.closed:
                _conn = await psycopg.AsyncConnection.connect(
                    _audit_url(), autocommit=True, application_name="chaos_audit"
                )
            await _conn.execute(
                "INSERT INTO public.chaos_audit (scenario, run_id, step, pid) VALUES (%s, %s, %s, %s)",
                [os.environ["CHAOS_SCHEMA"], run_id, step, os.getpid()],
            )
        except Exception:
            if _conn is not None:
                await _conn.close()
            _conn = None
            raise


async def work(run_id: str, step: str, work_ms: float) -> str:
    await audit(run_id, step)
    await asyncio.sleep(work_ms / 1000)
    return step


@workflow(version="1", retry_policy=RETRY)
async def chain(input: Any, step: Any, context: Any) -> int:
    """`steps` call steps of `work_ms` each."""
    for index in range(int(input["steps"])):
        await step.define(f"s{index}", work).run(context["run_id"], f"s{index}", float(input.get("work_ms", 0)))
    return int(input["steps"])


@workflow(version="1", retry_policy=RETRY)
async def sleeper(input: Any, step: Any, context: Any) -> str:
    await step.define("before", work).run(context["run_id"], "before", 0)
    await step.sleep("nap", f"{int(input['sleep_ms'])}ms")
    await step.define("after", work).run(context["run_id"], "after", 0)
    return "awake"


@workflow(version="1", schedules=[Schedule("* * * * * *", name="every-second")])
async def ticker(input: Any) -> Any:
    return input


def not_json() -> Any:
    return object()


@workflow(version="1")
async def returns_not_json(input: Any, step: Any) -> Any:
    return await step.define("bad-output-step", not_json).run()


class Order(BaseModel):
    quantity: int
    sku: str


@workflow(version="1", schema=Order)
async def typed(input: Any) -> Any:
    return input


NASTY = "x'; DROP TABLE runs; --"


async def nasty_step(run_id: str) -> str:
    await audit(run_id, NASTY)
    return NASTY


async def _nasty(input: Any, step: Any, context: Any) -> str:
    return str(await step.define(NASTY, nasty_step).run(context["run_id"]))


nasty = workflow(_nasty, version="1\"'", name=NASTY)


# --- values the database cannot hold (the bad_input scenario): each fails its own run, once -------------

# Enough for these to fail at the first attempt that can fail, but never to take the 30 of RETRY.
ONE_RETRY = RetryPolicy(max_attempts=2, initial_interval_ms=50)
# 10,240 characters that do not compress: PostgreSQL's index row limit is about 2,700 bytes.
HUGE_NAME = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(160))


async def nul_text() -> str:
    return "a\x00b"


async def nul_error() -> None:
    raise ValueError("card\x00declined")


@workflow(version="1", retry_policy=ONE_RETRY)
async def far_sleeper(input: Any, step: Any, context: Any) -> None:
    """Sleeps 9000 years: refused by step.sleep, the run fails at once."""
    await step.define("before", work).run(context["run_id"], "before", 0)
    await step.sleep("nap", "9000y")


@workflow(version="1", retry_policy=ONE_RETRY)
async def returns_nul(input: Any, step: Any, context: Any) -> None:
    """A step result holding NUL, which jsonb cannot store: the run fails naming the step, at once."""
    await step.define("fine", work).run(context["run_id"], "fine", 0)
    await step.define("nul", nul_text).run()


@workflow(version="1", retry_policy=ONE_RETRY)
async def huge_step_name(input: Any, step: Any) -> None:
    """A 10 kB step name: refused before the database, the run fails at once."""
    await step.define(HUGE_NAME, nul_text).run()


@workflow(version="1", retry_policy=ONE_RETRY)
async def raises_nul(input: Any, step: Any) -> None:
    """An error whose message holds NUL: recorded escaped; the run fails after its retries, no take-overs."""
    await step.define("charge", nul_error).run()


# --- the composition scenario (chaos/composition.py) ------------------------------------------------------


@workflow(version="1", retry_policy=RETRY)
async def comp_child(input: Any, step: Any, context: Any) -> int:
    """A child of comp_parent: two gathered steps, then a third; returns 3 * `value`. Its input names the
    parent run and the parent's step (`parent`, `key`), so a second child doing the same job is visible."""
    run_id, work_ms = context["run_id"], float(input.get("work_ms", 0))
    await asyncio.gather(*(step.define(f"c{i}", work).run(run_id, f"c{i}", work_ms) for i in range(2)))
    await step.define("c2", work).run(run_id, "c2", work_ms)
    return 3 * int(input["value"])


@workflow(version="1", retry_policy=RETRY)
async def comp_parent(input: Any, step: Any, context: Any) -> int:
    """Three steps gathered with a child started and awaited in the same gather (`inline`); one child by
    start_workflow (`solo`) and `fan` by start_workflows (`fan[i]`), all awaited together; a last step.
    Returns the sum of the children's outputs: 3 * (1 + 2 + sum(10 + i for i < fan))."""
    run_id, work_ms, fan = context["run_id"], float(input.get("work_ms", 0)), int(input["fan"])

    def kid(key: str, value: int) -> dict[str, Any]:
        return {"parent": run_id, "key": key, "value": value, "work_ms": work_ms}

    *_, inline = await asyncio.gather(
        *(step.define(f"g{i}", work).run(run_id, f"g{i}", work_ms) for i in range(3)),
        step.run_workflow("inline", comp_child, kid("inline", 1)),
    )
    solo = await step.start_workflow("solo", comp_child, kid("solo", 2))
    fanned = await step.start_workflows("fan", comp_child, [kid(f"fan[{i}]", 10 + i) for i in range(fan)])
    results = await asyncio.gather(solo.result(), *(child.result() for child in fanned))
    await step.define("tail", work).run(run_id, "tail", work_ms)
    return int(inline) + sum(int(r) for r in results)


# --- the messages scenario (chaos/messages.py) ------------------------------------------------------------

# What each audit step of msg_collector saw: one row per execution (a re-executed step writes another row).
RECEIVED_DDL = (
    "CREATE TABLE IF NOT EXISTS public.chaos_received ("
    " scenario text NOT NULL, run_id uuid NOT NULL, step text NOT NULL, message jsonb, pid integer NOT NULL,"
    " at timestamptz NOT NULL DEFAULT clock_timestamp())"
)


async def record_message(run_id: str, step: str, message: Any, work_ms: float) -> bool:
    """An audited step (a chaos_audit row first, as `work`) that stores the message the receive before it
    returned in public.chaos_received, then works `work_ms`."""
    from psycopg.types.json import Jsonb

    global _conn
    await audit(run_id, step)
    assert _lock is not None  # made by audit()
    async with _lock:
        try:
            if _conn is None or _conn.closed:
                _conn = await psycopg.AsyncConnection.connect(
                    _audit_url(), autocommit=True, application_name="chaos_audit"
                )
            await _conn.execute(
                "INSERT INTO public.chaos_received (scenario, run_id, step, message, pid) VALUES (%s, %s, %s, %s, %s)",
                [os.environ["CHAOS_SCHEMA"], run_id, step, Jsonb(message), os.getpid()],
            )
        except Exception:
            if _conn is not None:
                await _conn.close()
            _conn = None
            raise
    await asyncio.sleep(work_ms / 1000)
    return True


@workflow(version="1", retry_policy=RETRY)
async def msg_collector(input: Any, step: Any, context: Any) -> list[Any]:
    """Receives `messages` messages on topic "t", each followed by an audited step that records it, then one
    on topic "u" (sent at any point among the others: it waits unconsumed until then). Returns them in order."""
    run_id, work_ms = context["run_id"], float(input.get("work_ms", 0))
    got = []
    for index in range(int(input["messages"])):
        message = await step.receive(f"r{index}", topic="t")
        await step.define(f"a{index}", record_message).run(run_id, f"a{index}", message, work_ms)
        got.append(message)
    got.append(await step.receive("last", topic="u"))
    return got


# --- the queues scenario (chaos/queues.py) ----------------------------------------------------------------

# A fleet-wide limit below the fleet's slots (3 workers x 6), one run at a time per key, a start rate.
CAPPED = Queue("chaos_capped", concurrency=5)
KEYED = Queue("chaos_keyed", per_key_concurrency=1)
RATED = Queue("chaos_rated", rate_limit="20/1s")


def _span(kind: str, run_id: str, step: str, queue: str, key: str | None) -> None:
    """One line of `$CHAOS_SPANS`: `kind pid wall-clock run step queue key`, in one O_APPEND write (whole
    lines from every process; a kill -9 loses nothing written, the page cache outlives the process)."""
    line = f"{kind} {os.getpid()} {time.time():.6f} {run_id} {step} {queue} {key or '-'}\n"
    fd = os.open(os.environ["CHAOS_SPANS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def timed_work(run_id: str, step: str, queue: str, key: str | None, work_ms: float) -> str:
    """An audited step (a chaos_audit row, as `work`) that also writes its start and its end to the spans
    file: `end` when it finished, `stopped` when it raised or was cancelled (a lost lease); a process killed
    inside it writes no end."""
    _span("start", run_id, step, queue, key)
    outcome = "stopped"
    try:
        await audit(run_id, step)
        await asyncio.sleep(work_ms / 1000)
        outcome = "end"
    finally:
        _span(outcome, run_id, step, queue, key)
    return step


async def _timed_steps(input: Any, step: Any, context: Any, queue: str) -> int:
    run_id, key, work_ms = context["run_id"], input.get("key"), float(input.get("work_ms", 0))
    for index in range(int(input["steps"])):
        await step.define(f"s{index}", timed_work).run(run_id, f"s{index}", queue, key, work_ms)
    return int(input["steps"])


@workflow(version="1", queue=CAPPED, retry_policy=RETRY)
async def q_capped(input: Any, step: Any, context: Any) -> int:
    """`steps` timed steps in a queue letting 5 runs execute at once across the fleet."""
    return await _timed_steps(input, step, context, CAPPED.name)


@workflow(version="1", queue=KEYED, retry_policy=RETRY)
async def q_keyed(input: Any, step: Any, context: Any) -> int:
    """`steps` timed steps, one run at a time per concurrency key (the key is in the input too)."""
    return await _timed_steps(input, step, context, KEYED.name)


@workflow(version="1", queue=RATED, retry_policy=RETRY)
async def q_rated(input: Any, step: Any, context: Any) -> int:
    """`steps` timed steps in a queue starting at most 20 runs in any second."""
    return await _timed_steps(input, step, context, RATED.name)
