-- Cron schedules, kept in step with the code by synchronize().
-- next_fire_at is the compare-and-set token of a fire: a worker advances it from the value it read,
-- so however many workers tick at once, one of them fires each time.

CREATE TABLE schedules (
    name          text PRIMARY KEY,
    workflow_name text NOT NULL,
    version       text NOT NULL,
    expression    text NOT NULL,
    timezone      text NOT NULL,
    input         jsonb,                 -- the static input; a callable input is evaluated at each fire
    next_fire_at  timestamptz NOT NULL,
    last_fire_at  timestamptz,
    last_run_id   uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
