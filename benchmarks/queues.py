"""Queues: what per-key limits cost, what a claim reads, how exact a rate limit is (PostgreSQL only).

    python -m benchmarks.queues [--part keys,plans,rate,claimcost] [--url URL]

keys (`--backlog 20000 --keys 1000 --steps 1 --processes 1 --concurrency 128 --rounds 3`): a backlog of
    1-step runs is enqueued (run_many, 1,000 a statement) before one worker process starts; the clock runs
    from the workers' start to the last completion. Per round, in a fresh schema each, in an order that
    rotates every round:
      plain        the default queue, no keys (the reference);
      interleaved  a queue with per_key_concurrency=1, run i has key i % keys;
      blocks       the same queue, the runs in blocks per key: backlog/keys runs of key 0, then of key 1 ...
                   (a claim meets a key's next runs while its first one executes: they are parked).
    `--variants` may add interleaved_batched and blocks_batched: the same, with claim_runs replaced in that
    schema by the proposal in benchmarks/claim_runs_batched.sql (see claimcost).
    Prints workflows/s and each keyed variant's ratio to `plain` of the same round, then the medians; also
    the CPU of the worker processes and the PostgreSQL server per workflow (less the CPU of starting and
    stopping the workers idle, measured once), and its ratio plain / keyed.
plans (`--plan-sizes 2000,20000,200000 --plan-claims 40 --claim-limit 64`): for each backlog size and layout
    (`--plan-layouts`: interleaved over 1,000 keys; blocks of 20 runs per key, size/20 keys; onekey: every run
    under one key), no worker: claims are made by hand with
    `SELECT * FROM claim_runs(...)` (limit 64, as a worker of concurrency 128 asks), each followed by the
    completion of the runs it took (an UPDATE to 'completed', which fires the key-release trigger), in a
    session with auto_explain (log_nested_statements, log_analyze, log_buffers; its output comes back as
    notices). Per claim: runs taken, nested statements run, rows the scans of `runs` returned or filtered
    out, shared buffers touched (the top-level statement's hit + read, which include the nested ones) and
    the time; median and max over the claims. `--show-plans` prints the plan of every distinct nested
    statement of the first claim and of a completion (the trigger) at the largest size.
claimcost (`--claimcost-backlog 20000 --claimcost-claims 60 --claim-limit 64 --claim-running 128`; not in the
    default --part): one schema, a backlog in each of four queues (default; `limited`, concurrency 1,000,000;
    `keyed`, per_key_concurrency=1, interleaved keys; `blocks`, the same limit, blocks per key), 128 runs
    executing in each (in `blocks`: the first run of the first 128 keys, so a claim parks their next runs).
    Claims of 64 taken in a transaction that is rolled back (the state stays the same), alternating:
    the server's execution time (EXPLAIN ANALYZE) of `claim_runs` and of `claim_runs_batched`, the set-based
    variant in benchmarks/claim_runs_batched.sql (a proposal, loaded into the schema), with a check that both
    take runs of the same keys and park as many.
rate (`--rate 100/1s --seconds 30 --rate-processes 1,4`): a queue with that rate_limit and 2x its window's
    worth of runs per second for `--seconds` + 10 s; workers start, run until `--seconds` + 2 s after the
    first start and are stopped. From runs.started_at: the starts within `--seconds` of the first one, and
    the most starts in any sliding window of the rate's length.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_common import (
    CpuMeter,
    arguments,
    client_config,
    database,
    enable_function_stats,
    function_stats,
    median,
    new_schema,
    report,
    start_workers,
    stop_workers,
    wait_until_finished,
)
from sonamu_tasks import WorkflowManager
from sonamu_tasks.queue import parse_rate

STEPS = {"name": "steps", "version": "1"}
KEYED = "keyed"
RATED = "rated"
VARIANTS = ("plain", "interleaved", "blocks")  # also interleaved_batched, blocks_batched (--variants)


def key_list(layout: str, backlog: int, keys: int) -> list[str | None]:
    if layout == "plain":
        return [None] * backlog
    if layout == "interleaved":
        return [f"k{i % keys}" for i in range(backlog)]
    per_key = -(-backlog // keys)
    return [f"k{i // per_key}" for i in range(backlog)]


async def fill(client: WorkflowManager, backlog: int, keys: list[str | None], queue: str | None, steps: int) -> None:
    """`backlog` pending runs, 1,000 per statement, in list order (ids and available_at rise with it)."""
    for start in range(0, backlog, 1000):
        chunk = keys[start : start + 1000]
        await client.run_many(
            STEPS, [{"steps": steps}] * len(chunk), queue=queue, concurrency_keys=chunk if queue else None
        )


# keys ---------------------------------------------------------------------------------------------------


async def keys_round(url: str, variant: str, args: Any, meter: CpuMeter) -> float:
    schema = new_schema()
    layout, _, batched = variant.partition("_")
    queues = [] if layout == "plain" else [{"name": KEYED, "per_key_concurrency": 1}]
    worker_options: dict[str, Any] = {"concurrency": args.concurrency}
    if queues:
        worker_options.update(queues=json.dumps(queues), serve=KEYED)
    async with WorkflowManager(client_config(url, schema, queues)) as client:
        if batched:  # the proposal in place of the engine's claim_runs, for this schema only
            sql = BATCHED_SQL.read_text().replace("FUNCTION claim_runs_batched(", "FUNCTION claim_runs(")
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, options=f"-c search_path={schema}"
            ) as conn:
                await conn.execute(sql)
        keys = key_list(layout, args.backlog, args.keys)
        await fill(client, args.backlog, keys, None if layout == "plain" else KEYED, args.steps)
        meter.start()
        began = time.perf_counter()
        workers = start_workers(url, schema, args.processes, **worker_options)
        try:
            await wait_until_finished(client, 900)
            elapsed = time.perf_counter() - began
        finally:
            stop_workers(workers)
        meter.stop()
        meter.functions = await function_stats(client, schema)
        failed = await client.list_runs(status="failed", limit=1)
        assert not failed.items, "a run failed"
    return args.backlog / elapsed


async def part_keys(url: str, args: Any) -> None:
    meter = CpuMeter(url)
    enable_function_stats(url)
    overhead = await meter.startup(url, args.processes, concurrency=args.concurrency)
    report("queues.keys.worker_startup_cpu", overhead, "s", processes=args.processes)
    variants = tuple(args.variants.split(","))
    assert variants[0] == "plain", "--variants starts with plain (the reference)"
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants[1:]}
    cpu_ratios: dict[str, list[float]] = {v: [] for v in variants[1:]}
    labels = {"backlog": args.backlog, "keys": args.keys, "S": args.steps, "processes": args.processes}
    for index in range(args.rounds):
        turn = index % len(variants)
        order = variants[turn:] + variants[:turn]
        this: dict[str, float] = {}
        for variant in order:
            this[variant] = await keys_round(url, variant, args, meter)
            rates[variant].append(this[variant])
            cpu[variant].append(meter.per_item_us(args.backlog, overhead))
            report("queues.keys.workflows_per_s", this[variant], "workflows/s", variant=variant, round=index + 1)
            report("queues.keys.cpu_per_workflow", cpu[variant][-1], "us", variant=variant, round=index + 1)
            calls, total_ms = meter.functions.get("claim_runs", (0, 0.0))
            if calls:
                report("queues.keys.claims_per_workflow", calls / args.backlog, "claims", variant=variant)
                report("queues.keys.claim_ms_per_claim", total_ms / calls, "ms", variant=variant)
                report("queues.keys.claim_ms_per_workflow", total_ms / args.backlog, "ms", variant=variant)
            calls, total_ms = meter.functions.get("release_key_slot", (0, 0.0))
            if calls:  # the trigger, in the transactions that take runs out of 'running'
                report("queues.keys.release_ms_per_workflow", total_ms / args.backlog, "ms", variant=variant)
        for variant in variants[1:]:
            ratios[variant].append(this[variant] / this["plain"])
            cpu_ratios[variant].append(cpu["plain"][-1] / cpu[variant][-1])
            report("queues.keys.ratio_to_plain", ratios[variant][-1], "x", variant=variant, round=index + 1)
            report("queues.keys.cpu_ratio_to_plain", cpu_ratios[variant][-1], "x", variant=variant, round=index + 1)
    for variant in variants:
        report("queues.keys.workflows_per_s.median", median(rates[variant]), "workflows/s", variant=variant, **labels)
        report("queues.keys.cpu_per_workflow.median", median(cpu[variant]), "us", variant=variant, **labels)
    print(f"median of {args.rounds} rounds [min-max]:")
    for variant in variants[1:]:
        values, cpus = ratios[variant], cpu_ratios[variant]
        report("queues.keys.ratio_to_plain.median", median(values), "x", variant=variant, **labels)
        print(
            f"  {variant}: workflows/s ratio to plain {median(values):.3f} [{min(values):.3f}-{max(values):.3f}]; "
            f"CPU per workflow plain/{variant} {median(cpus):.3f} [{min(cpus):.3f}-{max(cpus):.3f}]",
            flush=True,
        )


# plans --------------------------------------------------------------------------------------------------

SCAN = re.compile(r"(Seq Scan|Index Scan|Index Only Scan|Bitmap Heap Scan)( using \S+)? on (\w+)")
ACTUAL = re.compile(r"actual time=[\d.]+\.\.[\d.]+ rows=(\d+) loops=(\d+)")
REMOVED = re.compile(r"Rows Removed by (?:Filter|Index Recheck): (\d+)")
BUFFERS = re.compile(r"Buffers: shared((?: \w+=\d+)+)")


def parse_plan(text: str) -> dict[str, Any]:
    """Query text, rows read by scans of `runs` (returned x loops + removed), and the top node's buffers."""
    query = text.split("Query Text:", 1)[1].strip().split("\n")[0] if "Query Text:" in text else "?"
    rows = 0
    lines = text.splitlines()
    for index, line in enumerate(lines):
        scan = SCAN.search(line)
        if scan and scan.group(3) == "runs":
            actual = ACTUAL.search(line)
            if actual:
                loops = int(actual.group(2))
                rows += int(actual.group(1)) * loops
            for follow in lines[index + 1 : index + 6]:
                if "->" in follow:
                    break
                removed = REMOVED.search(follow)
                if removed:
                    rows += int(removed.group(1))
    buffers = 0
    found = BUFFERS.search(text)
    if found:
        counts = dict(part.split("=") for part in found.group(1).split())
        buffers = int(counts.get("hit", 0)) + int(counts.get("read", 0))
    return {"query": query, "rows": rows, "buffers": buffers, "text": text}


