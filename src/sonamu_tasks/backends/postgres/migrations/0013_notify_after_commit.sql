-- A new run no longer NOTIFYs from an insert trigger: the process that inserts runs sends "a:" + workflow
-- itself, at most one NOTIFY in flight per process (PostgresBackend, backends/postgres/wakeups.py).
--
-- Why: a transaction that NOTIFYs takes PostgreSQL's notification queue lock (a heavyweight lock on the
-- database object, wait event Lock:object) at pre-commit and keeps it until its commit has been flushed. Every
-- run() was such a transaction, so at 32-64 producers committing at once their commits were serialized one
-- WAL flush after another instead of sharing flushes (group commit): measured with benchmarks/producer.py,
-- 77,333 of 79,031 samples of the producers' wait events were Lock:object at 64 in flight. The insert trigger
-- is dropped here.
--
-- What replaces it: a run() whose process has no NOTIFY in flight carries one in its own insert statement (no
-- extra round trip; its commit is the only one of the process that takes the lock). Otherwise, after the
-- insert has committed, the process adds the workflow to a set, and the set is sent once the NOTIFY in flight
-- is done: one statement, `pg_notify` for every workflow in the set, in a transaction of its own that does not
-- wait for the WAL flush (synchronous_commit off: a notification is not durable anyway), so that lock is held
-- for microseconds. run_many, children, forks and fired schedules use the set too. So a process has at most one
-- NOTIFY in flight, whatever its number of callers, and sends none for runs inserted already claimed by its
-- own worker (they need no worker woken).
--
-- No lost wake-up: a NOTIFY carried by the insert commits with it. Any other insert adds its workflow to the
-- set after its commit returned, and the set is sent by a NOTIFY statement that starts after that moment (the
-- one in flight may have started before; then the next one is sent after it). A worker hears a notification only after the NOTIFY committed, and claims with
-- a snapshot taken after that: the run is visible to it. A worker busy claiming when it arrives claims again
-- (its wake-up event stays set). What is not covered is a process that dies between its insert's commit and
-- its NOTIFY, or a failing NOTIFY (logged): then the workers' polling (poll_interval_ms, 5 s by default with
-- notifications), which reads each queue's next due time, finds the run. The same holds for a run whose start
-- time is in the future: as before, no notification is sent for it; the worker's claim loop sleeps until the
-- next due time it read.
--
-- Status changes keep their trigger (runs_notify_status): a run made pending again (a retry due now, a
-- released or resumed run, a parent woken by its child, a message or event arriving) and a watched finish
-- ("f:" + id, for result() and get_event waiters elsewhere) still notify in the transaction that makes them;
-- those are worker-side or rare. PostgreSQL sends identical notifications of one transaction once.

DROP TRIGGER runs_notify_insert ON runs;

-- A watched run that completes with a small output sends the output with its notification ("o:" + id + ":" +
-- output JSON, when the JSON takes at most 7,000 bytes; NOTIFY payloads are limited to 8,000): the result() waiting
-- in another process returns it without reading the run back, one round trip less after the last step. Larger
-- outputs, failures and cancels send "f:" + id as before, and the waiter reads the run.
CREATE OR REPLACE FUNCTION notify_run_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    output text;
BEGIN
    IF NEW.status = 'pending' AND NEW.available_at <= now() THEN
        PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'a:' || NEW.workflow_name);
    ELSIF NEW.status IN ('completed', 'failed', 'canceled') AND NEW.notify_finish THEN
        output := COALESCE(NEW.output::text, 'null');
        IF NEW.status = 'completed' AND octet_length(output) <= 7000 THEN
            PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'o:' || NEW.id::text || ':' || output);
        ELSE
            PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'f:' || NEW.id::text);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
