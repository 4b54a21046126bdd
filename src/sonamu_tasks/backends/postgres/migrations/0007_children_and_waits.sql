-- Child workflows and durable waits on them.
--
-- A run may be started by another run's step (parent_id, parent_step; its id is derived from the two, so
-- a replay finds it instead of starting a second one). A parent blocked on its children parks as
-- 'waiting': no slot, no lease, available_at at its earliest timeout (far ahead when it has none). When
-- a child finishes, the same transaction makes a waiting parent pending and due now, and the status
-- trigger's NOTIFY wakes a worker. Canceling a run cancels its unfinished children that are not detached.

ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check CHECK (status IN
    ('pending', 'running', 'sleeping', 'waiting', 'paused', 'completed', 'failed', 'canceled'));
ALTER TABLE runs ADD COLUMN parent_id uuid;
ALTER TABLE runs ADD COLUMN parent_step text;
ALTER TABLE runs ADD COLUMN detached boolean NOT NULL DEFAULT false;

CREATE INDEX runs_by_parent ON runs (parent_id, id) WHERE parent_id IS NOT NULL;

ALTER TABLE steps DROP CONSTRAINT steps_kind_check;
ALTER TABLE steps ADD CONSTRAINT steps_kind_check CHECK (kind IN ('call', 'sleep', 'child'));

-- Waiting runs are claimable at their timeout: they join the claim queue.
CREATE INDEX runs_claim_queue_v2 ON runs (workflow_name, version, available_at)
    WHERE status IN ('pending', 'running', 'sleeping', 'waiting');
DROP INDEX runs_claim_queue;
ALTER INDEX runs_claim_queue_v2 RENAME TO runs_claim_queue;

CREATE FUNCTION wake_parent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE runs SET status = 'pending', available_at = now(), updated_at = now()
    WHERE id = NEW.parent_id AND status = 'waiting';
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_wake_parent AFTER UPDATE OF status ON runs
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('completed', 'failed', 'canceled'))
    EXECUTE FUNCTION wake_parent();

-- The same change cancel_run makes, applied to the children: a running child is asked to stop at its next
-- step boundary (its worker hears of it by the request trigger), any other unfinished one stops at once.
CREATE FUNCTION cancel_children() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE runs
    SET status = CASE WHEN status = 'running' THEN status ELSE 'canceled' END,
        requested_action = CASE WHEN status = 'running' THEN 'cancel' END,
        error = CASE WHEN status = 'running' THEN error
                     ELSE jsonb_build_object('type', 'Canceled',
                                             'message', 'canceled with its parent run ' || NEW.id::text) END,
        finished_at = CASE WHEN status = 'running' THEN NULL ELSE now() END,
        lease_token = CASE WHEN status = 'running' THEN lease_token END,
        worker_id = CASE WHEN status = 'running' THEN worker_id END,
        updated_at = now()
    WHERE parent_id = NEW.id AND NOT detached
      AND status IN ('pending', 'running', 'sleeping', 'waiting', 'paused');
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_cancel_children AFTER UPDATE OF status ON runs
    FOR EACH ROW
    WHEN (NEW.status = 'canceled' AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION cancel_children();
