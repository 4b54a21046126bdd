-- A run that leaves 'running' frees its concurrency key's slot and un-parks the next run waiting for the key
-- (0012_queues.sql). That run waited already, for a slot, as a waiting run waits for a message: it is announced
-- as "w:" + workflow (claimed at once, 0017_woken_runs_notify_urgently.sql), no longer "a:" (claimed after
-- `listen_delay`), which made every hand-over of a key between processes take the whole delay (500 ms by
-- default: 20 one-step runs of one key took 10 s). Ties of available_at go by id (runs created together, in
-- creation order: see 0020_claim_fifo_by_id.sql). Same function otherwise.
CREATE OR REPLACE FUNCTION release_key_slot() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    next_id uuid;
    next_workflow text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(queue_lock_key(NEW.queue));
    SELECT id, workflow_name INTO next_id, next_workflow
    FROM runs
    WHERE queue = NEW.queue AND concurrency_key = NEW.concurrency_key AND key_parked
      AND status IN ('pending', 'running', 'sleeping', 'waiting')
    ORDER BY priority, available_at, id  -- FIFO among runs due at the same moment, as the claim (0020)
    LIMIT 1
    FOR UPDATE SKIP LOCKED;  -- a row locked elsewhere is left to the claim's periodic sweep
    IF next_id IS NOT NULL THEN
        UPDATE runs SET key_parked = false WHERE id = next_id;
        PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'w:' || next_workflow);
    END IF;
    RETURN NULL;
END
$$;
