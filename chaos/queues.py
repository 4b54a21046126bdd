"""The `queues` chaos scenario: queue limits under kill -9.

Three workers (lease 1 s, concurrency 6: 18 slots) serve three queues (chaos/workflows.py):

* `chaos_capped`, `concurrency=5`: `q_capped` runs, two 40 ms steps, priorities 0-2;
* `chaos_keyed`, `per_key_concurrency=1`: `q_keyed` runs, two 30 ms steps, over 36 keys (24 short);
* `chaos_rated`, `rate_limit="20/1s"`: `q_rated` runs, one 10 ms step, started in two bursts so the limit
  holds a backlog back.

A producer (this process, a manager without a worker) starts the runs in waves over a few seconds, one by
one and with `run_many`, while every 0.4-1.5 s a random worker gets `kill -9` and is restarted at once, until
every run has finished. Each timed step writes its start and its end (wall clock, pid, run, key) to a spans
file, besides its `chaos_audit` row.

Counted with the runner's rules (`runner.tally`), plus:

* stuck: a run not finished when the workers have settled (its status, `key_parked` and lease are shown);
* the limits, from the spans: the most steps executing at once in `chaos_capped` (<= 5) and per key of
  `chaos_keyed` (<= 1). A step a killed worker never finished holds its run's slot until the run's lease
  expires, so its span lasts until then: the lease (`runs.available_at`) read from the database right after
  the kill (the process can no longer extend it), or kill time + lease_ms when the run was not found there.
  The same count with every such span lasting until kill time + lease_ms (an upper bound: the lease was
  last renewed before the kill) is printed too;
* the rate: the most runs of `chaos_rated` whose `runs.started_at` lie in any window of one second
  (`(t - 1 s, t]`, the claim's own window) must be <= 20.

The seed is `CHAOS_QUEUES_SEED` (default 14): it picks the victims, the pauses and the plan of runs.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sonamu_tasks import WorkflowManager

from . import workflows
from .runner import FINAL, Context, Summary, status_counts, tally

LEASE_MS = 1000
SLOTS = 6  # per worker
WORKERS = 3
CAPPED = workflows.CAPPED
KEYED = workflows.KEYED
RATED = workflows.RATED


@dataclass
class Kill:
    pid: int
    at: float  # wall clock, after the process was reaped
    leases: dict[str, float]  # run id -> lease expiry (wall clock) of the runs it held, read after the kill


@dataclass
class Span:
    pid: int
    start: float
    end: float | None
    outcome: str  # "end", "stopped" (raised or cancelled), "killed" (no end line)
    run_id: str
    step: str
    queue: str
    key: str


def plan_runs(rng: random.Random, short: bool) -> tuple[list[tuple[Any, dict[str, Any], int]], list[dict[str, Any]]]:
    """The capped and keyed runs to start in waves, as (workflow, input, priority), in random order; and the
    rated runs."""
    capped = 60 if short else 400
    keys = [f"k{i:02d}" for i in range(24 if short else 36)]
    per_key = 5 if short else 20
    rated = 60 if short else 300
    runs: list[tuple[Any, dict[str, Any], int]] = [
        (workflows.q_capped, {"steps": 2, "work_ms": 40}, rng.choice([0, 0, 1, 2])) for _ in range(capped)
    ]
    runs += [(workflows.q_keyed, {"steps": 2, "work_ms": 30, "key": key}, 0) for key in keys for _ in range(per_key)]
    rng.shuffle(runs)
    return runs, [{"steps": 1, "work_ms": 10} for _ in range(rated)]


async def produce(
    ctx: Context, schema: str, runs: list[tuple[Any, dict[str, Any], int]], rated: list[dict[str, Any]], seconds: float
) -> list[str]:
    """Start every run: the rated ones in two bursts (at once and half-way), the others in waves every
    0.1 s, even waves one run() each, odd waves one run_many per (workflow, priority)."""
    ids: list[str] = []
    chosen = [workflows.q_capped, workflows.q_keyed, workflows.q_rated]
    waves = max(1, int(seconds / 0.1))
    size = -(-len(runs) // waves)
    half = len(rated) // 2
    async with WorkflowManager(ctx.config(schema), workflows=chosen) as client:
        handles = await client.run_many(workflows.q_rated, rated[:half])
        ids += [h.id for h in handles]
        for wave in range(waves):
            if wave == waves // 2:
                handles = await client.run_many(workflows.q_rated, rated[half:])
                ids += [h.id for h in handles]
            batch = runs[wave * size : (wave + 1) * size]
            if wave % 2 == 0:
                for workflow, input, priority in batch:
                    handle = await client.run(workflow, input, priority=priority, concurrency_key=input.get("key"))
                    ids.append(handle.id)
            else:
                groups: dict[tuple[str, int], list[tuple[Any, dict[str, Any]]]] = {}
                for workflow, input, priority in batch:
                    groups.setdefault((workflow.name, priority), []).append((workflow, input))
                for (_, priority), items in groups.items():
                    inputs = [input for _, input in items]
                    handles = await client.run_many(
                        items[0][0], inputs, priority=priority, concurrency_keys=[i.get("key") for i in inputs]
                    )
                    ids += [h.id for h in handles]
            await asyncio.sleep(0.1)
    return ids


async def queues(ctx: Context, summary: Summary) -> None:
    seed = int(os.environ.get("CHAOS_QUEUES_SEED", "14"))
    rng = random.Random(seed)
    schema = ctx.schema_for("queues")
    spans_path = ctx.log_dir / f"{schema}-spans.log"
    chosen = [workflows.q_capped, workflows.q_keyed, workflows.q_rated]
    async with WorkflowManager(ctx.config(schema), workflows=chosen):
        pass  # migrate and store the queues before any worker or run
    runs, rated = plan_runs(rng, ctx.short)
    expected = len(runs) + len(rated)
    names = ",".join(w.name for w in chosen)
    workers = [
        ctx.worker(schema, f"w{i}", workflows_=names, lease_ms=LEASE_MS, concurrency=SLOTS, spans=spans_path)
        for i in range(WORKERS)
    ]
    producer = asyncio.create_task(produce(ctx, schema, runs, rated, 2.0 if ctx.short else 8.0))
    kills: list[Kill] = []
    deadline = time.monotonic() + (90 if ctx.short else 600)
    finished = False
    while time.monotonic() < deadline:
        if producer.done() and producer.exception() is not None:
            break  # raised below, by the await
        counts = await asyncio.to_thread(status_counts, ctx, schema)
        if producer.done() and sum(counts[s] for s in FINAL) >= expected:
            finished = True
            break
        await asyncio.sleep(rng.uniform(0.4, 1.5))
        victim = rng.choice(workers)
        kills.append(await kill(ctx, schema, victim))
    ids = await producer
    # The last kill's runs are taken over after their lease: let them finish without more kills.
    settle = time.monotonic() + 60
    while not finished and time.monotonic() < settle:
        counts = await asyncio.to_thread(status_counts, ctx, schema)
        finished = sum(counts[s] for s in FINAL) >= expected
        await asyncio.sleep(0.5)
    summary.details.append(
        f"seed {seed}; {WORKERS} workers x {SLOTS} slots, lease {LEASE_MS} ms; kill -9 sent: {len(kills)};"
        f" runs by status: {dict(status_counts(ctx, schema))}"
    )
    if len(ids) != expected:
        summary.problems.append(f"the producer started {len(ids)} runs of {expected}")
    stuck(ctx, summary, schema)
    await queue_state(ctx, summary, schema)
    taken = ctx.query(
        f'SELECT queue, count(*) FILTER (WHERE recoveries > 0), sum(recoveries), count(*) FROM "{schema}".runs'
        " GROUP BY 1 ORDER BY 1"
    )
    summary.details.append(
        "runs (taken over after a kill, take-overs) by queue: "
        + ", ".join(f"{q} {n} ({t}, {r})" for q, t, r, n in taken)
    )
    check_limits(summary, read_spans(spans_path), kills)
    check_rate(ctx, summary, schema)
    worker_logs(ctx, summary, schema)
    tally(ctx, summary, schema, ids, {k.pid for k in kills})  # last: its details can be many (20 are printed)


async def kill(ctx: Context, schema: str, victim: Any) -> Kill:
    pid = victim.pid
    victim.kill()
    at = time.time()
    await asyncio.sleep(0.1)  # a heartbeat the process sent just before dying commits now, or never
    rows = await asyncio.to_thread(
        ctx.query,
        f"SELECT id::text, available_at FROM \"{schema}\".runs WHERE status = 'running' AND worker_id LIKE %s",
        [f"%:{pid}:%"],
    )
    victim.start()
    return Kill(pid, at, {str(run_id): expiry.timestamp() for run_id, expiry in rows})


def worker_logs(ctx: Context, summary: Summary, schema: str) -> None:
    """What the workers logged about their claims and leases: a claim chosen as a deadlock victim waited
    PostgreSQL's deadlock_timeout (1 s) first, and so did whatever waited behind its queue locks."""
    text = "".join(path.read_text(errors="replace") for path in sorted(ctx.log_dir.glob(f"{schema}-w*.log")))
    summary.details.append(
        f"worker logs: claims that hit a deadlock {text.count('deadlock detected')};"
        f" attempts stopped by a lost lease (worker alive) {text.count('lease lost')}"
    )