async def plans_one(url: str, size: int, layout: str, args: Any, show: bool) -> None:
    schema = new_schema()
    queues = [{"name": KEYED, "per_key_concurrency": 1}]
    if layout == "onekey":  # the whole backlog under one key
        keys = key_list("blocks", size, 1)
    else:
        keys = key_list(layout, size, size // 20 if layout == "blocks" else min(1000, size))
    async with WorkflowManager(client_config(url, schema, queues)) as client:
        await fill(client, size, keys, KEYED, 1)
    notices: list[str] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn:
        await conn.execute("ANALYZE runs")
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        for setting in (
            "LOAD 'auto_explain'",
            "SET auto_explain.log_level = notice",
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_nested_statements = on",
            "SET auto_explain.log_analyze = on",
            "SET auto_explain.log_buffers = on",
            "SET auto_explain.log_triggers = on",
        ):
            await conn.execute(setting)
        worker = f"plans-{uuid.uuid4().hex[:6]}"
        per_claim: list[dict[str, float]] = []
        first_claim: list[dict[str, Any]] = []
        completion: list[dict[str, Any]] = []
        for index in range(args.plan_claims):
            notices.clear()
            began = time.perf_counter()
            cursor = await conn.execute(
                "SELECT id FROM claim_runs(%s, %s, %s, %s, %s, %s)",
                [worker, [KEYED], [STEPS["name"]], [STEPS["version"]], args.claim_limit, timedelta(minutes=5)],
            )
            taken = [row[0] for row in await cursor.fetchall()]
            elapsed = time.perf_counter() - began
            plans = [parse_plan(n) for n in notices if "Query Text:" in n]
            top = plans[-1]  # the calling statement is logged last, with every nested statement's buffers
            nested = plans[:-1]
            per_claim.append(
                {
                    "taken": len(taken),
                    "statements": len(nested),
                    "rows": sum(p["rows"] for p in nested),
                    "buffers": top["buffers"],
                    "ms": elapsed * 1000,
                }
            )
            if index == 0:
                first_claim = plans
            notices.clear()
            await conn.execute(
                "UPDATE runs SET status = 'completed', finished_at = now(), updated_at = now(), output = '1' "
                "WHERE id = ANY(%s::uuid[])",
                [taken],
            )
            if index == 0:
                completion = [parse_plan(n) for n in notices if "Query Text:" in n]
            if not taken:
                break
    labels = {"layout": layout, "backlog": size, "limit": args.claim_limit, "claims": len(per_claim)}
    for field, unit in (("taken", "runs"), ("statements", "stmts"), ("rows", "rows"), ("buffers", "buffers")):
        values = [c[field] for c in per_claim]
        report(f"queues.plans.{field}_per_claim.p50", median(values), unit, **labels)
        report(f"queues.plans.{field}_per_claim.max", max(values), unit, **labels)
    first = per_claim[0]
    report("queues.plans.first_claim.rows", first["rows"], "rows", **labels)
    report("queues.plans.first_claim.buffers", first["buffers"], "buffers", **labels)
    report("queues.plans.claim_ms.p50", median([c["ms"] for c in per_claim]), "ms", explain="on", **labels)
    report("queues.plans.claim_ms.max", max(c["ms"] for c in per_claim), "ms", explain="on", **labels)
    if show:
        for title, plans in (("first claim", first_claim), ("completion of its runs", completion)):
            print(f"\n===== {layout}, backlog {size}: {title}: {len(plans)} statements; one plan per text =====")
            seen: dict[str, int] = {}
            for plan in plans:
                seen[plan["query"]] = seen.get(plan["query"], 0) + 1
            shown: set[str] = set()
            for plan in plans:
                if plan["query"] in shown:
                    continue
                shown.add(plan["query"])
                print(
                    f"--- run {seen[plan['query']]} time(s) in this call; rows read by scans of runs here: "
                    f"{plan['rows']}"
                )
                for line in plan["text"].strip().splitlines():
                    print(line if len(line) <= 240 else line[:200] + " ...")
        print(flush=True)


async def part_plans(url: str, args: Any) -> None:
    sizes = [int(s) for s in args.plan_sizes.split(",")]
    for size in sizes:
        for layout in args.plan_layouts.split(","):
            await plans_one(url, size, layout, args, show=args.show_plans and size == max(sizes))


# claimcost ----------------------------------------------------------------------------------------------

BATCHED_SQL = Path(__file__).with_name("claim_runs_batched.sql")
CLAIM_CASES = (  # name, queue, function
    ("plain", "default", "claim_runs"),
    ("limited", "limited", "claim_runs"),
    ("keyed", KEYED, "claim_runs"),
    ("keyed_batched", KEYED, "claim_runs_batched"),
    ("blocks", "blocks", "claim_runs"),
    ("blocks_batched", "blocks", "claim_runs_batched"),
)


async def claim_once(conn: psycopg.AsyncConnection[Any], function: str, queue: str, limit: int) -> tuple[float, list]:
    """One claim in a transaction rolled back (the backlog stays as it was): server execution ms (EXPLAIN
    ANALYZE), then the same claim again for what it does: runs taken, runs parked, the keys taken."""
    async with conn.transaction(force_rollback=True):
        cursor = await conn.execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT id FROM {function}(%s, %s, %s, %s, %s, %s)",
            ["cost", [queue], [STEPS["name"]], [STEPS["version"]], limit, timedelta(minutes=5)],
        )
        plan = (await cursor.fetchone())[0][0]
        # The keys taken (runs of one key enqueued together share available_at: which of them goes first
        # is arbitrary, so the runs themselves may differ between two functions).
        cursor = await conn.execute(
            f"SELECT r.concurrency_key FROM {function}(%s, %s, %s, %s, %s, %s) AS c JOIN runs r ON r.id = c.id::uuid "
            "ORDER BY 1",
            ["cost", [queue], [STEPS["name"]], [STEPS["version"]], limit, timedelta(minutes=5)],
        )
        taken = [row[0] for row in await cursor.fetchall()]
        parked = (await (await conn.execute("SELECT count(*) FROM runs WHERE key_parked")).fetchone())[0]
    return plan["Execution Time"], [len(taken), parked, taken]


