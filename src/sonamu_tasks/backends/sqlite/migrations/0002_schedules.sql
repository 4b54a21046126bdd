-- Cron schedules, kept in step with the code by synchronize().
-- next_fire_at is the compare-and-set token of a fire: a worker advances it from the value it read,
-- so however many workers tick at once, one of them fires each time.

CREATE TABLE schedules (
    name          TEXT PRIMARY KEY,
    workflow_name TEXT NOT NULL,
    version       TEXT NOT NULL,
    expression    TEXT NOT NULL,
    timezone      TEXT NOT NULL,
    input         TEXT,                  -- the static input; a callable input is evaluated at each fire
    next_fire_at  INTEGER NOT NULL,
    last_fire_at  INTEGER,
    last_run_id   TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
