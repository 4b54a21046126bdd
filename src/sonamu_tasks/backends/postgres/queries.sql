-- Every query the PostgreSQL backend runs, by name. Parameters are always bound, never formatted in.
-- Tables are unqualified: each connection's search_path is the configured schema.

-- create_run --
-- Insert a pending run; a repeated id or idempotency key inserts nothing.
INSERT INTO runs (id, workflow_name, version, status, input, idempotency_key, available_at, deadline_at,
                  parent_id, parent_step, detached)
VALUES (%(id)s, %(workflow_name)s, %(version)s, 'pending', %(input)s::jsonb, %(idempotency_key)s,
        COALESCE(%(start_at)s::timestamptz, now() + COALESCE(%(start_delay)s::interval, interval '0')),
        COALESCE(%(deadline_at)s::timestamptz, now() + %(deadline_delay)s::interval),
        %(parent_id)s::uuid, %(parent_step)s, %(detached)s)
ON CONFLICT DO NOTHING
RETURNING id::text

-- create_claimed_run --
-- Insert a run claimed at once by the worker of the process that starts it: one commit instead of an
-- insert, a notification and a claim. A repeated id or idempotency key inserts nothing.
INSERT INTO runs (id, workflow_name, version, status, input, idempotency_key, available_at, deadline_at,
                  lease_token, worker_id, started_at, parent_id, parent_step, detached)
VALUES (%(id)s, %(workflow_name)s, %(version)s, 'running', %(input)s::jsonb, %(idempotency_key)s,
        now() + %(lease)s::interval, COALESCE(%(deadline_at)s::timestamptz, now() + %(deadline_delay)s::interval),
        gen_random_uuid(), %(worker_id)s, now(), %(parent_id)s::uuid, %(parent_step)s, %(detached)s)
ON CONFLICT DO NOTHING
RETURNING id::text, workflow_name, version, input, attempts, recoveries, lease_token::text, now() AS claimed_at,
          true AS first_claim, deadline_at, requested_action

-- find_run_by_key --
-- The run a repeated create_run collided with.
SELECT id::text FROM runs WHERE idempotency_key = %(idempotency_key)s OR id = %(id)s

-- claim_runs --
-- Take up to `limit` due runs of the given workflows, oldest first; a run still "running" here had its
-- lease expire. Each workflow's queue is read in order from runs_claim_queue and the scan stops at
-- `limit`: the cost does not grow with the backlog. SKIP LOCKED lets concurrent claims pass each other.
WITH due AS (
    SELECT q.id, q.status AS previous_status, q.started_at IS NULL AS first_claim
    FROM unnest(%(names)s::text[], %(versions)s::text[]) AS w(name, version)
    CROSS JOIN LATERAL (
        SELECT id, status, started_at, available_at
        FROM runs
        WHERE workflow_name = w.name AND version = w.version
          AND status IN ('pending', 'running', 'sleeping', 'waiting')
          AND available_at <= now()
        ORDER BY available_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS q
    ORDER BY q.available_at
    LIMIT %(limit)s
)
UPDATE runs AS r
SET status = 'running',
    lease_token = gen_random_uuid(),
    worker_id = %(worker_id)s,
    available_at = now() + %(lease)s::interval,
    started_at = COALESCE(r.started_at, now()),
    recoveries = r.recoveries + CASE WHEN due.previous_status = 'running' THEN 1 ELSE 0 END,
    updated_at = now()
FROM due
WHERE r.id = due.id
RETURNING r.id::text, r.workflow_name, r.version, r.input, r.attempts, r.recoveries, r.lease_token::text,
          now() AS claimed_at, due.first_claim, r.deadline_at, r.requested_action

-- seconds_until_due --
-- How long until the next claimable run of these workflows is due: the head of each workflow's queue.
SELECT EXTRACT(EPOCH FROM min(head.available_at) - now())::float8
FROM unnest(%(names)s::text[], %(versions)s::text[]) AS w(name, version)
CROSS JOIN LATERAL (
    SELECT available_at
    FROM runs
    WHERE workflow_name = w.name AND version = w.version
      AND status IN ('pending', 'running', 'sleeping', 'waiting')
    ORDER BY available_at
    LIMIT 1
) AS head

-- heartbeat_runs --
-- Extend the leases this worker still holds; a missing token means the run was taken from it.
UPDATE runs
SET available_at = now() + %(lease)s::interval, updated_at = now()
WHERE (id, lease_token) IN (SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[]))
  AND status = 'running'
RETURNING lease_token::text, requested_action