async def part_claimcost(url: str, args: Any) -> None:
    """The claim function's own execution time per claim of `--claim-limit`, for each kind of queue, with
    `--claim-running` runs of the queue executing (other keys than the backlog's, except `blocks`, whose
    first keys are busy, so the claim parks)."""
    schema = new_schema()
    size, running = args.claimcost_backlog, args.claim_running
    queues = [
        {"name": "limited", "concurrency": 1_000_000},
        {"name": KEYED, "per_key_concurrency": 1},
        {"name": "blocks", "per_key_concurrency": 1},
    ]
    async with WorkflowManager(client_config(url, schema, queues)) as client:
        await fill(client, size, [None] * size, None, 1)
        await fill(client, size, [None] * size, "limited", 1)
        await fill(client, size, key_list("interleaved", size, args.keys), KEYED, 1)
        await fill(client, size, key_list("blocks", size, args.keys), "blocks", 1)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn:
        await conn.execute(BATCHED_SQL.read_text())
        # The newest `running` runs of each queue execute (a live lease); in `keyed` under keys of their own.
        await conn.execute(
            """
            UPDATE runs r SET status = 'running', started_at = now(), available_at = now() + interval '1 hour',
                              worker_id = 'elsewhere', lease_token = gen_random_uuid(),
                              concurrency_key = CASE WHEN r.queue = %(keyed)s THEN 'busy' || n.rank END
            FROM (SELECT id, row_number() OVER (PARTITION BY queue ORDER BY id DESC) AS rank FROM runs) AS n
            WHERE r.id = n.id AND n.rank <= %(running)s AND r.queue <> 'blocks'
            """,
            {"keyed": KEYED, "running": running},
        )
        # In `blocks`, the first run of each of the first `running` keys executes: their other runs are due.
        await conn.execute(
            """
            UPDATE runs r SET status = 'running', started_at = now(), available_at = now() + interval '1 hour',
                              worker_id = 'elsewhere', lease_token = gen_random_uuid()
            FROM (SELECT DISTINCT ON (concurrency_key) id, concurrency_key FROM runs WHERE queue = 'blocks'
                  ORDER BY concurrency_key, available_at) AS h
            WHERE r.id = h.id AND h.concurrency_key = ANY(%(keys)s)
            """,
            {"keys": [f"k{i}" for i in range(running)]},
        )
        await conn.execute("VACUUM ANALYZE runs")
        times: dict[str, list[float]] = {name: [] for name, _, _ in CLAIM_CASES}
        outcome: dict[str, list] = {}
        for index in range(args.claimcost_claims):
            order = CLAIM_CASES[index % len(CLAIM_CASES) :] + CLAIM_CASES[: index % len(CLAIM_CASES)]
            for name, queue, function in order:
                ms, result = await claim_once(conn, function, queue, args.claim_limit)
                times[name].append(ms)
                outcome[name] = result
    for original, batched in (("keyed", "keyed_batched"), ("blocks", "blocks_batched")):
        same = outcome[original][2] == outcome[batched][2] and outcome[original][1] == outcome[batched][1]
        print(f"{original} / {batched}: same keys taken and same number parked: {same}", flush=True)
    labels = {"limit": args.claim_limit, "running": running, "backlog": size, "claims": args.claimcost_claims}
    for name, _, function in CLAIM_CASES:
        taken, parked, _ = outcome[name]
        report(f"queues.claimcost.{name}.p50", median(times[name]), "ms", taken=taken, parked=parked, **labels)
        report(f"queues.claimcost.{name}.per_run", median(times[name]) / max(taken, 1) * 1000, "us", fn=function)


