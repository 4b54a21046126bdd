"""The chaos scenarios and how they are counted.

Counting rules (see also docs/reliability.md). Each audit row is the *start* of one execution of a step
(written by the step itself before it works). For every completed call step (steps.status = 'completed'):

* steps_reexecuted_after_checkpoint: audit rows whose `at` is later than the step's `finished_at`
  (an execution that started after its checkpoint existed: the engine should have returned the stored
  result instead), plus the "unexplained" extra executions below.
* Of the rows written before `finished_at`, the last one is the execution whose checkpoint was stored;
  every earlier one is an execution that never got its checkpoint, i.e. an interrupted step run again
  (interrupted_steps_rerun). In process scenarios (kill -9, SIGSTOP) an interrupted execution must have
  run in a process that was disturbed (killed or stopped); an earlier execution by a process that was
  never disturbed is unexplained and counted as re-executed. In scenarios that disturb the database or
  its connections, any process may legitimately be interrupted, so every earlier row counts as
  interrupted.
* lost: runs started that never reached a final status (or vanished) by the scenario's deadline.
* duplicate_cron_runs: for the schedule, runs beyond one per idempotency key `schedule:NAME@TIME`, plus
  runs beyond one per fire second.

Known blind spot: the checkpoint upsert overwrites `finished_at`; if a checkpoint committed but its commit
acknowledgement was lost (a PostgreSQL crash at that instant) and the step ran again, the second write
moves `finished_at` and the re-run looks interrupted rather than re-executed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from sonamu_tasks import InvalidInput, WorkflowFailed, WorkflowManager, define_config
from sonamu_tasks.errors import InvalidValue
from sonamu_tasks.testing import PostgresCluster

from . import workflows

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("completed", "failed", "canceled")


@dataclass
class Summary:
    name: str
    started: int = 0
    completed: int = 0
    failed: int = 0
    expected_failed: int = 0  # runs a scenario fails on purpose; any other failed run is a problem
    lost: int = 0
    reexecuted: int = 0
    interrupted: int = 0
    duplicate_cron: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"scenario={self.name} started={self.started} completed={self.completed} failed={self.failed} "
            f"lost={self.lost} steps_reexecuted_after_checkpoint={self.reexecuted} "
            f"interrupted_steps_rerun={self.interrupted} duplicate_cron_runs={self.duplicate_cron} "
            f"seconds={self.seconds:.1f}"
        )

    @property
    def ok(self) -> bool:
        return not (self.lost or self.reexecuted or self.duplicate_cron or self.problems)


class Worker:
    def __init__(self, env: dict[str, str], log_dir: Path, name: str) -> None:
        self.env, self.log_dir, self.name = env, log_dir, name
        self.generation = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.generation += 1
        log = open(self.log_dir / f"{self.name}-{self.generation}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chaos.worker"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()  # the child holds its own descriptor

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    def terminate(self, timeout: float = 10) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class Context:
    """What a scenario runs against. `engine_url` is what workers and producers connect to (default: the cluster),
    with `connection` the config's other connection options (listen_url, pool_mode); `query_url` is what the runner
    counts with. Audit rows always go to the runner's cluster, which no scenario kills."""

    def __init__(
        self,
        cluster: PostgresCluster,
        short: bool,
        log_dir: Path,
        *,
        engine_url: str | None = None,
        query_url: str | None = None,
        connection: dict[str, str] | None = None,
    ) -> None:
        self.cluster, self.short, self.log_dir = cluster, short, log_dir
        self.engine_url = engine_url or cluster.url
        self.query_url = query_url or cluster.url
        self.connection = connection or {}
        self.workers: list[Worker] = []

    def schema_for(self, name: str) -> str:
        return f"chaos_{name}_{uuid.uuid4().hex[:6]}"

    def worker(self, schema: str, name: str, workflows_: str = "chain", **settings: Any) -> Worker:
        env = {**os.environ, "CHAOS_URL": self.engine_url, "CHAOS_SCHEMA": schema, "CHAOS_WORKFLOWS": workflows_}
        env["CHAOS_AUDIT_URL"] = self.cluster.url
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        for key, value in {**self.connection, **settings}.items():
            env[f"CHAOS_{key.upper()}"] = str(value)
        worker = Worker(env, self.log_dir, f"{schema}-{name}")
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers.clear()

    def config(self, schema: str, **options: Any) -> Any:
        return define_config(
            database_url=self.engine_url,
            schema=schema,
            tasks={"enable_worker": False, "worker_options": {"listen_delay": 0, **options}},
            **self.connection,
        )

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        return _query(self.query_url, sql, params)

    def audit_query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        return _query(self.cluster.url, sql, params)


