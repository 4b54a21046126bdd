-- The queries both backends run as written here: the run state machine's steering and fenced writes, and the
-- reads that are plain SQL in both dialects. Each backend's queries.sql has the rest (the statements its
-- dialect writes its own way: arrays, locking, time arithmetic, functions).
--
-- Written with SQLite's placeholders, `:name`, and the clock as `:now`: SQLite binds the one clock reading of
-- its write transaction; for PostgreSQL, `sql_files.shared_queries` turns `:now` into `now()` (the
-- transaction's start) and every other `:name` into psycopg's `%(name)s`. So no `%` and no `::` casts here, and
-- a literal in quotes is left as it is. A parameter's type comes from its column or comparison (psycopg sends a
-- str as `unknown`).

-- run_status --
SELECT status FROM runs WHERE id = :run_id

-- load_steps --
SELECT name, kind, status, output, error, attempts, wake_at, started_at, finished_at, waits_for
FROM steps WHERE run_id = :run_id
ORDER BY started_at, name

-- list_messages --
-- A run's unconsumed messages, oldest first (what `show` lists).
SELECT id, topic, payload, idempotency_key, created_at FROM messages
WHERE run_id = :run_id AND consumed_at IS NULL
ORDER BY id
LIMIT :limit

-- get_run_event --
-- A run's published value of `key` (found: false when not set), with the run's status.
SELECT r.status, e.run_id IS NOT NULL AS found, e.value
FROM runs r LEFT JOIN run_events e ON e.run_id = r.id AND e.key = :key
WHERE r.id = :run_id

-- list_run_events --
SELECT key, value, updated_at FROM run_events WHERE run_id = :run_id ORDER BY key

-- cancel_run --
-- Running under a live lease: asked to stop at its next step boundary. Otherwise canceled at once, a run left
-- 'running' by a worker whose lease expired (dead, or stalled) included: no worker may come back for it (its
-- version may have no worker left), and clearing its lease token shuts out a stalled one, as a take-over does.
UPDATE runs
SET status = CASE WHEN status = 'running' AND available_at > :now THEN status ELSE 'canceled' END,
    requested_action = CASE WHEN status = 'running' AND available_at > :now THEN 'cancel' END,
    error = CASE WHEN status = 'running' AND available_at > :now THEN error ELSE :error END,
    finished_at = CASE WHEN status = 'running' AND available_at > :now THEN NULL ELSE :now END,
    lease_token = CASE WHEN status = 'running' AND available_at > :now THEN lease_token END,
    worker_id = CASE WHEN status = 'running' AND available_at > :now THEN worker_id END,
    updated_at = :now
WHERE id = :run_id AND status IN ('pending', 'running', 'sleeping', 'waiting', 'paused')
RETURNING status

-- restart_run --
-- A manual retry: a failed or canceled run starts again from its failed step, with its checkpoints and a
-- fresh retry budget. A debounced run that never started goes back under its key only if no other run holds
-- the key meanwhile (one started while this one was canceled); otherwise it leaves the debounce and runs on
-- its own, the other run taking the key's later calls.
UPDATE runs
SET status = 'pending', available_at = :now, attempts = 0, recoveries = 0, error = NULL,
    finished_at = NULL, requested_action = NULL, deadline_at = NULL, updated_at = :now,
    debounce_key = CASE
        WHEN debounce_key IS NOT NULL AND started_at IS NULL AND EXISTS (
            SELECT 1 FROM runs AS holder
            WHERE holder.workflow_name = runs.workflow_name AND holder.debounce_key = runs.debounce_key
              AND holder.status = 'pending' AND holder.started_at IS NULL AND holder.id <> runs.id)
        THEN NULL ELSE debounce_key END
WHERE id = :run_id AND status IN ('failed', 'canceled')
RETURNING status

