-- A result() or get_event waiting in another process no longer locks the run's row to ask for its
-- notification. The watch was `UPDATE runs SET notify_finish = true`, whose row lock a claim met at the worst
-- moment: run() then result() watches the run just as a worker claims it, and the claim (FOR UPDATE SKIP LOCKED)
-- passed the locked row over. That run then started after the run behind it (FIFO within a priority broken,
-- documented until now), and the worker looked again a claim later: 5-8% of the runs of the cross-process
-- latency harness, which is its p99.
--
-- A watch is now a row of run_watches, and no lock on `runs` at all. What the row lock gave, that a finish
-- never misses a watch set as it finishes, is now an advisory lock per stripe of runs, taken in this order:
--   watch_runs (the watcher): the stripe's lock exclusively; then, with a snapshot taken after it (a new
--     statement), the run unfinished? insert its watch; commit (without waiting for the WAL flush, as before).
--   a finish (notify_run_change) or a set_event: the stripe's lock shared; then, in a new statement, is there a
--     watch (or the old flag)? notify.
-- Whichever takes the stripe first, the other sees its work: a watcher first, the finish waits for its commit
-- (microseconds) and finds its watch; a finish first, the watcher waits for the finish's commit and finds the
-- run finished (it reads the run). Finishes never wait for each other (shared), only for a watcher of the
-- same stripe.
--
-- Stripes, not one lock per run: a transaction finishing many runs (a cancel cascading to 10,000 children)
-- holds one lock per stripe, at most 256, whatever its size, so it cannot fill PostgreSQL's lock table. Two runs
-- of one stripe only make a watcher wait for the other's finish to commit. The key space is the two-integer one
-- (the schema's hash, the stripe), which no other lock of the engine uses.
--
-- Deadlock: a finish takes its stripes in the order its rows change (a cascade is not in id order), so a
-- watcher never waits while it holds a stripe: watch_runs takes each stripe with a try when it watches several
-- runs, and reports the runs of stripes it could not take as busy (a finish holds them); the caller watches
-- each of those alone, where waiting holds nothing.
--
-- What it costs: every finish now runs this trigger (0006 had spared unwatched finishes that call): the shared
-- lock and one index probe of run_watches, which holds only the watches in flight. The watch's own row moves to
-- run_watches and is deleted by the finish it waited for.
--
-- notify_finish stays: a waiter of the previous release (during a rolling deploy) still sets it, and a finish
-- still notifies for it.

CREATE TABLE run_watches (
    -- No foreign key: its check would lock the run's row (FOR KEY SHARE), which a claim skips too.
    run_id uuid PRIMARY KEY
);

CREATE FUNCTION watch_stripe(p_run uuid) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtext(p_run::text) & 255
$$;

-- The runs of p_ids that are unfinished and now watched by this call. With p_wait (one run), the stripe's lock
-- is waited for; otherwise a run whose stripe is held comes back with busy = true, not watched.
CREATE FUNCTION watch_runs(p_ids uuid[], p_wait boolean) RETURNS TABLE (run_id text, busy boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_schema integer := hashtext(current_schema());
    v_stripe integer;
    v_free integer[] := '{}';
BEGIN
    -- The flag is only a request to be told (lost in a crash, the waiter watches again when its listener
    -- reconnects): its commit need not wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_stripe IN SELECT DISTINCT watch_stripe(i) FROM unnest(p_ids) AS i ORDER BY 1 LOOP
        IF p_wait THEN
            PERFORM pg_advisory_xact_lock(v_schema, v_stripe);
            v_free := v_free || v_stripe;
        ELSIF pg_try_advisory_xact_lock(v_schema, v_stripe) THEN
            v_free := v_free || v_stripe;
        END IF;
    END LOOP;
    -- A new statement, so a new snapshot: a finish that held a stripe above has committed and is seen.
    RETURN QUERY
    WITH inserted AS (
        INSERT INTO run_watches (run_id)
        SELECT r.id FROM runs r
        WHERE r.id = ANY (p_ids) AND watch_stripe(r.id) = ANY (v_free)
          AND r.status NOT IN ('completed', 'failed', 'canceled')
        ON CONFLICT DO NOTHING
        RETURNING run_watches.run_id
    )
    SELECT i.run_id::text, false FROM inserted i
    UNION ALL
    SELECT i::text, true FROM unnest(p_ids) AS i WHERE watch_stripe(i) <> ALL (v_free);
END
$$;

-- Is this run watched (a get_event elsewhere waits on it)? Taken under the stripe's shared lock, read after it:
-- what set_run_event asks before it notifies.
CREATE FUNCTION run_watched(p_run uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext(current_schema()), watch_stripe(p_run));
    RETURN EXISTS (SELECT 1 FROM run_watches w WHERE w.run_id = p_run);
END
$$;

-- 0017's function; a finish now looks for a watch under the stripe's shared lock, and removes it.
CREATE OR REPLACE FUNCTION notify_run_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    output text;
    watched boolean;
BEGIN
    IF NEW.status = 'pending' AND NEW.available_at <= now() THEN
        IF current_setting('sonamu_tasks.wake_after_commit', true) IS DISTINCT FROM 'on' THEN
            PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA,
                              CASE WHEN OLD.status = 'waiting' THEN 'w:' ELSE 'a:' END
                              || NEW.workflow_name);
        END IF;
    ELSIF NEW.status IN ('completed', 'failed', 'canceled') THEN
        PERFORM pg_advisory_xact_lock_shared(hashtext(TG_TABLE_SCHEMA), watch_stripe(NEW.id));
        DELETE FROM run_watches w WHERE w.run_id = NEW.id;
        watched := FOUND OR NEW.notify_finish;
        IF watched THEN
            output := COALESCE(NEW.output::text, 'null');
            IF NEW.status = 'completed' AND octet_length(output) <= 7000 THEN
                PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'o:' || NEW.id::text || ':' || output);
            ELSE
                PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'f:' || NEW.id::text);
            END IF;
        END IF;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER runs_notify_status ON runs;
CREATE TRIGGER runs_notify_status AFTER UPDATE OF status ON runs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('pending', 'completed', 'failed', 'canceled'))
    EXECUTE FUNCTION notify_run_change();
