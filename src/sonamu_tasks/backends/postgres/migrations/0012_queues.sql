-- Queues and flow control: limits the claim enforces for the whole fleet.
--
-- Every run belongs to a queue ('default' unless its workflow or run() names another). A queue's limits
-- live in `queues` (written by synchronize(), read by every claim, so a changed limit holds at the next
-- claim of every worker). The claim is the function `claim_runs` below: one call, one round trip, with
-- the limits checked in the same transaction that takes the runs.
--
-- Why a function: a limited queue's claims must take turns (two claims counting 19 of 20 running must not
-- both take one), so the claim locks the queue first. In READ COMMITTED a statement sees the database as
-- of its own start, so the counts have to be read by statements that start after the lock is granted:
-- PL/pgSQL gives each statement a fresh snapshot.

CREATE TABLE queues (
    name                text PRIMARY KEY,
    concurrency         integer CHECK (concurrency > 0),
    worker_concurrency  integer CHECK (worker_concurrency > 0),
    rate_limit          integer CHECK (rate_limit > 0),
    rate_period         interval CHECK (rate_period > interval '0'),
    per_key_concurrency integer CHECK (per_key_concurrency > 0),
    swept_at            timestamptz NOT NULL DEFAULT now(),  -- the last look for parked runs with a free key
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_limit IS NULL) = (rate_period IS NULL))
);
INSERT INTO queues (name) VALUES ('default');

-- The queue each registered workflow declares: a run started by name from a process that does not have the
-- definition still lands in its workflow's queue.
CREATE TABLE workflow_queues (
    workflow_name text NOT NULL,
    version       text NOT NULL,
    queue         text NOT NULL,
    PRIMARY KEY (workflow_name, version)
);

-- Starts of rate-limited queues, kept for one window: the sliding window counts them.
CREATE TABLE queue_starts (
    queue      text NOT NULL,
    started_at timestamptz NOT NULL
);
CREATE INDEX queue_starts_by_queue ON queue_starts (queue, started_at);

ALTER TABLE runs
    ADD COLUMN queue text NOT NULL DEFAULT 'default',
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN concurrency_key text,
    ADD COLUMN debounce_key text,
    -- Due, but its concurrency key was full when a claim came to it: out of the claim index until a run of
    -- the key leaves 'running' (the trigger below), so a claim never walks past it again.
    ADD COLUMN key_parked boolean NOT NULL DEFAULT false;

-- The claim reads one ordered stream per (queue, workflow, version), a priority level at a time: within a
-- level the due runs come first in available_at order and the scan stops at the first one not due, so
-- sleeping and waiting runs are never walked (see claim_runs).
CREATE INDEX runs_claim_queue_v3 ON runs (queue, workflow_name, version, priority, available_at)
    WHERE status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT key_parked;
DROP INDEX runs_claim_queue;
ALTER INDEX runs_claim_queue_v3 RENAME TO runs_claim_queue;

