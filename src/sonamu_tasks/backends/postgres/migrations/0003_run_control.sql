-- Cancel and pause of a running run: recorded as a request that its worker honours at the next step
-- boundary (a run that is not running is canceled or paused at once, by a status change).

ALTER TABLE runs ADD COLUMN requested_action text CHECK (requested_action IN ('cancel', 'pause'));

-- The worker holding the run hears of the request at once ("r:" + id), not at its next heartbeat.
CREATE FUNCTION notify_run_request() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'r:' || NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_notify_request AFTER UPDATE OF requested_action ON runs
    FOR EACH ROW WHEN (NEW.requested_action IS NOT NULL AND OLD.requested_action IS DISTINCT FROM NEW.requested_action)
    EXECUTE FUNCTION notify_run_request();
