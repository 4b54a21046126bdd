-- A run's deadline holds when no worker claims the run, and a cancel cascade reaches a child whose worker died.
--
-- Deadlines. Until now a deadline was checked only by the claim (and the retry decision, and a parked run's wake
-- time), so a pending run that no worker claimed stayed pending past its deadline: forever for a version no live
-- worker serves, until a slot freed behind a full queue. Every worker now fails, about once a second, the pending
-- runs whose deadline passed (fail_overdue_runs in queries.sql), whatever their workflow, version or queue. This
-- index is what that look reads: only pending runs with a deadline, in deadline order, so when nothing is overdue
-- the look is one probe of an empty range of a small index, however many runs wait or are finished. A paused run
-- is not in it (a person paused it; the claim fails it once it is resumed), nor a parked one (it is due by its
-- deadline at the latest, and a worker serving it fails it then). Building it reads the runs table once.
CREATE INDEX runs_overdue ON runs (deadline_at) WHERE status = 'pending' AND deadline_at IS NOT NULL;

-- The cancel cascade (0007's cancel_children) only asked a running child to stop at its next step boundary, even
-- when the child's lease had expired: with its worker dead and no live worker of its version, the child stayed
-- 'running' with a request forever. It now does what cancel_run does (backends/queries.sql): a child running
-- under a live lease is asked; any other unfinished child, one whose lease expired included, is canceled at once,
-- and clearing its lease token shuts out a worker that was only stalled, as a take-over does.
CREATE OR REPLACE FUNCTION cancel_children() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE runs
    SET status = CASE WHEN status = 'running' AND available_at > now() THEN status ELSE 'canceled' END,
        requested_action = CASE WHEN status = 'running' AND available_at > now() THEN 'cancel' END,
        error = CASE WHEN status = 'running' AND available_at > now() THEN error
                     ELSE jsonb_build_object('type', 'Canceled',
                                             'message', 'canceled with its parent run ' || NEW.id::text) END,
        finished_at = CASE WHEN status = 'running' AND available_at > now() THEN NULL ELSE now() END,
        lease_token = CASE WHEN status = 'running' AND available_at > now() THEN lease_token END,
        worker_id = CASE WHEN status = 'running' AND available_at > now() THEN worker_id END,
        updated_at = now()
    WHERE parent_id = NEW.id AND NOT detached
      AND status IN ('pending', 'running', 'sleeping', 'waiting', 'paused');
    RETURN NULL;
END
$$;