# rate ---------------------------------------------------------------------------------------------------


async def rate_round(url: str, processes: int, args: Any) -> None:
    count, window = parse_rate(args.rate)
    window_s = window.total_seconds()
    per_s = count / window_s
    schema = new_schema()
    queues = [{"name": RATED, "rate_limit": args.rate}]
    async with WorkflowManager(client_config(url, schema, queues)) as client:
        backlog = int(2 * per_s * (args.seconds + 10))
        await fill(client, backlog, [None] * backlog, RATED, 1)
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, options=f"-c search_path={schema}"
        ) as conn:
            workers = start_workers(
                url, schema, processes, concurrency=args.concurrency, queues=json.dumps(queues), serve=RATED
            )
            try:
                first = None
                while first is None:
                    await asyncio.sleep(0.05)
                    first = (await (await conn.execute("SELECT min(started_at) FROM runs")).fetchone())[0]
                while True:
                    now = (await (await conn.execute("SELECT now()")).fetchone())[0]
                    if (now - first).total_seconds() > args.seconds + 2:
                        break
                    await asyncio.sleep(0.2)
            finally:
                stop_workers(workers)
            rows = await (
                await conn.execute(
                    "SELECT extract(epoch FROM started_at - %s)::float8 FROM runs "
                    "WHERE started_at IS NOT NULL ORDER BY started_at",
                    [first],
                )
            ).fetchall()
    starts = [row[0] for row in rows]
    within = bisect.bisect_left(starts, args.seconds)
    most = max(bisect.bisect_left(starts, s + window_s) - i for i, s in enumerate(starts))
    labels = {"rate": args.rate, "processes": processes, "seconds": args.seconds}
    report("queues.rate.starts", within, "starts", **labels)
    report("queues.rate.expected", per_s * args.seconds, "starts", **labels)
    report("queues.rate.most_in_a_window", most, "starts", window_s=window_s, **labels)