def stuck(ctx: Context, summary: Summary, schema: str) -> None:
    rows = ctx.query(
        f'SELECT id::text, queue, concurrency_key, status, key_parked, available_at, worker_id FROM "{schema}".runs'
        " WHERE status NOT IN ('completed', 'failed', 'canceled') ORDER BY available_at"
    )
    parked = ctx.query(f'SELECT count(*) FROM "{schema}".runs WHERE key_parked')[0][0]
    summary.details.append(f"stuck after the workers settled: {len(rows)}; runs still key_parked: {parked}")
    if rows:
        summary.problems.append(f"{len(rows)} runs stuck (not finished after the workers settled)")
        summary.details.append(f"stuck (first 5): {rows[:5]}")


async def queue_state(ctx: Context, summary: Summary, schema: str) -> None:
    async with WorkflowManager(ctx.config(schema)) as client:
        stats = await client.queue_stats()
    summary.details.append(
        "queue_stats at the end: "
        + "; ".join(f"{s.name} running={s.running} due={s.due} parked_on_key={s.parked_on_key}" for s in stats)
    )


def read_spans(path: Path) -> list[Span]:
    """Every execution of a timed step: start lines paired with the end line of the same (pid, run, step),
    in order; a start without one is a step its process never finished."""
    open_spans: dict[tuple[int, str, str], list[Span]] = {}
    spans: list[Span] = []
    if not path.exists():
        return spans
    for line in path.read_text().splitlines():
        kind, pid, at, run_id, step, queue, key = line.split()
        index = (int(pid), run_id, step)
        if kind == "start":
            span = Span(int(pid), float(at), None, "killed", run_id, step, queue, key)
            open_spans.setdefault(index, []).append(span)
            spans.append(span)
        else:
            span = open_spans[index].pop(0)
            span.end, span.outcome = float(at), kind
    return spans