-- touch_worker --
UPDATE workers SET heartbeat_at = now() WHERE id = %(worker_id)s

-- release_runs --
-- Hand runs back at once (graceful shutdown); the status trigger wakes the other workers.
UPDATE runs
SET status = 'pending', available_at = now(), lease_token = NULL, worker_id = NULL, updated_at = now()
WHERE (id, lease_token) IN (SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[]))
  AND status = 'running'

-- get_run --
SELECT id::text, workflow_name, version, status, input, output, error, attempts, recoveries, available_at,
       worker_id, idempotency_key, deadline_at, created_at, started_at, finished_at, updated_at,
       requested_action, parent_id::text, parent_step, detached
FROM runs WHERE id = %(run_id)s

-- load_steps --
SELECT name, kind, status, output, error, attempts, wake_at, started_at, finished_at
FROM steps WHERE run_id = %(run_id)s
ORDER BY started_at, name

-- lock_children --
-- The children a parent is about to wait for, locked (in id order, as the group commit locks runs) until the
-- parent has parked: a child's finishing transaction waits for that, and its trigger then finds the parent
-- waiting and wakes it. A child that finished before is seen here: the parent does not wait at all.
SELECT status FROM runs
WHERE id = ANY(%(children)s::uuid[])
ORDER BY id
FOR SHARE

