-- Runs, their step checkpoints, and the workers that execute them.
-- Runs in the schema named by the configuration (search_path is set to it).

CREATE TABLE runs (
    id              uuid PRIMARY KEY,                 -- time-ordered (UUIDv7): newest first by id
    workflow_name   text NOT NULL,
    version         text NOT NULL,
    status          text NOT NULL CHECK (status IN
                        ('pending', 'running', 'sleeping', 'paused', 'completed', 'failed', 'canceled')),
    input           jsonb,
    output          jsonb,
    error           jsonb,
    attempts        integer NOT NULL DEFAULT 0,       -- failed attempts only
    recoveries      integer NOT NULL DEFAULT 0,       -- take-overs after a lease expired
    -- When the run may next be claimed; its meaning follows the status: start or retry time (pending),
    -- lease expiry (running), wake time (sleeping).
    available_at    timestamptz NOT NULL DEFAULT now(),
    lease_token     uuid,                             -- the fencing token of the current claim
    worker_id       text,
    idempotency_key text UNIQUE,
    deadline_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The claim reads only unfinished runs, so its cost does not grow with the finished ones.
CREATE INDEX runs_claimable ON runs (available_at)
    WHERE status IN ('pending', 'running', 'sleeping');
CREATE INDEX runs_by_workflow ON runs (workflow_name, id DESC);
CREATE INDEX runs_by_status ON runs (status, id DESC);

CREATE TABLE steps (
    run_id      uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('call', 'sleep')),
    status      text NOT NULL CHECK (status IN ('completed', 'failed', 'sleeping')),
    output      jsonb,
    error       jsonb,
    attempts    integer NOT NULL DEFAULT 1,
    wake_at     timestamptz,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE workers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    workflows    jsonb NOT NULL,
    concurrency  integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Wake-ups travel with the write that causes them, in the same transaction: a run that becomes
-- claimable now ("a:" + workflow) and a run that finishes ("f:" + id, for result() waiters).
CREATE FUNCTION notify_run_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'pending' AND NEW.available_at <= now() THEN
        PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'a:' || NEW.workflow_name);
    ELSIF NEW.status IN ('completed', 'failed', 'canceled') THEN
        PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'f:' || NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_notify_insert AFTER INSERT ON runs
    FOR EACH ROW EXECUTE FUNCTION notify_run_change();
CREATE TRIGGER runs_notify_status AFTER UPDATE OF status ON runs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION notify_run_change();