def most_at_once(spans: list[tuple[float, float, Span]]) -> tuple[int, float]:
    """The most spans overlapping at one instant, and the first such instant (an end sorts before a start at
    the same instant: touching spans do not overlap)."""
    events = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans])
    most = now = 0
    at = 0.0
    for moment, change in events:
        now += change
        if now > most:
            most, at = now, moment
    return most, at


def check_limits(summary: Summary, spans: list[Span], kills: list[Kill]) -> None:
    by_pid = {k.pid: k for k in kills}
    lease_s = LEASE_MS / 1000
    fallback = 0
    # Two readings of every span: the lease from the database, and kill time + lease_ms (an upper bound).
    readings: dict[str, list[tuple[float, float, Span]]] = {"db": [], "crude": []}
    interrupted = 0
    for span in spans:
        if span.end is not None:
            readings["db"].append((span.start, span.end, span))
            readings["crude"].append((span.start, span.end, span))
            continue
        killed = by_pid.get(span.pid)
        if killed is None:
            # A step still executing when the scenario stopped its workers: nothing can be over by then.
            summary.problems.append(f"a step never ended in process {span.pid}, which was not killed: {span}")
            readings["db"].append((span.start, float("inf"), span))
            readings["crude"].append((span.start, float("inf"), span))
            continue
        interrupted += 1
        expiry = killed.leases.get(span.run_id)
        if expiry is None:
            fallback += 1
            expiry = killed.at + lease_s
        readings["db"].append((span.start, expiry, span))
        readings["crude"].append((span.start, killed.at + lease_s, span))
    early = sorted(killed.at + lease_s - killed.leases[run] for killed in kills for run in killed.leases) or [0.0]
    summary.details.append(
        f"step executions: {len(spans)}; cut by a kill: {interrupted} (lease not found after the kill: {fallback});"
        f" leases held at a kill expired {early[0]:.2f}-{early[-1]:.2f}s (median {early[len(early) // 2]:.2f}s)"
        " before kill time + lease"
    )
    for reading in ("db", "crude"):
        capped = [s for s in readings[reading] if s[2].queue == CAPPED.name]
        keyed = [s for s in readings[reading] if s[2].queue == KEYED.name]
        most, at = most_at_once(capped)
        per_key: dict[str, list[tuple[float, float, Span]]] = {}
        for item in keyed:
            per_key.setdefault(item[2].key, []).append(item)
        key_most = {key: most_at_once(items) for key, items in per_key.items()}
        worst_key = max(key_most, key=lambda k: key_most[k][0]) if key_most else None
        keyed_most, _ = most_at_once(keyed)
        label = "lease from the database" if reading == "db" else "kill time + lease"
        summary.details.append(
            f"most at once ({label}): {CAPPED.name} {most} (limit {CAPPED.concurrency});"
            f" per key of {KEYED.name} {key_most[worst_key][0] if worst_key else 0} (limit 1) over {len(per_key)} keys;"
            f" {KEYED.name} all keys {keyed_most}"
        )
        if reading != "db":
            continue  # the upper bound is shown, the verdict is the database's lease
        if most > (CAPPED.concurrency or 0):
            summary.problems.append(f"{CAPPED.name}: {most} steps at once, limit {CAPPED.concurrency}")
            summary.details.append(f"  at {at:.6f}: {overlapping(capped, at)}")
        for key, (count, moment) in key_most.items():
            if count > (KEYED.per_key_concurrency or 0):
                summary.problems.append(f"{KEYED.name} key {key}: {count} steps at once, limit 1")
                summary.details.append(f"  key {key} at {moment:.6f}: {overlapping(per_key[key], moment)}")


