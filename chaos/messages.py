"""The `messages` chaos scenario: runs waiting for messages sent from another process, under kill -9 and
PostgreSQL restarts.

Three workers (lease 1.5 s, concurrency 4) run N `msg_collector` runs (chaos/workflows.py; N = 500 long /
60 short): each receives M messages on topic "t" (M = 3 / 2), each followed by an audited 200 ms step that
records what the receive returned (public.chaos_received), then one message on topic "u". A sender process
(`python -m chaos.messages PLAN OUT`, a WorkflowManager without a worker) sends them in waves: wave j holds
message j on "t" for every run, in random order, at most 8 sends at a time; each run's "u" message goes into
a random wave (so it often waits unconsumed behind the "t" ones); half the messages carry an idempotency key
and are sent twice, the copy at the same moment as the original or in a later wave. Long: each wave's sends
are spread over 4 s, one wave after another, so the sender is sending through every restart; short: each
wave at once, 3 s apart. Meanwhile a random worker gets `kill -9` every 0.4-1.2 s and is restarted at once,
and PostgreSQL is restarted (long: fast, immediate, fast, immediate, 4 s apart; short: immediate once, in
the pause after the first wave). The sender writes what every send returned (OUT, one JSON line each).

Counted with the runner's rules (`runner.tally`: lost runs, audited steps re-executed after their
checkpoint), plus, for the messages (a message is known by its payload `{"to": run, "topic": t, "seq": j}`):

* stored_twice: messages with more than one row in the messages table (a keyed copy stored, or a send
  retried after its commit's answer was lost);
* lost: messages a send acknowledged (True, or False for a repeated key) with no row, and consumed rows
  whose receive step (`consumed_by`) holds another value: taken but never delivered;
* never_consumed: rows still unconsumed when every run has finished;
* consumed_twice: a message held by more than one receive, counting both the receive steps' checkpoints
  and the audit steps' records (a re-executed audit step of the same receive is not a second consumption);
* wrong outputs: a completed run whose output is not its messages in order ([t0, t1, ..., u]), and audit
  records that do not hold the message their receive should have returned;
* keys accepted twice: a keyed message whose two sends both returned True.
Any of these is a problem that fails the scenario.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sonamu_tasks import InvalidValue, WorkflowManager, define_config

from . import workflows
from .runner import FINAL, ROOT, Context, Summary, ensure_schema, start_runs, status_counts, tally

SENDER_CONCURRENCY = 8

Key = tuple[str, str, int]  # (run, topic, seq): one message


async def messages(ctx: Context, summary: Summary) -> None:
    schema = ctx.schema_for("messages")
    await ensure_schema(ctx, schema)
    ctx.query(workflows.RECEIVED_DDL)
    count = 60 if ctx.short else 500
    per_run = 2 if ctx.short else 3
    restarts = ["immediate"] if ctx.short else ["fast", "immediate", "fast", "immediate"]
    # Short: each wave at once, 3 s between waves. Long: each wave's sends spread over 4 s, no pause between
    # waves, so the sender is always sending, through every restart.
    pause, spread = (3.0, 0.0) if ctx.short else (0.0, 4.0)
    workers = [ctx.worker(schema, f"w{i}", workflows_="msg_collector", lease_ms=1500) for i in range(3)]
    ids = await start_runs(ctx, schema, workflows.msg_collector, [{"messages": per_run, "work_ms": 200}] * count)
    rng = random.Random(17)
    waves = _plan(ids, per_run, rng)
    plan_path, out_path = ctx.log_dir / f"{schema}-plan.json", ctx.log_dir / f"{schema}-sent.jsonl"
    plan_path.write_text(json.dumps({"waves": waves, "pause": pause, "spread": spread}))
    sender = _start_sender(ctx, schema, plan_path, out_path)

    began = time.monotonic()
    restart_at = [began + 1.5 + i * 4.0 for i in range(len(restarts))]
    deadline = began + (60 if ctx.short else 600)
    kills, finished = 0, False
    while time.monotonic() < deadline:
        finished = sender.poll() is not None and await _all_finished(ctx, schema, count)
        if finished:
            break
        await asyncio.sleep(rng.uniform(0.4, 1.2))
        if restarts and _restart_due(ctx, out_path, restart_at[0]):
            mode, _ = restarts.pop(0), restart_at.pop(0)
            took = time.monotonic()
            await asyncio.to_thread(ctx.cluster.restart, mode)
            summary.details.append(f"restart {mode} at {took - began:.1f}s: {time.monotonic() - took:.1f}s")
            continue
        victim = rng.choice(workers)
        victim.kill()
        victim.start()
        kills += 1
    settle = time.monotonic() + 60  # the last kill's runs are taken over after their lease: no more chaos
    while not finished and time.monotonic() < settle:
        await asyncio.sleep(0.5)
        finished = sender.poll() is not None and await _all_finished(ctx, schema, count)
    if sender.poll() is None:
        sender.kill()
        summary.problems.append("the sender did not finish by the deadline")
    elif sender.returncode != 0:
        summary.problems.append(f"the sender exited with {sender.returncode} (log: {out_path}.log)")
    summary.details.append(
        f"kill -9 sent: {kills}; {_sending_summary(out_path)}; runs by status: {dict(status_counts(ctx, schema))}"
    )
    taken = ctx.query(f'SELECT count(*) FILTER (WHERE recoveries > 0), sum(recoveries) FROM "{schema}".runs')[0]
    summary.details.append(f"runs taken over after a kill: {taken[0]} ({taken[1]} take-overs)")
    tally(ctx, summary, schema, ids, None)  # PostgreSQL restarts: any process may be interrupted
    _check(ctx, summary, schema, ids, per_run, waves, out_path)


def _plan(ids: list[str], per_run: int, rng: random.Random) -> list[list[list[Any]]]:
    """The sender's waves: sends [run, topic, seq, idempotency key or None, copy]."""
    waves: list[list[list[Any]]] = [[] for _ in range(per_run + 1)]
    for run in ids:
        messages = [("t", seq, seq) for seq in range(per_run)] + [("u", 0, rng.randrange(per_run + 1))]
        for topic, seq, at in messages:
            keyed = rng.random() < 0.5
            key = f"{topic}-{seq}" if keyed else None
            waves[at].append([run, topic, seq, key, 0])
            if keyed:
                waves[rng.randrange(at, per_run + 1)].append([run, topic, seq, key, 1])
    for wave in waves:
        rng.shuffle(wave)
    return waves


