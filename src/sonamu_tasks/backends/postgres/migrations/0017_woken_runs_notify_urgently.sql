-- A waiting run made due now (a message, an event, a child's end woke it) is announced as "w:" + workflow
-- instead of "a:" + workflow. A worker claims at once on "w:", but only after `listen_delay` on "a:": that
-- delay batches the claims of new runs under load, while a woken run is one run the waiting promise says
-- resumes at once (with "a:" a message from another process waited out the delay). Messages and events send
-- theirs from the sending process (send_message, emit_event, Wakeups); this trigger sends it for a parent
-- woken by its child. Runs made due otherwise (handed back, retried, resumed, restarted) keep "a:".
-- A worker of an older release ignores "w:" and finds such runs by polling until it is upgraded.
CREATE OR REPLACE FUNCTION notify_run_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    output text;
BEGIN
    IF NEW.status = 'pending' AND NEW.available_at <= now() THEN
        IF current_setting('sonamu_tasks.wake_after_commit', true) IS DISTINCT FROM 'on' THEN
            PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA,
                              CASE WHEN OLD.status = 'waiting' THEN 'w:' ELSE 'a:' END
                              || NEW.workflow_name);
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
