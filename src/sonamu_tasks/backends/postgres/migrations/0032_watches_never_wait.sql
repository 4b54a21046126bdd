-- A watch (0031) no longer waits for a stripe's lock: it takes each stripe with a try, and the caller asks again
-- shortly for the runs of stripes held (backend.py, _watch_runs). An outside audit of 0031 found three costs of
-- the waiting watch:
--   - a waiting exclusive request makes every later shared request of its stripe queue behind it (PostgreSQL
--     grants in order), so a finish waited for an unrelated, still open finish of the same stripe: 3 s behind a
--     finish held open 3 s, and about 1 s (deadlock_timeout) when the open finish needed a row of the queued one;
--   - result(timeout=1) on a run completed long before timed out ("the database did not answer") while an
--     unrelated finish held the run's stripe open: the watch waited for the stripe before reading the status;
--   - a batch of waiting re-watches, one at a time, held up every caller of the batch.
-- Now a watcher never sits in a lock queue; finishes wait only for a watcher that holds a stripe, for the one
-- statement it holds it (the caller sends its COMMIT in the same round trip in transaction mode).
--
-- For a run of a held stripe the function reads the status without the lock: finished, it comes back neither
-- watched nor busy (the caller reads the run: it is finished, and committed); unfinished, it comes back busy,
-- and no watch is set (the caller asks again).

DROP FUNCTION watch_runs(uuid[], boolean);

CREATE FUNCTION watch_runs(p_ids uuid[]) RETURNS TABLE (run_id text, busy boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_schema integer := hashtext(current_schema());
    v_stripe integer;
    v_free integer[] := '{}';
BEGIN
    -- The watch is only a request to be told (lost in a crash, the waiter watches again when its listener
    -- reconnects): its commit need not wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_stripe IN SELECT DISTINCT watch_stripe(i) FROM unnest(p_ids) AS i ORDER BY 1 LOOP
        IF pg_try_advisory_xact_lock(v_schema, v_stripe) THEN
            v_free := v_free || v_stripe;
        END IF;
    END LOOP;
    -- A new statement, so a new snapshot, taken with the stripes held.
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
    SELECT r.id::text, true FROM runs r
    WHERE r.id = ANY (p_ids) AND watch_stripe(r.id) <> ALL (v_free)
      AND r.status NOT IN ('completed', 'failed', 'canceled');
END
$$;