-- restart_children --
-- With restart_run, before it, in its transaction: a retried parent that was canceled gets back the attached
-- children canceled with it (and theirs, down the tree), so that its replay waits for them again instead of
-- reading their cancel as a failure. Canceled with it: canceled when it was or after; a child still running
-- toward the step boundary where it would stop (its cancel asked for, not yet honoured) has the request
-- withdrawn, as a resume withdraws a pause, and runs on (its worker, finding the request gone, hands it back
-- to be replayed). A child canceled before the parent, or a detached one, is left as it is. Returns their ids
-- and new statuses ('pending': restarted, restart_steps is run for it; 'running': only the request withdrawn).
UPDATE runs
SET status = CASE WHEN status = 'canceled' THEN 'pending' ELSE status END,
    available_at = CASE WHEN status = 'canceled' THEN :now ELSE available_at END,
    attempts = CASE WHEN status = 'canceled' THEN 0 ELSE attempts END,
    recoveries = CASE WHEN status = 'canceled' THEN 0 ELSE recoveries END,
    error = CASE WHEN status = 'canceled' THEN NULL ELSE error END,
    finished_at = CASE WHEN status = 'canceled' THEN NULL ELSE finished_at END,
    deadline_at = CASE WHEN status = 'canceled' THEN NULL ELSE deadline_at END,
    requested_action = NULL, updated_at = :now
WHERE id IN (
    WITH RECURSIVE canceled_with (id, status, finished_at) AS (
        SELECT c.id, c.status, c.finished_at
        FROM runs AS p JOIN runs AS c ON c.parent_id = p.id
        WHERE p.id = :run_id AND p.status = 'canceled' AND NOT c.detached
          AND ((c.status = 'canceled' AND c.finished_at >= p.finished_at)
               OR (c.status = 'running' AND c.requested_action = 'cancel'))
        UNION ALL
        SELECT c.id, c.status, c.finished_at
        FROM canceled_with AS p JOIN runs AS c ON c.parent_id = p.id
        WHERE p.status = 'canceled' AND NOT c.detached
          AND ((c.status = 'canceled' AND c.finished_at >= p.finished_at)
               OR (c.status = 'running' AND c.requested_action = 'cancel'))
    )
    SELECT id FROM canceled_with
)
RETURNING id, status

-- restart_steps --
-- With restart_run, in its transaction: the steps' retry budgets start afresh too. A step with a retry policy
-- of its own counts its failures in `attempts`; a failed step's count goes back to 0, a completed one's to 1
-- (its one execution that counts), so that the workflow's budget, which is the run's failed attempts less
-- those its steps' own policies took (attempt.py, _record_failure), starts at 0 as well.
UPDATE steps SET attempts = CASE WHEN status = 'failed' THEN 0 ELSE 1 END
WHERE run_id = :run_id AND kind = 'call' AND attempts <> CASE WHEN status = 'failed' THEN 0 ELSE 1 END

-- settle_request --
-- The worker honours a cancel or pause at a step boundary; fenced like every write of a claimed run.
UPDATE runs
SET status = CASE WHEN requested_action = 'cancel' THEN 'canceled' ELSE 'paused' END,
    error = CASE WHEN requested_action = 'cancel' THEN :error ELSE error END,
    finished_at = CASE WHEN requested_action = 'cancel' THEN :now END,
    requested_action = NULL, lease_token = NULL, worker_id = NULL, available_at = :now, updated_at = :now
WHERE id = :run_id AND lease_token = :lease_token AND status = 'running'
  AND requested_action IS NOT NULL
RETURNING status