-- What the limits count: the runs executing now, per queue and key (no more rows than the fleet's slots).
CREATE INDEX runs_executing ON runs (queue, concurrency_key) WHERE status = 'running';
CREATE INDEX runs_key_parked ON runs (queue, concurrency_key, priority, available_at)
    WHERE key_parked AND status IN ('pending', 'running', 'sleeping', 'waiting');
-- One open debounced run per (workflow, key): a run() with the key updates it instead of adding one.
CREATE UNIQUE INDEX runs_debounce ON runs (workflow_name, debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'pending' AND started_at IS NULL;

-- Claims of a limited queue take turns on this lock (exclusive); a run leaving a key's slot takes it shared,
-- so it waits for a claim in progress (and a claim for it) but never for another release. Deadlocks: a
-- release holds at most shared locks, which never wait for each other; a claim waits only for the first
-- queue lock it takes and merely tries the others (a busy one is skipped and tried again at the next claim).
CREATE FUNCTION queue_lock_key(queue_name text) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT hashtextextended(current_schema() || '/queue/' || queue_name, 0)
$$;

-- A run with a concurrency key leaves 'running' (finished, parked, handed back): the oldest run parked on
-- its key goes back into the claim index, and a worker is told. Under the queue lock: a claim parking a
-- run of the key at this moment either committed before (the run is found here) or starts its counts
-- after this transaction commits (and sees the slot free).
CREATE FUNCTION release_key_slot() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    next_id uuid;
    next_workflow text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(queue_lock_key(NEW.queue));
    SELECT id, workflow_name INTO next_id, next_workflow
    FROM runs
    WHERE queue = NEW.queue AND concurrency_key = NEW.concurrency_key AND key_parked
      AND status IN ('pending', 'running', 'sleeping', 'waiting')
    ORDER BY priority, available_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED;  -- a row locked elsewhere is left to the claim's periodic sweep
    IF next_id IS NOT NULL THEN
        UPDATE runs SET key_parked = false WHERE id = next_id;
        PERFORM pg_notify('sonamu_tasks:' || TG_TABLE_SCHEMA, 'a:' || next_workflow);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_release_key_slot AFTER UPDATE OF status ON runs
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status <> 'running' AND NEW.concurrency_key IS NOT NULL)
    EXECUTE FUNCTION release_key_slot();

-- The claim's write: the runs chosen (locked by the caller), leased to p_worker under fresh fencing tokens; a
-- run that was still 'running' had its lease expire, and its take-over counts as a recovery.
CREATE FUNCTION take_runs(p_worker text, p_lease interval, p_now timestamptz, p_ids uuid[], p_previous text[],
                          p_first boolean[])
RETURNS TABLE (id text, workflow_name text, version text, input jsonb, attempts integer, recoveries integer,
               lease_token text, claimed_at timestamptz, first_claim boolean, deadline_at timestamptz,
               requested_action text, trace_context jsonb)
LANGUAGE sql AS $$
    UPDATE runs AS r
    SET status = 'running',
        lease_token = gen_random_uuid(),
        worker_id = p_worker,
        available_at = p_now + p_lease,
        started_at = COALESCE(r.started_at, p_now),
        recoveries = r.recoveries + CASE WHEN t.previous = 'running' THEN 1 ELSE 0 END,
        updated_at = p_now
    FROM unnest(p_ids, p_previous, p_first) AS t(id, previous, first_claim)
    WHERE r.id = t.id
    RETURNING r.id::text, r.workflow_name, r.version, r.input, r.attempts, r.recoveries, r.lease_token::text,
              p_now, t.first_claim, r.deadline_at, r.requested_action, r.trace_context
$$;

-- Take up to p_limit due runs for p_worker from the queues it serves (in the order given: the worker
-- rotates it, so no queue starves another) and the workflows it registers.
--
-- Per queue, a priority level at a time (lower first; FIFO within a level): the level's due runs are read
-- from runs_claim_queue per (queue, workflow, version) and merged by available_at. Limits:
--   concurrency / worker_concurrency: runs of the queue executing with a live lease (all workers / this
--     one); a killed worker's runs count until their lease expires, then they are claimable themselves.
--   rate_limit: claims of pending runs (first starts and retries; not resumptions after a wait) in the
--     sliding window ending now, counted in queue_starts; the claim's clock is read after the queue lock,
--     so starts are recorded in the order the claims took turns.
--   per_key_concurrency: a due run whose key is full is parked (key_parked) instead of being walked past
--     at every claim; the trigger above brings it back.
CREATE FUNCTION claim_runs(p_worker text, p_queues text[], p_names text[], p_versions text[], p_limit integer,
                           p_lease interval)
RETURNS TABLE (id text, workflow_name text, version text, input jsonb, attempts integer, recoveries integer,
               lease_token text, claimed_at timestamptz, first_claim boolean, deadline_at timestamptz,
               requested_action text, trace_context jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_queue text;
    v_limits queues%ROWTYPE;
    v_limited boolean;
    v_one_by_one boolean;
    v_now timestamptz;
    v_cap integer;
    v_budget integer;
    v_level bigint;
    v_taken integer := 0;
    v_count integer;
    v_holding boolean := false;  -- a queue lock is held: take no other one by waiting for it
    v_take uuid[];               -- the runs a pass takes, in order, and the status each had
    v_previous text[];
    v_first boolean[];
    v_keys text[];               -- their concurrency keys (a pass counts its own takes per key)
    v_park uuid[];
    v_starts integer;            -- pending runs among them: starts for the rate window
    v_parked_total integer := 0;
    v_ids uuid[];                -- a pass's candidates, in order: their status, first claim, key
    v_statuses text[];
    v_firsts boolean[];
    v_candidate_keys text[];
BEGIN
    FOREACH v_queue IN ARRAY p_queues LOOP
        EXIT WHEN v_taken >= p_limit;
        v_cap := p_limit - v_taken;
        v_budget := NULL;
        SELECT * INTO v_limits FROM queues WHERE name = v_queue;
        v_limited := FOUND AND (v_limits.concurrency IS NOT NULL OR v_limits.worker_concurrency IS NOT NULL
                                OR v_limits.rate_limit IS NOT NULL OR v_limits.per_key_concurrency IS NOT NULL);
        v_one_by_one := v_limited AND (v_limits.rate_limit IS NOT NULL OR v_limits.per_key_concurrency IS NOT NULL);
        IF v_limited THEN
            IF NOT v_holding THEN
                PERFORM pg_advisory_xact_lock(queue_lock_key(v_queue));
                v_holding := true;
            ELSIF NOT pg_try_advisory_xact_lock(queue_lock_key(v_queue)) THEN
                CONTINUE;
            END IF;
            v_now := clock_timestamp();
            IF v_limits.concurrency IS NOT NULL THEN
                SELECT v_limits.concurrency - count(*) INTO v_count FROM runs r
                WHERE r.queue = v_queue AND r.status = 'running' AND r.available_at > v_now;
                v_cap := least(v_cap, v_count);
            END IF;
            IF v_limits.worker_concurrency IS NOT NULL THEN
                SELECT v_limits.worker_concurrency - count(*) INTO v_count FROM runs r
                WHERE r.queue = v_queue AND r.status = 'running' AND r.available_at > v_now
                  AND r.worker_id = p_worker;
                v_cap := least(v_cap, v_count);
            END IF;
            IF v_limits.rate_limit IS NOT NULL THEN
                DELETE FROM queue_starts s WHERE s.queue = v_queue AND s.started_at <= v_now - v_limits.rate_period;
                SELECT v_limits.rate_limit - count(*) INTO v_budget FROM queue_starts s WHERE s.queue = v_queue;
            END IF;
            IF v_limits.per_key_concurrency IS NOT NULL AND v_limits.swept_at < v_now - interval '5 seconds' THEN
                -- The safety net of the trigger (which skips a parked run locked at that moment): bring back
                -- the oldest parked run of every key with a free slot.
                UPDATE queues SET swept_at = v_now WHERE name = v_queue;
                UPDATE runs SET key_parked = false
                WHERE runs.id IN (
                    SELECT DISTINCT ON (p.concurrency_key) p.id
                    FROM runs p
                    WHERE p.queue = v_queue AND p.key_parked
                      AND p.status IN ('pending', 'running', 'sleeping', 'waiting')
                      AND (SELECT count(*) FROM runs x
                           WHERE x.queue = v_queue AND x.concurrency_key = p.concurrency_key
                             AND x.status = 'running' AND x.available_at > v_now) < v_limits.per_key_concurrency
                    ORDER BY p.concurrency_key, p.priority, p.available_at);
            END IF;
        ELSE
            v_now := now();
        END IF;
        CONTINUE WHEN v_cap <= 0;

        v_level := -2147483649;  -- below every integer priority
        LOOP
            -- The next priority level in use: one index probe per stream.
            SELECT min(head.priority) INTO v_level
            FROM unnest(p_names, p_versions) AS w(name, version)
            CROSS JOIN LATERAL (
                SELECT r.priority FROM runs r
                WHERE r.queue = v_queue AND r.workflow_name = w.name AND r.version = w.version
                  AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
                  AND r.priority > v_level
                ORDER BY r.priority
                LIMIT 1
            ) AS head;
            EXIT WHEN v_level IS NULL;

            -- One statement reads a pass's candidates (locked, in available_at order). Without a per-key or
            -- rate limit they are all taken. Otherwise each is weighed in turn against its key and the rate
            -- budget; the runs taken are written together at the end of the pass, and so are the ones parked.
            -- Another pass follows only if some were parked (they left the index, so it reads further), never
            -- over the same runs again. At most 500 are parked per claim: one hot key's long backlog is set
            -- aside over several claims, each of a bounded cost.
            LOOP
                SELECT array_agg(d.id ORDER BY d.available_at), array_agg(d.status ORDER BY d.available_at),
                       array_agg(d.started_at IS NULL ORDER BY d.available_at),
                       array_agg(d.concurrency_key ORDER BY d.available_at)
                INTO v_ids, v_statuses, v_firsts, v_candidate_keys
                FROM (
                    SELECT c.*
                    FROM unnest(p_names, p_versions) AS w(name, version)
                    CROSS JOIN LATERAL (
                        SELECT r.id, r.status, r.started_at, r.available_at, r.concurrency_key FROM runs r
                        WHERE r.queue = v_queue AND r.workflow_name = w.name AND r.version = w.version
                          AND r.priority = v_level
                          AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
                          AND r.available_at <= v_now
                        ORDER BY r.available_at
                        LIMIT v_cap
                        FOR UPDATE SKIP LOCKED
                    ) AS c
                    ORDER BY c.available_at
                    -- All taken: as many as the cap. Weighed: every stream's candidates (some may be passed).
                    LIMIT CASE WHEN v_one_by_one THEN NULL ELSE v_cap END
                ) AS d;
                EXIT WHEN v_ids IS NULL;
                v_park := '{}';
                v_starts := 0;
                IF NOT v_one_by_one THEN
                    v_take := v_ids;
                    v_previous := v_statuses;
                    v_first := v_firsts;
                ELSE
                    v_take := '{}';
                    v_previous := '{}';
                    v_first := '{}';
                    v_keys := '{}';
                    FOR i IN 1 .. cardinality(v_ids) LOOP
                        EXIT WHEN cardinality(v_take) >= v_cap OR v_parked_total >= 500;
                        CONTINUE WHEN v_statuses[i] = 'pending' AND v_budget IS NOT NULL AND v_starts >= v_budget;
                        IF v_limits.per_key_concurrency IS NOT NULL AND v_candidate_keys[i] IS NOT NULL THEN
                            SELECT count(*) INTO v_count FROM runs r
                            WHERE r.queue = v_queue AND r.concurrency_key = v_candidate_keys[i]
                              AND r.status = 'running' AND r.available_at > v_now;
                            v_count := v_count + cardinality(array_positions(v_keys, v_candidate_keys[i]));
                            IF v_count >= v_limits.per_key_concurrency THEN
                                v_park := v_park || v_ids[i];
                                v_parked_total := v_parked_total + 1;
                                CONTINUE;
                            END IF;
                        END IF;
                        v_take := v_take || v_ids[i];
                        v_previous := v_previous || v_statuses[i];
                        v_first := v_first || v_firsts[i];
                        v_keys := v_keys || v_candidate_keys[i];
                        IF v_statuses[i] = 'pending' THEN
                            v_starts := v_starts + 1;
                        END IF;
                    END LOOP;
                    IF cardinality(v_park) > 0 THEN
                        UPDATE runs r SET key_parked = true WHERE r.id = ANY (v_park);
                    END IF;
                END IF;
                IF cardinality(v_take) > 0 THEN
                    RETURN QUERY SELECT * FROM take_runs(p_worker, p_lease, v_now, v_take, v_previous, v_first);
                    v_taken := v_taken + cardinality(v_take);
                    v_cap := v_cap - cardinality(v_take);
                    IF v_budget IS NOT NULL AND v_starts > 0 THEN
                        v_budget := v_budget - v_starts;
                        INSERT INTO queue_starts (queue, started_at)
                        SELECT v_queue, v_now FROM generate_series(1, v_starts);
                    END IF;
                END IF;
                EXIT WHEN cardinality(v_park) = 0 OR v_cap <= 0 OR v_parked_total >= 500;
            END LOOP;
            EXIT WHEN v_cap <= 0;
        END LOOP;
    END LOOP;
END
$$;

-- How long until a claim of these queues and workflows could take a run: the earliest due head of each
-- (queue, workflow, version) stream, a priority level at a time; for a queue whose rate window is full,
-- not before the window's oldest start leaves it. NULL: nothing to wait for.
CREATE FUNCTION seconds_until_due(p_queues text[], p_names text[], p_versions text[]) RETURNS float8
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_queue text;
    v_limits queues%ROWTYPE;
    v_level bigint;
    v_head timestamptz;
    v_due timestamptz;
    v_earliest timestamptz;
    v_window_full_until timestamptz;
BEGIN
    FOREACH v_queue IN ARRAY p_queues LOOP
        v_level := -2147483649;
        v_due := NULL;
        LOOP
            SELECT min(head.priority), min(head.available_at) INTO v_level, v_head
            FROM unnest(p_names, p_versions) AS w(name, version)
            CROSS JOIN LATERAL (
                SELECT r.priority, r.available_at FROM runs r
                WHERE r.queue = v_queue AND r.workflow_name = w.name AND r.version = w.version
                  AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
                  AND r.priority > v_level
                ORDER BY r.priority, r.available_at
                LIMIT 1
            ) AS head;
            EXIT WHEN v_level IS NULL;
            -- min(available_at) over the heads of several streams may mix levels: a level's head is the
            -- least available_at of that level only, so take the least of the heads seen at every level.
            v_due := least(v_due, v_head);
            EXIT WHEN v_due <= now();
        END LOOP;
        CONTINUE WHEN v_due IS NULL;
        SELECT * INTO v_limits FROM queues WHERE name = v_queue;
        IF FOUND AND v_limits.rate_limit IS NOT NULL THEN
            SELECT s.started_at + v_limits.rate_period INTO v_window_full_until
            FROM queue_starts s
            WHERE s.queue = v_queue AND s.started_at > now() - v_limits.rate_period
            ORDER BY s.started_at DESC
            OFFSET v_limits.rate_limit - 1
            LIMIT 1;
            v_due := greatest(v_due, v_window_full_until);
        END IF;
        v_earliest := least(v_earliest, v_due);
    END LOOP;
    RETURN EXTRACT(EPOCH FROM v_earliest - now())::float8;
END
$$;
