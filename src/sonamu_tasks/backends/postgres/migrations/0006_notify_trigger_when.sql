-- The status trigger runs its function only for the changes that may notify: a run becoming pending, or
-- finishing while a result() elsewhere watches it. A claim (to running) and an unwatched finish no longer
-- call into PL/pgSQL for nothing, one call per row at every claim and completion.

DROP TRIGGER runs_notify_status ON runs;
CREATE TRIGGER runs_notify_status AFTER UPDATE OF status ON runs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          AND (NEW.status = 'pending'
               OR (NEW.status IN ('completed', 'failed', 'canceled') AND NEW.notify_finish)))
    EXECUTE FUNCTION notify_run_change();