-- resume_run --
-- A paused run is claimable again at its own time (now, or a later start, retry or wake time it had); a
-- pause not yet honoured is withdrawn, whatever the run's status (one an older release left stored on a
-- pending or parked run included). A debounced run that never started goes back under its key only if no
-- other run took the key while it was paused; otherwise it leaves the debounce and runs on its own (see
-- restart_run).
UPDATE runs
SET status = CASE WHEN status = 'paused' THEN 'pending' ELSE status END,
    available_at = CASE WHEN status = 'paused' AND available_at < :now THEN :now ELSE available_at END,
    requested_action = NULL,
    debounce_key = CASE
        WHEN status = 'paused' AND debounce_key IS NOT NULL AND started_at IS NULL AND EXISTS (
            SELECT 1 FROM runs AS holder
            WHERE holder.workflow_name = runs.workflow_name AND holder.debounce_key = runs.debounce_key
              AND holder.status = 'pending' AND holder.started_at IS NULL AND holder.id <> runs.id)
        THEN NULL ELSE debounce_key END,
    updated_at = :now
WHERE id = :run_id
  AND (status = 'paused'
       OR (requested_action = 'pause' AND status IN ('pending', 'running', 'sleeping', 'waiting')))
RETURNING status

-- retry_run --
-- A failed attempt that will be retried: pending again after the delay. A cancel or pause asked for during the
-- attempt is honoured here, at this boundary, instead of after the delay: canceled (with the cancel's error; the
-- status triggers cancel its children and wake its waiters), or paused keeping the retry time, so a resume makes
-- it due then and not before (the backoff still holds), with the attempt's error to show.
UPDATE runs
SET status = CASE requested_action WHEN 'cancel' THEN 'canceled' WHEN 'pause' THEN 'paused' ELSE 'pending' END,
    attempts = attempts + 1,
    error = CASE WHEN requested_action = 'cancel' THEN :canceled_error ELSE :error END,
    finished_at = CASE WHEN requested_action = 'cancel' THEN :now END,
    requested_action = NULL,
    available_at = :now + :delay, lease_token = NULL, worker_id = NULL, updated_at = :now
WHERE id = :run_id AND lease_token = :lease_token AND status = 'running'
RETURNING status

-- fail_run --
-- The last attempt failed: a cancel or pause asked for meanwhile has nothing left to stop, and is dropped.
UPDATE runs
SET status = 'failed', attempts = attempts + 1, error = :error, lease_token = NULL, requested_action = NULL,
    finished_at = :now, updated_at = :now
WHERE id = :run_id AND lease_token = :lease_token AND status = 'running'
RETURNING status

-- mark_forked --
-- A fork continues the source's work: it counts as started, so its first attempt reads the checkpoints it got.
UPDATE runs SET started_at = created_at, forked_from = :source_id, forked_step = :from_step WHERE id = :new_id

-- unpark_queue --
-- Every run parked behind a full key of this queue goes back to the claim, which parks again what must wait.
UPDATE runs SET key_parked = false
WHERE queue = :name AND key_parked AND status IN ('pending', 'running', 'sleeping', 'waiting')

-- touch_worker --
UPDATE workers SET heartbeat_at = :now WHERE id = :worker_id

-- remove_worker --
DELETE FROM workers WHERE id = :worker_id

-- list_workers --
-- With the runs each executes now (its slots in use): running runs are few (at most the fleet's slots).
SELECT w.id, w.host, w.pid, w.workflows, w.concurrency, w.started_at, w.heartbeat_at, w.queues,
       COALESCE(r.running, 0) AS running
FROM workers w
LEFT JOIN (SELECT worker_id, count(*) AS running FROM runs WHERE status = 'running' GROUP BY worker_id) r
       ON r.worker_id = w.id
ORDER BY w.started_at

-- list_retention --
-- Every retention declared: one row per (workflow, version) declared (NULL: declared none, the default applies),
-- and the row an older release stored for a workflow by name (0010/0007), until a version of it is declared here.
SELECT workflow_name, seconds FROM workflow_version_retention
UNION ALL
SELECT o.workflow_name, o.seconds FROM workflow_retention o
WHERE NOT EXISTS (SELECT 1 FROM workflow_version_retention v WHERE v.workflow_name = o.workflow_name)
ORDER BY workflow_name
