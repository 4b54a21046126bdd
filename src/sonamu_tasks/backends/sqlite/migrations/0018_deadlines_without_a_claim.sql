-- A run's deadline holds when no worker claims the run, and a cancel cascade reaches a child whose worker died
-- (see the PostgreSQL migration of the same name).
--
-- What every worker's look for overdue runs reads (overdue_run and fail_overdue_runs in queries.sql): pending runs
-- with a deadline, in deadline order; empty, the look costs one probe.
CREATE INDEX runs_overdue ON runs (deadline_at) WHERE status = 'pending' AND deadline_at IS NOT NULL;

-- The cancel cascade as cancel_run acts (backends/queries.sql): a running child under a live lease is asked to
-- stop; any other unfinished child, one whose worker's lease expired included, is canceled at once, its lease
-- token cleared. Same trigger otherwise (0004_children_and_waits.sql); NEW.updated_at is the transaction's clock.
DROP TRIGGER runs_cancel_children;
CREATE TRIGGER runs_cancel_children AFTER UPDATE OF status ON runs
    WHEN NEW.status = 'canceled' AND OLD.status IS NOT NEW.status
BEGIN
    UPDATE runs
    SET status = CASE WHEN status = 'running' AND available_at > NEW.updated_at THEN status ELSE 'canceled' END,
        requested_action = CASE WHEN status = 'running' AND available_at > NEW.updated_at THEN 'cancel' END,
        error = CASE WHEN status = 'running' AND available_at > NEW.updated_at THEN error
                     ELSE json_object('type', 'Canceled', 'message', 'canceled with its parent run ' || NEW.id) END,
        finished_at = CASE WHEN status = 'running' AND available_at > NEW.updated_at THEN NULL
                           ELSE NEW.updated_at END,
        lease_token = CASE WHEN status = 'running' AND available_at > NEW.updated_at THEN lease_token END,
        worker_id = CASE WHEN status = 'running' AND available_at > NEW.updated_at THEN worker_id END,
        updated_at = NEW.updated_at
    WHERE parent_id = NEW.id AND NOT detached
      AND status IN ('pending', 'running', 'sleeping', 'waiting', 'paused');
END;