def _query(url: str, sql: str, params: list[Any] | None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        cursor = conn.execute(sql.encode(), params or [])  # type: ignore[arg-type]
        return list(cursor.fetchall()) if cursor.description is not None else []


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return True
        except psycopg.OperationalError:
            pass  # the server is restarting: look again
        await asyncio.sleep(interval)
    print(f"  timeout: {what} after {timeout:.0f}s", flush=True)
    return False


def status_counts(ctx: Context, schema: str) -> Counter[str]:
    rows = ctx.query(f'SELECT status, count(*) FROM "{schema}".runs GROUP BY status')
    return Counter({str(s): int(n) for s, n in rows})


async def all_final(ctx: Context, schema: str, expected: int, timeout: float) -> bool:
    async def check() -> bool:
        counts = await asyncio.to_thread(status_counts, ctx, schema)
        return sum(counts[s] for s in FINAL) >= expected

    return await wait_for(check, timeout, f"{expected} runs of {schema} to finish", interval=0.5)


def tally(ctx: Context, summary: Summary, schema: str, run_ids: list[str], disturbed: set[int] | None) -> None:
    """Fill the counts of `summary` from the runs, steps and audit rows of `schema` (rules: module doc)."""
    rows = ctx.query(f'SELECT id::text, status FROM "{schema}".runs WHERE id = ANY(%s::uuid[])', [run_ids])
    status = {str(i): str(s) for i, s in rows}
    summary.started += len(run_ids)
    summary.completed += sum(1 for s in status.values() if s == "completed")
    summary.failed += sum(1 for s in status.values() if s in ("failed", "canceled"))
    lost = [r for r in run_ids if status.get(r) not in FINAL]
    summary.lost += len(lost)
    if lost:
        summary.details.append(f"unfinished runs (first 5): {[(r, status.get(r)) for r in lost[:5]]}")
    steps = ctx.query(
        f'SELECT run_id::text, name, finished_at FROM "{schema}".steps'
        " WHERE status = 'completed' AND kind = 'call' AND run_id = ANY(%s::uuid[])",
        [run_ids],
    )
    audit: dict[tuple[str, str], list[tuple[datetime, int]]] = {}
    for run_id, step, pid, at in ctx.audit_query(
        "SELECT run_id::text, step, pid, at FROM public.chaos_audit WHERE scenario = %s ORDER BY at", [schema]
    ):
        audit.setdefault((str(run_id), str(step)), []).append((at, int(pid)))
    for run_id, step, finished_at in steps:
        executions = audit.get((str(run_id), str(step)), [])
        after = [e for e in executions if e[0] > finished_at]
        before = [e for e in executions if e[0] <= finished_at]
        summary.reexecuted += len(after)
        if after:
            summary.details.append(f"re-executed after checkpoint: run {run_id} step {step!r} {after}")
        earlier = before[:-1]
        unexplained = [e for e in earlier if disturbed is not None and e[1] not in disturbed]
        summary.reexecuted += len(unexplained)
        summary.interrupted += len(earlier) - len(unexplained)
        if unexplained:
            summary.details.append(
                f"rerun by an undisturbed process: run {run_id} step {step!r} {before} finished_at={finished_at}"
            )


async def start_runs(ctx: Context, schema: str, workflow: Any, inputs: list[Any]) -> list[str]:
    async with WorkflowManager(ctx.config(schema)) as client:
        ids: list[str] = []
        for value in inputs:
            handle = await client.run(workflow, value)
            ids.append(handle.id)
        return ids


async def ensure_schema(ctx: Context, schema: str) -> None:
    async with WorkflowManager(ctx.config(schema)):
        pass


# --- scenarios --------------------------------------------------------------------------------------------


async def worker_kills(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("kills")
    await ensure_schema(ctx, schema)
    count = 150 if ctx.short else 1000
    workers = [ctx.worker(schema, f"w{i}", lease_ms=1500) for i in range(3)]
    disturbed: set[int] = set()
    ids = await start_runs(ctx, schema, workflows.chain, [{"steps": 4, "work_ms": 30} for _ in range(count)])
    rng = random.Random(6)
    deadline = time.monotonic() + (120 if ctx.short else 600)
    kills = 0
    while time.monotonic() < deadline:
        counts = await asyncio.to_thread(status_counts, ctx, schema)
        if sum(counts[s] for s in FINAL) >= count:
            break
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        victim = rng.choice(workers)
        disturbed.add(victim.pid)
        victim.kill()
        victim.start()
        kills += 1
    await all_final(ctx, schema, count, 60)
    summary.details.append(f"kill -9 sent: {kills}")
    tally(ctx, summary, schema, ids, disturbed)


async def postgres_restart(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("pgrestart")
    await ensure_schema(ctx, schema)
    count = 120 if ctx.short else 600
    for i in range(3):
        ctx.worker(schema, f"w{i}", lease_ms=2000)
    ids = await start_runs(ctx, schema, workflows.chain, [{"steps": 5, "work_ms": 40} for _ in range(count)])
    modes = ["fast", "immediate"] * (1 if ctx.short else 3)
    for mode in modes:
        await asyncio.sleep(1.5)
        began = time.monotonic()
        await asyncio.to_thread(ctx.cluster.restart, mode)
        summary.details.append(f"restart {mode}: {time.monotonic() - began:.1f}s")
    await all_final(ctx, schema, count, 120 if ctx.short else 300)
    tally(ctx, summary, schema, ids, None)


async def bulk_starts(ctx: Context, summary: Summary) -> None:
    """run_many calls from a producer (a manager without a worker): 2,000 runs without keys (one COPY; 1,000 short)
    and 600 with keys (one INSERT), one after another, while the runner terminates the connection of a COPY or an INSERT
    of runs it sees in flight (about every other one) and PostgreSQL crashes (`immediate` restarts).

    Counted besides `tally` of the runs the calls returned: no input stored twice (a batch sent again after its
    commit's answer was lost gives its runs, it inserts none again), no run of the workflow that no call
    returned unless its call raised, and a call that raised left none of its runs or all of them (its one
    transaction committed or not; the answer lost with the crash)."""
    schema = ctx.schema_for("bulk")
    await ensure_schema(ctx, schema)
    for i in range(2):
        ctx.worker(schema, f"w{i}", lease_ms=2000)
    calls, unkeyed = (6, 1000) if ctx.short else (30, 2000)
    returned: dict[int, list[str]] = {}
    raised: dict[int, str] = {}
    sizes: dict[int, int] = {}

    async def produce() -> None:
        async with WorkflowManager(ctx.config(schema)) as client:
            for call in range(calls):
                keyed = call % 3 == 2
                sizes[call] = size = 600 if keyed else unkeyed
                inputs = [{"steps": 1, "work_ms": 0, "call": call, "item": item} for item in range(size)]
                keys: list[str | None] | None = [f"{call}-{item}" for item in range(size)] if keyed else None
                try:
                    handles = await client.run_many(workflows.chain, inputs, idempotency_keys=keys)
                    returned[call] = [handle.id for handle in handles]
                except Exception as error:  # counted below: what it left stored must be all or nothing
                    raised[call] = repr(error)[:200]
                await asyncio.sleep(0.05)

    async def disturb(producing: asyncio.Task[None]) -> int:
        rng, terminated = random.Random(23), 0
        seen: set[tuple[int, Any]] = set()
        # The crashes come while a statement of the call that many calls in is in flight.
        crashes = iter([1, 3] if ctx.short else [3, 10, 20])
        next_crash = next(crashes, None)
        while not producing.done():
            try:
                rows = await asyncio.to_thread(
                    ctx.query,
                    "SELECT pid, query_start, left(query, 9) FROM pg_stat_activity WHERE state = 'active'"
                    " AND (query LIKE 'COPY runs %%' OR query LIKE 'WITH inserted AS (%%INSERT INTO runs%%')",
                )
            except psycopg.OperationalError:
                rows = []  # restarting
            if rows and next_crash is not None and len(returned) + len(raised) >= next_crash:
                await asyncio.to_thread(ctx.cluster.restart, "immediate")
                summary.details.append(f"crash (immediate restart) during a {rows[0][2]!r} of call {next_crash}")
                next_crash = next(crashes, None)
                continue
            for pid, query_start, _ in rows:
                if (pid, query_start) not in seen:  # each statement once: killed or spared, half the time each
                    seen.add((pid, query_start))
                    if rng.random() < 0.5:
                        ctx.query("SELECT pg_terminate_backend(%s)", [pid])
                        terminated += 1
            await asyncio.sleep(0.005)
        return terminated

    producing = asyncio.create_task(produce())
    terminated = await disturb(producing)
    await producing
    summary.details.append(f"statements terminated mid-flight: {terminated}; calls raised: {len(raised)}")
    ids = [run_id for handles in returned.values() for run_id in handles]
    stored = ctx.query(
        f"SELECT (input->>'call')::int, (input->>'item')::int, count(*) FROM \"{schema}\".runs"
        " WHERE workflow_name = 'chain' GROUP BY 1, 2"
    )
    doubled = [(call, item, count) for call, item, count in stored if count > 1]
    if doubled:
        summary.problems.append(f"inputs stored more than once (first 5 of {len(doubled)}): {doubled[:5]}")
    per_call = Counter(call for call, _, _ in stored)
    for call, size in sizes.items():
        if call in returned and per_call[call] != size:
            summary.problems.append(f"call {call} returned {size} handles, {per_call[call]} runs stored")
        if call in raised and per_call[call] not in (0, size):
            summary.problems.append(f"call {call} raised ({raised[call]}) and left {per_call[call]} of {size} runs")
    total = sum(per_call.values())
    summary.details.append(f"calls: {len(returned)} returned, {len(raised)} raised; runs stored {total}")
    await all_final(ctx, schema, total, 120 if ctx.short else 300)
    tally(ctx, summary, schema, ids, None)


async def connections_killed(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("connkill")
    await ensure_schema(ctx, schema)
    count = 100 if ctx.short else 400
    for i in range(2):
        ctx.worker(schema, f"w{i}", lease_ms=2000, poll_ms=60000)
    ids = await start_runs(ctx, schema, workflows.chain, [{"steps": 4, "work_ms": 40} for _ in range(count)])
    terminated = 0
    for _ in range(3 if ctx.short else 6):
        await asyncio.sleep(1.0)
        rows = ctx.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'sonamu_tasks' AND pid <> pg_backend_pid()"
        )
        terminated += len(rows)
    summary.details.append(f"connections terminated: {terminated}")
    await all_final(ctx, schema, count, 120)
    # A last round with the workers idle (LISTEN connections included), then latency: only NOTIFY wakes them.
    rows = ctx.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'sonamu_tasks' AND pid <> pg_backend_pid()"
    )
    summary.details.append(f"idle connections terminated: {len(rows)}")
    await asyncio.sleep(2.0)  # the LISTEN reconnect backs off from 100 ms
    latencies: list[float] = []
    probe_ids: list[str] = []
    async with WorkflowManager(ctx.config(schema)) as client:
        for _ in range(20):
            began = time.time()
            handle = await client.run(workflows.chain, {"steps": 1, "work_ms": 0})
            probe_ids.append(handle.id)
            try:
                await handle.result(timeout=15)
            except (TimeoutError, WorkflowFailed) as error:
                summary.details.append(f"probe {handle.id}: {error!r}")
                continue
            at = ctx.query("SELECT min(at) FROM public.chaos_audit WHERE run_id = %s", [handle.id])[0][0]
            latencies.append(at.timestamp() - began)
    if latencies:
        latencies.sort()
        median, worst = latencies[len(latencies) // 2], latencies[-1]
        summary.details.append(f"run() -> step start latency: median {median * 1000:.0f} ms, max {worst * 1000:.0f} ms")
        if worst > 5.0:
            summary.problems.append(f"latency {worst:.1f}s: fell back to polling")
    tally(ctx, summary, schema, ids + probe_ids, None)


async def lease_loss(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("lease")
    await ensure_schema(ctx, schema)
    rounds = 2 if ctx.short else 5
    stalled = ctx.worker(schema, "stalled", lease_ms=1000, concurrency=rounds)
    ids = await start_runs(ctx, schema, workflows.chain, [{"steps": 3, "work_ms": 1500} for _ in range(rounds)])

    async def in_step() -> bool:
        rows = ctx.query(
            "SELECT count(DISTINCT run_id) FROM public.chaos_audit WHERE scenario = %s AND pid = %s",
            [schema, stalled.pid],
        )
        return int(rows[0][0]) >= rounds

    if not await wait_for(in_step, 30, "the first worker to be inside its steps"):
        summary.problems.append("the first worker never started its steps")
    os.kill(stalled.pid, signal.SIGSTOP)
    rescuer = ctx.worker(schema, "rescuer", lease_ms=1000, concurrency=rounds)

    async def taken_over() -> bool:
        rows = ctx.query(
            "SELECT count(DISTINCT run_id) FROM public.chaos_audit WHERE scenario = %s AND pid = %s",
            [schema, rescuer.pid],
        )
        return int(rows[0][0]) >= rounds

    await wait_for(taken_over, 30, "the take-over")
    os.kill(stalled.pid, signal.SIGCONT)  # its steps finish late; their writes must be fenced off
    await all_final(ctx, schema, rounds, 60)
    stalled_pid = stalled.pid
    await asyncio.sleep(2.0)  # give the stale worker time to try its late writes
    outputs = ctx.query(f'SELECT id::text, status, worker_id FROM "{schema}".runs')
    summary.details.append(f"outcomes: {sorted(str(s) for _, s, _ in outputs)}")
    tally(ctx, summary, schema, ids, {stalled_pid})
    late = ctx.query(
        f'SELECT count(*) FROM "{schema}".steps s JOIN public.chaos_audit a ON a.run_id = s.run_id'
        " AND a.step = s.name AND a.scenario = %s WHERE a.pid = %s AND a.at > s.finished_at",
        [schema, stalled_pid],
    )
    summary.details.append(f"stale worker executions after the take-over's checkpoints: {late[0][0]}")


async def cron(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("cron")
    await ensure_schema(ctx, schema)
    seconds = 8 if ctx.short else 20
    workers = [ctx.worker(schema, f"w{i}", workflows_="ticker", concurrency=2) for i in range(4)]
    await asyncio.sleep(seconds)
    for worker in workers:
        worker.terminate()
    rows = ctx.query(
        f'SELECT idempotency_key, count(*) FROM "{schema}".runs WHERE workflow_name = %s GROUP BY 1', ["ticker"]
    )
    keys = [str(k) for k, _ in rows]
    per_key = sum(int(n) - 1 for _, n in rows)
    fired = Counter(datetime.fromisoformat(k.split("@", 1)[1]).replace(microsecond=0) for k in keys)
    per_second = sum(n - 1 for n in fired.values())
    summary.duplicate_cron = per_key + per_second
    ids = [str(r[0]) for r in ctx.query(f'SELECT id::text FROM "{schema}".runs')]
    await all_final(ctx, schema, 0, 1)
    if fired:
        span = int((max(fired) - min(fired)).total_seconds()) + 1
        summary.details.append(f"fire seconds: {len(fired)} of a {span}s span; runs: {sum(int(n) for _, n in rows)}")
        if len(fired) < span:
            # Reported, not failed: a finding recorded in docs/reliability.md (seconds skipped while workers ran).
            summary.details.append(f"FINDING missed fires: {span - len(fired)} seconds without a run")
    else:
        summary.problems.append("the schedule never fired")
    rows2 = ctx.query(f'SELECT id::text, status FROM "{schema}".runs')
    summary.started = len(ids)
    summary.completed = sum(1 for _, s in rows2 if s == "completed")
    summary.failed = sum(1 for _, s in rows2 if s in ("failed", "canceled"))
    # Runs created in the last instant before the workers stopped may still be pending: not lost, no worker.
    summary.details.append(f"unfinished at stop (no worker left): {len(ids) - summary.completed - summary.failed}")


async def sleep_restart(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("sleep")
    await ensure_schema(ctx, schema)
    count = 40 if ctx.short else 200
    workers = [ctx.worker(schema, f"w{i}", workflows_="sleeper") for i in range(2)]
    ids = await start_runs(ctx, schema, workflows.sleeper, [{"sleep_ms": 3000} for _ in range(count)])

    async def all_sleeping() -> bool:
        return status_counts(ctx, schema)["sleeping"] >= count

    await wait_for(all_sleeping, 30, "every run to sleep")
    for worker in workers:
        worker.kill()
    await asyncio.sleep(4.0)  # every wake time passes while no worker runs
    summary.details.append(f"while stopped: {dict(status_counts(ctx, schema))}")
    for worker in workers:
        worker.start()
    await all_final(ctx, schema, count, 60)
    tally(ctx, summary, schema, ids, {w.pid for w in workers})


async def bad_input(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("bad")
    await ensure_schema(ctx, schema)
    unstorable = "far_sleeper,returns_nul,huge_step_name,raises_nul"
    ctx.worker(schema, "w0", workflows_=f"chain,returns_not_json,nasty,typed,{unstorable}")
    checks: list[tuple[str, bool, str]] = []

    # 1. Malformed JSON through the CLI: a usage error, exit 2.
    # This interpreter's package, never whatever `sonamu-tasks` PATH finds (or no PATH entry at all).
    command = [sys.executable, "-m", "sonamu_tasks"]
    env = {**os.environ, "SONAMU_TASKS_DATABASE_URL": ctx.cluster.url}
    done = subprocess.run(
        [*command, "run", "chain", "--version", "1", "--input", "{bad"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    checks.append(("cli malformed JSON exits 2", done.returncode == 2, done.stderr.strip().splitlines()[-1:].__str__()))

    good = await start_runs(ctx, schema, workflows.chain, [{"steps": 2, "work_ms": 0} for _ in range(5)])
    async with WorkflowManager(ctx.config(schema), workflows=[workflows.typed]) as client:
        # 2. Input failing the pydantic schema: InvalidInput at run(), nothing stored.
        try:
            await client.run(workflows.typed, {"quantity": "many"})
            checks.append(("schema violation raises InvalidInput", False, "no error"))
        except InvalidInput as error:
            stored = ctx.query(f'SELECT count(*) FROM "{schema}".runs WHERE workflow_name = %s', ["typed"])[0][0]
            checks.append(("schema violation raises InvalidInput, nothing stored", stored == 0, str(error)[:120]))
        # 3. Unknown version: stays pending, not failed.
        unknown = await client.run({"name": "chain", "version": "99"}, {"steps": 1})
        # 4. A step returning a non-JSON value: the run fails naming the step.
        bad_output = await client.run({"name": "returns_not_json", "version": "1"}, None)
        try:
            await bad_output.result(timeout=30)
            checks.append(("non-JSON step output fails the run", False, "completed"))
        except WorkflowFailed as failure:
            checks.append(
                (
                    "non-JSON step output fails the run naming the step",
                    "bad-output-step" in str(failure),
                    str(failure)[:160],
                )
            )
        # 5. A 10 MB input.
        big = await client.run(workflows.chain, {"steps": 1, "work_ms": 0, "pad": "x" * 10_000_000})
        # 6. Names with quotes and SQL in them.
        nasty = await client.run(workflows.nasty, None)
        for label, handle in (("10 MB input completes", big), ("quoted/SQL names complete", nasty)):
            try:
                result = await handle.result(timeout=60)
                checks.append((label, True, repr(result)[:60]))
            except (TimeoutError, WorkflowFailed) as error:
                checks.append((label, False, repr(error)[:160]))
        # 8. Values the database cannot hold (docs/reliability.md, "Inputs tried"): refused before the
        # database, each failing only its own run, at once (or after its own retries), never as an outage.
        failing = await unstorable_values(ctx, schema, client, checks)
        good_all = [*good, big.id, nasty.id]
        await all_final(ctx, schema, len(good) + 3 + len(failing), 60)
        info = await unknown.info()
        checks.append(("unknown version stays pending", info.status.value == "pending", info.status.value))
        listed = await client.list_runs(limit=1000)
        readable = [await client.get_run(run.id, with_steps=True) for run in listed.items]
        checks.append(("every run lists and reads", len(readable) == len(good_all) + 2 + len(failing), ""))
    tables = ctx.query("SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = 'runs'", [schema])
    checks.append(("runs table still exists", tables[0][0] == 1, ""))
    # 7. A workflow module raising at import: reported, the others load.
    from sonamu_tasks.discovery import discover

    found = discover(["chaos.discovery_pkg"])
    names = [d.name for d in found.definitions]
    checks.append(
        (
            "broken module reported, good one loaded",
            "discovered_ok" in names and any("broken" in e.path for e in found.errors),
            "; ".join(str(e) for e in found.errors)[:160],
        )
    )
    tally(ctx, summary, schema, [*good_all, *failing], None)
    summary.started += 2  # the unknown-version run (pending by design) and the failed non-JSON run
    summary.failed += 1
    summary.expected_failed = 1 + len(failing)
    for label, passed, note in checks:
        summary.details.append(f"{'ok ' if passed else 'BAD'} {label}: {note}")
        if not passed:
            summary.problems.append(label)


async def unstorable_values(
    ctx: Context, schema: str, client: WorkflowManager, checks: list[tuple[str, bool, str]]
) -> list[str]:
    """The bad_input checks of values no backend can store; returns the ids of the runs that must fail."""
    for label, options in (
        ("100 kB idempotency key", {"idempotency_key": uuid.uuid4().hex * 3125}),
        ("start_at 9000 years ahead", {"start_at": "9000y"}),
    ):
        began = time.monotonic()
        try:
            await client.run(workflows.chain, {"steps": 1}, **options)
            checks.append((f"{label} refused at run()", False, "accepted"))
        except InvalidValue as error:
            took = time.monotonic() - began
            checks.append((f"{label} refused at run() by name, at once", took < 2, f"{took:.2f}s: {str(error)[:80]}"))
    stored = ctx.query(f'SELECT count(*) FROM "{schema}".runs WHERE length(idempotency_key) > 255')[0][0]
    checks.append(("nothing stored for a refused run()", stored == 0, ""))
    expected = {  # workflow -> (error type, attempts, what the message says)
        "far_sleeper": ("UnusableDuration", 1, "longer than the limit of 100 years"),
        "returns_nul": ("SerializationError", 1, "the result of step 'nul'"),
        "huge_step_name": ("InvalidName", 1, "step name is 10,240 characters long"),
        "raises_nul": ("ValueError", 2, "card\\x00declined"),
    }
    handles = {name: await client.run({"name": name, "version": "1"}, None) for name in expected}
    for name, (kind, attempts, says) in expected.items():
        try:
            await handles[name].result(timeout=30)
            checks.append((f"{name} fails its run", False, "completed"))
        except WorkflowFailed as failure:
            run = await handles[name].info()
            error = failure.error
            held = (error.get("type"), run.attempts, run.recoveries, says in str(error.get("message")))
            label = f"{name}: {kind} after {attempts} attempt(s), no take-over"
            checks.append((label, held == (kind, attempts, 0, True), str(held)))
        except TimeoutError as error:
            checks.append((f"{name} fails its run", False, repr(error)))
    return [handle.id for handle in handles.values()]


async def hostile_neighbours(ctx: Context, summary: Summary) -> None:
    """A session idle in transaction holding an old snapshot, and 300 idle connections, during a load."""
    count = 150 if ctx.short else 600

    held: list[int] = []

    async def load(label: str) -> tuple[list[str], str, float]:
        schema = ctx.schema_for(f"neighbours_{label}")
        await ensure_schema(ctx, schema)
        for i in range(2):
            ctx.worker(schema, f"{label}{i}", lease_ms=2000)
        began = time.monotonic()
        ids = await start_runs(ctx, schema, workflows.chain, [{"steps": 3, "work_ms": 5} for _ in range(count)])
        await all_final(ctx, schema, count, 180)
        elapsed = time.monotonic() - began
        held.append(ctx.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sonamu_tasks'")[0][0])
        ctx.stop_workers()
        return ids, schema, elapsed

    _, _, calm = await load("calm")
    neighbours: list[psycopg.Connection[Any]] = []
    try:
        # The old snapshot: vacuum cannot clean behind it, so dead rows of the runs table pile up.
        old = psycopg.connect(ctx.cluster.url, connect_timeout=10)
        neighbours.append(old)
        old.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        old.execute("SELECT count(*) FROM pg_class")
        for _ in range(300):
            neighbours.append(psycopg.connect(ctx.cluster.url, autocommit=True, connect_timeout=10))
        ids, schema, disturbed = await load("hostile")
        state = ctx.query("SELECT state FROM pg_stat_activity WHERE pid = %s", [old.info.backend_pid])
    finally:
        for conn in neighbours:
            conn.close()
    tally(ctx, summary, schema, ids, None)
    summary.details.append(f"idle connections held: 300; old snapshot session: {state[0][0] if state else '?'}")
    summary.details.append(
        f"runs started one by one and finished: {count / calm:.0f} runs/s undisturbed, "
        f"{count / disturbed:.0f} runs/s with the neighbours ({calm / disturbed:.0%})"
    )
    # Two workers, concurrency 4: pools of at most 8 each, plus LISTEN: the neighbours do not make it grow.
    summary.details.append(f"engine connections open at the end of the load: calm {held[0]}, hostile {held[1]}")


async def pgbouncer(ctx: Context, summary: Summary) -> None:
    """`worker_kills` with every engine connection through PgBouncer: in transaction mode (LISTEN and the
    retention lock direct, `listen_url`), then in session mode; the runs of both are counted together."""
    from sonamu_tasks.testing import PgBouncer

    for mode in ("transaction", "session"):
        with PgBouncer(ctx.cluster.url, pool_mode=mode, pool_size=20) as bouncer:
            connection = {"listen_url": ctx.cluster.url, "pool_mode": mode} if mode == "transaction" else {}
            pooled = Context(ctx.cluster, ctx.short, ctx.log_dir, engine_url=bouncer.url, connection=connection)
            try:
                before = summary.details[:]
                await worker_kills(pooled, summary)
                kills = [d for d in summary.details if d not in before]
                summary.details[len(before) :] = [f"{mode} mode: {d}" for d in kills]
                servers = ctx.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sonamu_tasks'")
                summary.details.append(f"{mode} mode: engine connections at the server after the load: {servers[0][0]}")
            finally:
                pooled.stop_workers()


async def failover(ctx: Context, summary: Summary) -> None:
    from .failover import failover as scenario  # imports this module: loaded when the scenario runs

    await scenario(ctx, summary)


async def failover_async(ctx: Context, summary: Summary) -> None:
    from .failover import failover_async as scenario

    await scenario(ctx, summary)


async def composition(ctx: Context, summary: Summary) -> None:
    from .composition import composition as scenario  # imports this module: loaded when the scenario runs

    await scenario(ctx, summary)


async def messages(ctx: Context, summary: Summary) -> None:
    from .messages import messages as scenario  # imports this module: loaded when the scenario runs

    await scenario(ctx, summary)


async def queues(ctx: Context, summary: Summary) -> None:
    from .queues import queues as scenario  # imports this module: loaded when the scenario runs

    await scenario(ctx, summary)


SCENARIOS: dict[str, Callable[[Context, Summary], Awaitable[None]]] = {
    "worker_kills": worker_kills,
    "postgres_restart": postgres_restart,
    "connections_killed": connections_killed,
    "bulk_starts": bulk_starts,
    "lease_loss": lease_loss,
    "cron": cron,
    "sleep_restart": sleep_restart,
    "bad_input": bad_input,
    "hostile_neighbours": hostile_neighbours,
    "composition": composition,
    "messages": messages,
    "queues": queues,
    "pgbouncer": pgbouncer,
    "failover": failover,
    "failover_async": failover_async,
}


async def run_all(names: list[str], short: bool) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="sonamu-chaos-"))
    print(f"chaos: {'short' if short else 'long'} run of {','.join(names)}; logs in {log_dir}", flush=True)
    failures = 0
    with PostgresCluster(fsync=True) as cluster:
        ctx = Context(cluster, short, log_dir)
        ctx.query(workflows.AUDIT_DDL)
        for name in names:
            summary = Summary(name)
            began = time.monotonic()
            try:
                await SCENARIOS[name](ctx, summary)
            except Exception as error:  # a scenario that crashes is a failed scenario, the others still run
                summary.problems.append(f"scenario raised {error!r}")
            finally:
                ctx.stop_workers()
                if not cluster.is_running():
                    cluster.start()
            summary.seconds = time.monotonic() - began
            if summary.failed > summary.expected_failed:
                summary.problems.append(f"{summary.failed - summary.expected_failed} unexpected failed runs")
            print(summary.line(), flush=True)
            for detail in summary.details[:20]:
                print(f"  {detail}", flush=True)
            for problem in summary.problems:
                print(f"  PROBLEM: {problem}", flush=True)
            failures += 0 if summary.ok else 1
    print(f"chaos: {'FAILED' if failures else 'passed'} ({failures} scenario(s) with problems)", flush=True)
    return 1 if failures else 0