def _start_sender(ctx: Context, schema: str, plan: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CHAOS_URL": ctx.cluster.url, "CHAOS_SCHEMA": schema}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(f"{out}.log", "wb") as log:
        command = [sys.executable, "-m", "chaos.messages", str(plan), str(out)]
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


async def _all_finished(ctx: Context, schema: str, count: int) -> bool:
    try:
        counts = await asyncio.to_thread(status_counts, ctx, schema)
    except Exception:  # the server is restarting: look again
        return False
    return sum(counts[s] for s in FINAL) >= count


def _restart_due(ctx: Context, out: Path, at: float) -> bool:
    """Long: at its time, whatever the sender is doing. Short: at its time once the sender finished its first
    wave, so the restart falls in the pause before the next one (a send made while the server is down stalls
    30 s: docs/reliability.md, "Messages")."""
    if time.monotonic() < at:
        return False
    return not ctx.short or any("wave_done" in line for line in _lines(out))


def _lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def _sends(out: Path) -> list[dict[str, Any]]:
    return [line for line in _lines(out) if "wave_done" not in line]


def _sending_summary(out: Path) -> str:
    sends = _sends(out)
    if not sends:
        return "no sends"
    raised = sum(len(line["errors"]) for line in sends)
    slowest = max(line["took"] for line in sends)
    span = max(line["at"] for line in sends) - min(line["at"] - line["took"] for line in sends)
    return f"sending took {span:.1f}s, slowest send {slowest:.1f}s, sends that raised and were repeated: {raised}"


def _payload(key: Key) -> dict[str, Any]:
    return {"to": key[0], "topic": key[1], "seq": key[2]}


def _key(payload: Any) -> Key | None:
    if not isinstance(payload, dict) or set(payload) != {"to", "topic", "seq"}:
        return None
    return (str(payload["to"]), str(payload["topic"]), int(payload["seq"]))


def _check(
    ctx: Context,
    summary: Summary,
    schema: str,
    ids: list[str],
    per_run: int,
    waves: list[list[list[Any]]],
    out: Path,
) -> None:
    """The message counts of the module doc, into `summary`."""
    problems: Counter[str] = Counter()
    planned = {(run, topic, seq): key for wave in waves for run, topic, seq, key, _ in wave}
    results: dict[Key, list[Any]] = {}
    sends = 0
    for sent in _sends(out):
        sends += 1
        results.setdefault((sent["run"], sent["topic"], sent["seq"]), []).append(sent["result"])
    errors = sum(1 for rs in results.values() for r in rs if r is None)  # raised 5 times
    refused = sum(1 for rs in results.values() for r in rs if isinstance(r, str))  # sent after the run completed

    rows = ctx.query(
        f'SELECT run_id::text, topic, payload, consumed_at IS NOT NULL, consumed_by FROM "{schema}".messages'
    )
    stored: dict[Key, int] = Counter()
    receives = {
        (str(run), str(name)): output
        for run, name, output in ctx.query(
            f'SELECT run_id::text, name, output FROM "{schema}".steps WHERE kind = %s AND status = %s',
            ["receive", "completed"],
        )
    }
    for run, topic, payload, consumed, consumed_by in rows:
        key = _key(payload)
        if key is None or key[0] != run or key[1] != topic or key not in planned:
            problems["stored but never sent"] += 1
            summary.details.append(f"unexpected message row: run {run} topic {topic} payload {payload}")
            continue
        stored[key] += 1
        if not consumed:
            problems["never_consumed"] += 1
        elif receives.get((run, str(consumed_by)), object()) != payload:
            problems["lost (consumed, but its receive holds another value)"] += 1
            summary.details.append(
                f"consumed by {consumed_by} of {run}, which holds {receives.get((run, str(consumed_by)))!r}: {payload}"
            )
    for key, key_ in planned.items():
        if stored[key] > 1:
            problems[f"stored_twice ({'keyed' if key_ else 'no key'})"] += stored[key] - 1
            summary.details.append(f"stored {stored[key]} times: {_payload(key)}, sends returned {results.get(key)}")
        acknowledged = [r for r in results.get(key, []) if isinstance(r, bool)]
        if stored[key] == 0 and acknowledged:
            problems["lost (acknowledged, not stored)"] += 1
        if stored[key] == 0 and not acknowledged:
            summary.details.append(f"never sent (every send failed): {_payload(key)} {results.get(key)}")
        if key_ is not None and acknowledged.count(True) > 1:
            problems["keys accepted twice"] += 1

    # Consumptions: receive checkpoints, and audit records (step a{i} records what r{i} returned).
    holders: dict[Key, set[tuple[str, str]]] = {}
    for (run, name), output in receives.items():
        key = _key(output)
        if key is not None:
            holders.setdefault(key, set()).add((run, name))
    audits = ctx.query("SELECT run_id::text, step, message FROM public.chaos_received WHERE scenario = %s", [schema])
    for run, step, message in audits:
        index = int(str(step)[1:])
        if message != _payload((str(run), "t", index)):
            problems["audit records of another message"] += 1
            summary.details.append(f"audit step {step} of {run} recorded {message}")
        key = _key(message)
        if key is not None:
            holders.setdefault(key, set()).add((str(run), f"r{index}"))
    for key, where in holders.items():
        if len(where) > 1:
            problems["consumed_twice"] += len(where) - 1
            summary.details.append(f"consumed by {len(where)} receives: {_payload(key)} {sorted(where)}")

    outputs = ctx.query(
        f"SELECT id::text, output FROM \"{schema}\".runs WHERE status = 'completed' AND id = ANY(%s::uuid[])", [ids]
    )
    for run, output in outputs:
        expected = [_payload((str(run), "t", seq)) for seq in range(per_run)] + [_payload((str(run), "u", 0))]
        if output != expected:
            problems["wrong outputs"] += 1
            summary.details.append(f"run {run} returned {output}")
        keys = [_key(item) for item in output or []]
        if len(set(keys)) < len(keys):
            problems["outputs holding a duplicate"] += 1

    keyed = sum(1 for key_ in planned.values() if key_ is not None)
    repeats = [rs for key, rs in results.items() if planned.get(key) is not None and len(rs) > 1]
    summary.details.append(
        f"messages: {len(planned)} ({keyed} with an idempotency key, each sent twice); sends: {sends}"
        f" (errors {errors}, refused as the run had completed {refused}); rows stored: {sum(stored.values())};"
        f" consumed: {sum(1 for r in rows if r[3])};"
        f" repeated keys answered False: {sum(1 for rs in repeats if False in rs)} of {len(repeats)}"
    )
    summary.details.append(
        "message counts: "
        + ", ".join(
            f"{label}={problems[label]}"
            for label in ("never_consumed", "consumed_twice", "wrong outputs", "lost (acknowledged, not stored)")
        )
    )
    for label, n in problems.items():
        if n:
            summary.problems.append(f"{label}: {n}")


# --- the sender process -------------------------------------------------------------------------------------


async def send_all(plan: Path, out: Path) -> None:
    """Send the waves of `plan` (see `_plan`), writing each send's result to `out` (one JSON line each)."""
    spec = json.loads(plan.read_text())
    config = define_config(
        database_url=os.environ["CHAOS_URL"], schema=os.environ["CHAOS_SCHEMA"], tasks={"enable_worker": False}
    )
    limit = asyncio.Semaphore(SENDER_CONCURRENCY)
    with open(out, "w") as sink:

        def write(line: dict[str, Any]) -> None:
            sink.write(json.dumps({**line, "at": time.time()}) + "\n")
            sink.flush()

        async def one(
            manager: WorkflowManager, delay: float, run: str, topic: str, seq: int, key: str | None, copy: int
        ) -> None:
            await asyncio.sleep(delay)
            async with limit:
                began, errors, result = time.monotonic(), [], None
                for _ in range(5):  # a send that raised is sent again (manager.send itself retries the same way)
                    try:
                        result = await manager.send(run, _payload((run, topic, seq)), topic=topic, idempotency_key=key)
                        break
                    except InvalidValue as refused:  # a copy after the run completed: an answer, nothing stored
                        result = "refused: the run is completed" if "is completed" in str(refused) else None
                        errors.append(repr(refused)[:300])
                        if result is not None:
                            break
                    except Exception as error:
                        errors.append(repr(error)[:300])
                took = time.monotonic() - began
                write(
                    {
                        "run": run,
                        "topic": topic,
                        "seq": seq,
                        "key": key,
                        "copy": copy,
                        "result": result,
                        "errors": errors,
                        "took": took,
                    }
                )

        async with WorkflowManager(config) as manager:
            for index, wave in enumerate(spec["waves"]):
                if index:
                    await asyncio.sleep(spec["pause"])
                gap = spec["spread"] / max(1, len(wave))
                await asyncio.gather(*(one(manager, i * gap, *send) for i, send in enumerate(wave)))
                write({"wave_done": index})


if __name__ == "__main__":
    asyncio.run(send_all(Path(sys.argv[1]), Path(sys.argv[2])))