def overlapping(spans: list[tuple[float, float, Span]], at: float) -> list[str]:
    return [
        f"run {s.run_id} {s.step} pid {s.pid} {s.start:.3f}-{end:.3f} ({s.outcome})"
        for start, end, s in spans
        if start <= at < end
    ]


def check_rate(ctx: Context, summary: Summary, schema: str) -> None:
    limit, window = RATED.rate  # type: ignore[misc]
    rows = ctx.query(
        f'SELECT started_at FROM "{schema}".runs WHERE queue = %s AND started_at IS NOT NULL ORDER BY started_at',
        [RATED.name],
    )
    starts = [row[0] for row in rows]
    most, first = 0, 0
    worst = None
    for last, moment in enumerate(starts):
        while starts[first] <= moment - window:  # the window (moment - window, moment]
            first += 1
        if last - first + 1 > most:
            most, worst = last - first + 1, moment
    span = (starts[-1] - starts[0]).total_seconds() if len(starts) > 1 else 0.0
    rate = (len(starts) - 1) / span if span else 0.0
    summary.details.append(
        f"{RATED.name}: {len(starts)} starts over {span:.1f}s ({rate:.1f}/s); most in any"
        f" {window.total_seconds():g}s window: {most} (limit {limit})"
    )
    if most > limit:
        summary.problems.append(f"{RATED.name}: {most} starts in one window ending {worst}, limit {limit}")
