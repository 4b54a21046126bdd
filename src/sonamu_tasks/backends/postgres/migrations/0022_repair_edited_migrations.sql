-- Repairs for databases migrated by a version of a migration file that was edited after its commit. A
-- migration is applied once, by name: an edit never reaches a database that already has it, so editing one
-- was a mistake, undone here (and not made again: a change is a new file).
--
-- 0012_queues.sql, as first committed (6ce133b), created lock_queue(); its later version creates
-- queue_lock_key(), which release_key_slot (0019) and claim_runs (0020) call. A database first migrated by
-- that first version had no queue_lock_key: the start failed in register_queues, every run with a
-- concurrency key failed as it left 'running', and claims of limited queues failed. Created here as in 0012.
CREATE OR REPLACE FUNCTION queue_lock_key(queue_name text) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT hashtextextended(current_schema() || '/queue/' || queue_name, 0)
$$;

-- 0019_key_slot_freed_notifies_urgently.sql was edited (0e0570c) to break ties of available_at by id; a
-- database migrated by its first version kept the function without the tie-break. Its final text, again.
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
