-- The run a freed key slot goes to: ties of available_at by id, as the claim's (0012_claim_fifo_by_id.sql), so
-- that the runs of one key created together (one run_many, run() calls in one transaction) start in creation
-- order. Same trigger otherwise (0009_queues.sql).
DROP TRIGGER runs_release_key_slot;
CREATE TRIGGER runs_release_key_slot AFTER UPDATE OF status ON runs
    WHEN OLD.status = 'running' AND NEW.status <> 'running' AND NEW.concurrency_key IS NOT NULL
BEGIN
    UPDATE runs SET key_parked = 0
    WHERE id = (SELECT id FROM runs
                WHERE queue = NEW.queue AND concurrency_key = NEW.concurrency_key AND key_parked
                  AND status IN ('pending', 'running', 'sleeping', 'waiting')
                ORDER BY priority, available_at, id
                LIMIT 1);
END;