async def part_rate(url: str, args: Any) -> None:
    for processes in [int(p) for p in args.rate_processes.split(",")]:
        for _ in range(args.rate_rounds):
            await rate_round(url, processes, args)


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--part", default="keys,plans,rate")
    parser.add_argument("--backlog", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="keys: also interleaved_batched, blocks_batched (the proposal)"
    )
    parser.add_argument("--plan-sizes", default="2000,20000,200000")
    parser.add_argument("--plan-claims", type=int, default=40)
    parser.add_argument("--plan-layouts", default="interleaved,blocks", help="also: onekey (one key for all runs)")
    parser.add_argument("--claim-limit", type=int, default=64)
    parser.add_argument("--show-plans", action="store_true")
    parser.add_argument("--claimcost-backlog", type=int, default=20000)
    parser.add_argument("--claimcost-claims", type=int, default=60)
    parser.add_argument("--claim-running", type=int, default=128)
    parser.add_argument("--rate", default="100/1s")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate-processes", default="1,4")
    parser.add_argument("--rate-rounds", type=int, default=1)
    args = parser.parse_args()
    if args.sqlite:
        parser.error("queues measures PostgreSQL only")
    parts = args.part.split(",")
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        if "keys" in parts:
            await part_keys(url, args)
        if "plans" in parts:
            await part_plans(url, args)
        if "rate" in parts:
            await part_rate(url, args)
        if "claimcost" in parts:
            await part_claimcost(url, args)


if __name__ == "__main__":
    asyncio.run(main())
