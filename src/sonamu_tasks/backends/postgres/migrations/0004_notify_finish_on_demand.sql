-- A NOTIFY costs its transaction a noticeable part of a commit. "Run finished" is only needed by a
-- result() waiting in another process (the finishing process wakes its own waiters directly), so it is
-- sent only for runs such a waiter asked to watch.

ALTER TABLE runs ADD COLUMN notify_finish boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION notify_run_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'pending' AND NEW.available_at <= now() THEN
        PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'a:' || NEW.workflow_name);
    ELSIF NEW.status IN ('completed', 'failed', 'canceled') AND NEW.notify_finish THEN
        PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'f:' || NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;
