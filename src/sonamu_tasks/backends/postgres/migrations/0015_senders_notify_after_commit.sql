-- A message or an event that wakes a waiting run no longer NOTIFYs inside the sender's transaction. As with
-- run() in 0013: a transaction that NOTIFYs holds PostgreSQL's notification queue lock from pre-commit until
-- its commit is flushed, so concurrent senders waking runs committed one flush after another. The sending
-- statements (send_message, emit_event in queries.sql) now set sonamu_tasks.wake_after_commit for their
-- transaction, return the workflows they woke, and the sending process notifies as it does for new runs
-- (backends/postgres/wakeups.py: carried by the statement when none of its NOTIFYs is in flight, otherwise one
-- coalesced NOTIFY after the commit). Every other way a run becomes due now (a retry, a resume, a parent woken
-- by its child) still notifies here, and so does a watched finish.
CREATE OR REPLACE FUNCTION notify_run_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    output text;
BEGIN
    IF NEW.status = 'pending' AND NEW.available_at <= now() THEN
        IF current_setting('sonamu_tasks.wake_after_commit', true) IS DISTINCT FROM 'on' THEN
            PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'a:' || NEW.workflow_name);
        END IF;
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
