"""The `composition` chaos scenario: gathered steps and child workflows under kill -9.

Three workers (lease 1.5 s, concurrency 4) run `comp_parent` (chaos/workflows.py): three steps gathered with
a child started and awaited in the same gather, one child by `start_workflow`, a fan-out by
`start_workflows`, every child awaited together, then a last step. Each child (`comp_child`) gathers two
steps and runs a third. Every 0.3-1.2 s a random worker gets `kill -9` and is restarted at once.

Counted with the runner's rules (`runner.tally`, over parents and children), plus:

* lost: a parent or a child without a final status by the deadline (a parent that never started some of
  its children leaves them missing: counted as lost too);
* duplicate children: child runs beyond one per (parent_id, parent_step), beyond one per logical child
  (the parent and step its input names), a child attached to another parent or step than its input names,
  and a child step executed by more than one child run of the same logical child;
* wrong outputs: a completed parent whose output is not the sum its children must give.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from . import workflows
from .runner import FINAL, Context, Summary, ensure_schema, start_runs, status_counts, tally


async def composition(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("composition")
    await ensure_schema(ctx, schema)
    parents = 30 if ctx.short else 150
    fan = 4 if ctx.short else 8
    per_parent = fan + 2  # inline, solo, fan[0..fan-1]
    workers = [ctx.worker(schema, f"w{i}", workflows_="comp_parent,comp_child", lease_ms=1500) for i in range(3)]
    disturbed: set[int] = set()
    work_ms = 50
    ids = await start_runs(ctx, schema, workflows.comp_parent, [{"fan": fan, "work_ms": work_ms}] * parents)
    expected_runs = parents * (1 + per_parent)
    rng = random.Random(11)
    deadline = time.monotonic() + (60 if ctx.short else 600)
    kills = 0
    finished = False
    while time.monotonic() < deadline:
        counts = await asyncio.to_thread(status_counts, ctx, schema)
        if sum(counts[s] for s in FINAL) >= expected_runs:
            finished = True
            break
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        victim = rng.choice(workers)
        disturbed.add(victim.pid)
        victim.kill()
        victim.start()
        kills += 1
    # The last kill's runs are taken over after their lease: let them finish without more kills.
    settle = time.monotonic() + 60
    while not finished and time.monotonic() < settle:
        counts = await asyncio.to_thread(status_counts, ctx, schema)
        finished = sum(counts[s] for s in FINAL) >= expected_runs
        await asyncio.sleep(0.5)
    summary.details.append(f"kill -9 sent: {kills}; runs by status: {dict(status_counts(ctx, schema))}")
    taken_over = ctx.query(
        f"SELECT parent_id IS NULL, count(*) FILTER (WHERE recoveries > 0), sum(recoveries)"
        f' FROM "{schema}".runs GROUP BY 1'
    )
    for is_parent, runs, recoveries in sorted(taken_over, reverse=True):
        kind = "parents" if is_parent else "children"
        summary.details.append(f"{kind} taken over after a kill: {runs} ({recoveries} take-overs)")

    children = ctx.query(
        f'SELECT id::text, parent_id::text, parent_step, input FROM "{schema}".runs WHERE parent_id IS NOT NULL'
    )
    child_ids = [str(row[0]) for row in children]
    tally(ctx, summary, schema, ids + child_ids, disturbed)
    missing = expected_runs - len(ids) - len(child_ids)
    if missing > 0:  # children a parent never started: its work is lost too
        summary.lost += missing
        summary.details.append(f"children never started: {missing}")
    _count_duplicates(ctx, summary, schema, ids, children, per_parent)
    _check_outputs(ctx, summary, schema, ids, fan)


def _count_duplicates(
    ctx: Context, summary: Summary, schema: str, parent_ids: list[str], children: list[tuple[Any, ...]], per_parent: int
) -> None:
    duplicates = 0
    by_step: dict[tuple[str, str], list[str]] = {}
    by_input: dict[tuple[str, str], list[str]] = {}
    for child_id, parent_id, parent_step, input in children:
        by_step.setdefault((parent_id, parent_step), []).append(child_id)
        by_input.setdefault((input["parent"], input["key"]), []).append(child_id)
        if (parent_id, parent_step) != (input["parent"], input["key"]):
            duplicates += 1
            summary.details.append(f"child {child_id} is ({parent_id}, {parent_step}), its input says {input}")
    for label, groups in (("(parent_id, parent_step)", by_step), ("logical child", by_input)):
        for key, runs in groups.items():
            if len(runs) > 1:
                duplicates += len(runs) - 1
                summary.details.append(f"{len(runs)} child runs for one {label} {key}: {runs}")
    per_parent_counts = {parent_id: 0 for parent_id in parent_ids}
    for parent_id, _ in by_step:
        per_parent_counts[parent_id] = per_parent_counts.get(parent_id, 0) + 1
    too_many = {p: n for p, n in per_parent_counts.items() if n > per_parent}
    if too_many:
        duplicates += sum(n - per_parent for n in too_many.values())
        summary.details.append(f"parents with more than {per_parent} child steps: {too_many}")
    # A step of one logical child executed by two child runs: the work was done twice.
    shared = ctx.query(
        f"SELECT r.input->>'parent', r.input->>'key', a.step, count(DISTINCT a.run_id) FROM \"{schema}\".runs r"
        " JOIN public.chaos_audit a ON a.run_id = r.id AND a.scenario = %s"
        " WHERE r.parent_id IS NOT NULL GROUP BY 1, 2, 3 HAVING count(DISTINCT a.run_id) > 1",
        [schema],
    )
    for parent, key, step, runs in shared:
        duplicates += int(runs) - 1
        summary.details.append(f"child step {step!r} of ({parent}, {key}) executed by {runs} child runs")
    summary.details.append(f"child runs: {len(children)}; duplicate_children={duplicates}")
    if duplicates:
        summary.problems.append(f"{duplicates} duplicate children")


def _check_outputs(ctx: Context, summary: Summary, schema: str, parent_ids: list[str], fan: int) -> None:
    expected = 3 * (1 + 2 + sum(10 + i for i in range(fan)))
    rows = ctx.query(
        f"SELECT id::text, output FROM \"{schema}\".runs WHERE status = 'completed' AND id = ANY(%s::uuid[])",
        [parent_ids],
    )
    wrong = [(run_id, output) for run_id, output in rows if output != expected]
    if wrong:
        summary.problems.append(f"{len(wrong)} parents with a wrong output (expected {expected})")
        summary.details.append(f"wrong outputs (first 5): {wrong[:5]}")