-- park_run --
-- The run leaves its worker (no slot, no lease) until a wait is satisfied: its earliest sleep's wake time,
-- or a child finishing ('waiting', woken by the child's trigger). `ready`: a child it waits for finished
-- already, so it is due again at once. Sleeps are recorded as steps, with their wake times.
WITH sleeps AS (
    SELECT name, started_at, COALESCE(wake_at, now() + make_interval(secs => seconds)) AS wake_at
    FROM json_to_recordset(%(sleeps)s::json) AS w(name text, started_at timestamptz, seconds float8,
                                                    wake_at timestamptz)
), parked AS (
    UPDATE runs
    SET status = CASE WHEN %(ready)s THEN 'pending' WHEN %(on_children)s THEN 'waiting' ELSE 'sleeping' END,
        available_at = CASE WHEN %(ready)s THEN now()
                            ELSE COALESCE((SELECT min(wake_at) FROM sleeps), %(forever)s::timestamptz) END,
        lease_token = NULL, worker_id = NULL, updated_at = now()
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    RETURNING id, available_at
), recorded AS (
    INSERT INTO steps (run_id, name, kind, status, wake_at, attempts, started_at)
    SELECT parked.id, sleeps.name, 'sleep', 'sleeping', sleeps.wake_at, 1, sleeps.started_at FROM parked, sleeps
    ON CONFLICT (run_id, name) DO UPDATE SET wake_at = EXCLUDED.wake_at, status = 'sleeping'
)
SELECT available_at FROM parked

-- start_children --
-- A parent's step starts its children: the child runs and the parent's step record, in one statement,
-- only while the parent's claim owns it. A child that exists already (a replay) is left as it is.
WITH owned AS (
    SELECT id FROM runs
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    FOR NO KEY UPDATE
), children AS (
    INSERT INTO runs (id, workflow_name, version, status, input, available_at, parent_id, parent_step, detached)
    SELECT c.id, c.workflow_name, c.version, 'pending', c.input, now(), owned.id, c.parent_step, c.detached
    FROM owned, json_to_recordset(%(children)s::json)
         AS c(id uuid, workflow_name text, version text, input jsonb, parent_step text, detached boolean)
    ON CONFLICT DO NOTHING
), step AS (
    INSERT INTO steps (run_id, name, kind, status, output, attempts, started_at, finished_at)
    SELECT id, %(name)s, 'child', 'completed', %(output)s::jsonb, 1, %(started_at)s::timestamptz, now()
    FROM owned
    ON CONFLICT (run_id, name) DO NOTHING
)
SELECT count(*) FROM owned

-- load_children --
-- A parent's children as they stand: what its waits on them need.
SELECT id::text, status, output, error FROM runs WHERE parent_id = %(run_id)s

-- complete_sleep --
WITH owned AS (
    SELECT id FROM runs
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    FOR NO KEY UPDATE
)
UPDATE steps SET status = 'completed', finished_at = now()
FROM owned
WHERE steps.run_id = owned.id AND steps.name = %(name)s
RETURNING 1

-- write_runs --
-- The group commit: checkpoints and completions of several runs in one statement and one transaction. The
-- batch is one JSON array (one parameter). Each item is written only while its claim still owns the run;
-- the row lock orders it against a take-over. A row carries a step's checkpoint or the run's output
-- ("completes"); the rows of one run (its checkpoints, and the output when the workflow returned right after
-- them) are in one batch, so they are written together or not at all.
-- Returns the runs written.
WITH batch AS (
    SELECT *
    FROM json_to_recordset(%(batch)s::json)
         AS b(run_id uuid, lease_token uuid, step_name text, step_output jsonb, started_at timestamptz,
              finished_at timestamptz, completes boolean, output jsonb)
), owned AS (
    SELECT b.*
    FROM batch b JOIN runs r ON r.id = b.run_id
    WHERE r.lease_token = b.lease_token AND r.status = 'running'
    ORDER BY r.id
    FOR NO KEY UPDATE OF r
), checkpoints AS (
    INSERT INTO steps AS s (run_id, name, kind, status, output, attempts, started_at, finished_at)
    SELECT run_id, step_name, 'call', 'completed', step_output, 1, started_at, finished_at
    FROM owned WHERE step_name IS NOT NULL
    ON CONFLICT (run_id, name) DO UPDATE
    SET status = 'completed', output = EXCLUDED.output, error = NULL, attempts = s.attempts + 1,
        started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at
), completions AS (
    UPDATE runs AS r
    SET status = 'completed', output = o.output, error = NULL, lease_token = NULL, finished_at = now(),
        updated_at = now()
    FROM owned o
    WHERE r.id = o.run_id AND o.completes
)
SELECT run_id::text FROM owned

-- retry_run --
-- A failed attempt that will be retried: pending again after the delay.
UPDATE runs
SET status = 'pending', attempts = attempts + 1, error = %(error)s::jsonb,
    available_at = now() + %(delay)s::interval, lease_token = NULL, worker_id = NULL, updated_at = now()
WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
RETURNING 1

-- fail_run --
UPDATE runs
SET status = 'failed', attempts = attempts + 1, error = %(error)s::jsonb, lease_token = NULL,
    finished_at = now(), updated_at = now()
WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
RETURNING 1

-- record_step_failure --
-- Runs in the same transaction as retry_run/fail_run, after it has checked the lease.
INSERT INTO steps AS s (run_id, name, kind, status, error, attempts, started_at, finished_at)
VALUES (%(run_id)s, %(name)s, 'call', 'failed', %(error)s::jsonb, 1, %(started_at)s::timestamptz, now())
ON CONFLICT (run_id, name) DO UPDATE
SET status = 'failed', error = EXCLUDED.error, attempts = s.attempts + 1,
    started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at

-- register_worker --
INSERT INTO workers (id, host, pid, workflows, concurrency)
VALUES (%(id)s, %(host)s, %(pid)s, %(workflows)s::jsonb, %(concurrency)s)
ON CONFLICT (id) DO UPDATE
SET workflows = EXCLUDED.workflows, concurrency = EXCLUDED.concurrency, heartbeat_at = now()

-- remove_worker --
DELETE FROM workers WHERE id = %(worker_id)s

-- upsert_schedule --
-- A changed expression or timezone restarts the schedule from the new next fire; an unchanged one keeps
-- its place, so a restart at the fire moment skips nothing.
INSERT INTO schedules AS s (name, workflow_name, version, expression, timezone, input, next_fire_at)
VALUES (%(name)s, %(workflow_name)s, %(version)s, %(expression)s, %(timezone)s, %(input)s::jsonb,
        %(next_fire_at)s::timestamptz)
ON CONFLICT (name) DO UPDATE
SET workflow_name = EXCLUDED.workflow_name, version = EXCLUDED.version, input = EXCLUDED.input,
    expression = EXCLUDED.expression, timezone = EXCLUDED.timezone,
    next_fire_at = CASE WHEN (s.expression, s.timezone) = (EXCLUDED.expression, EXCLUDED.timezone)
                        THEN s.next_fire_at ELSE EXCLUDED.next_fire_at END,
    updated_at = now()

-- delete_stale_schedules --
-- Schedules of these workflows that the code no longer declares.
DELETE FROM schedules
WHERE workflow_name = ANY(%(workflows)s::text[]) AND NOT (name = ANY(%(keep)s::text[]))

-- list_schedules --
SELECT name, workflow_name, version, expression, timezone, input, next_fire_at, last_fire_at,
       last_run_id::text
FROM schedules ORDER BY name

-- advance_schedule --
-- Compare-and-set on next_fire_at: of the workers that read the same due time, exactly one advances it.
UPDATE schedules
SET next_fire_at = %(next_fire_at)s::timestamptz, last_fire_at = %(fire_at)s::timestamptz,
    last_run_id = %(run_id)s::uuid, updated_at = now()
WHERE name = %(name)s AND next_fire_at = %(expected)s::timestamptz
RETURNING name

-- list_runs --
-- Newest first; keyset pagination on the time-ordered id, so page N costs what page 1 costs.
SELECT id::text, workflow_name, version, status, input, output, error, attempts, recoveries, available_at,
       worker_id, idempotency_key, deadline_at, created_at, started_at, finished_at, updated_at,
       requested_action, parent_id::text, parent_step, detached
FROM runs
WHERE (%(workflow)s::text IS NULL OR workflow_name = %(workflow)s::text)
  AND (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(before_id)s::uuid IS NULL OR id < %(before_id)s::uuid)
  AND (%(parent_id)s::uuid IS NULL OR parent_id = %(parent_id)s::uuid)
  AND (%(created_after)s::timestamptz IS NULL OR created_at >= %(created_after)s::timestamptz)
  AND (%(created_before)s::timestamptz IS NULL OR created_at < %(created_before)s::timestamptz)
ORDER BY runs.id DESC
LIMIT %(limit)s

-- cancel_run --
-- Not running: canceled at once. Running: asked to stop at its next step boundary.
UPDATE runs
SET status = CASE WHEN status = 'running' THEN status ELSE 'canceled' END,
    requested_action = CASE WHEN status = 'running' THEN 'cancel' END,
    error = CASE WHEN status = 'running' THEN error ELSE %(error)s::jsonb END,
    finished_at = CASE WHEN status = 'running' THEN NULL ELSE now() END,
    lease_token = CASE WHEN status = 'running' THEN lease_token END,
    worker_id = CASE WHEN status = 'running' THEN worker_id END,
    updated_at = now()
WHERE id = %(run_id)s AND status IN ('pending', 'running', 'sleeping', 'waiting', 'paused')
RETURNING status

-- pause_run --
-- Not running: paused at once (it is not claimed until resumed). Running: at its next step boundary. A
-- waiting run is due at once when resumed: it replays and waits again for what has not happened yet.
UPDATE runs
SET status = CASE WHEN status = 'running' THEN status ELSE 'paused' END,
    requested_action = CASE WHEN status = 'running' THEN 'pause' END,
    available_at = CASE WHEN status = 'waiting' THEN now() ELSE available_at END,
    updated_at = now()
WHERE id = %(run_id)s AND status IN ('pending', 'running', 'sleeping', 'waiting')
  AND requested_action IS DISTINCT FROM 'cancel'
RETURNING status

-- resume_run --
-- A paused run is claimable again at its own time (now, or a later start, retry or wake time it had); a
-- pause not yet honoured is withdrawn.
UPDATE runs
SET status = CASE WHEN status = 'paused' THEN 'pending' ELSE status END,
    available_at = CASE WHEN status = 'paused' THEN GREATEST(available_at, now()) ELSE available_at END,
    requested_action = NULL,
    updated_at = now()
WHERE id = %(run_id)s AND (status = 'paused' OR (status = 'running' AND requested_action = 'pause'))
RETURNING status

-- restart_run --
-- A manual retry: a failed or canceled run starts again from its failed step, with its checkpoints and a
-- fresh retry budget.
UPDATE runs
SET status = 'pending', available_at = now(), attempts = 0, recoveries = 0, error = NULL,
    finished_at = NULL, requested_action = NULL, deadline_at = NULL, updated_at = now()
WHERE id = %(run_id)s AND status IN ('failed', 'canceled')
RETURNING status

-- run_status --
SELECT status FROM runs WHERE id = %(run_id)s

-- settle_request --
-- The worker honours a cancel or pause at a step boundary; fenced like every write of a claimed run.
UPDATE runs
SET status = CASE WHEN requested_action = 'cancel' THEN 'canceled' ELSE 'paused' END,
    error = CASE WHEN requested_action = 'cancel' THEN %(error)s::jsonb ELSE error END,
    finished_at = CASE WHEN requested_action = 'cancel' THEN now() END,
    requested_action = NULL, lease_token = NULL, worker_id = NULL, available_at = now(), updated_at = now()
WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
  AND requested_action IS NOT NULL
RETURNING status

-- list_workers --
SELECT id, host, pid, workflows, concurrency, started_at, heartbeat_at
FROM workers ORDER BY started_at

-- watch_run --
-- A result() waiter in another process asks for the "finished" notification of this run.
UPDATE runs SET notify_finish = true
WHERE id = %(run_id)s AND NOT notify_finish AND status NOT IN ('completed', 'failed', 'canceled')
