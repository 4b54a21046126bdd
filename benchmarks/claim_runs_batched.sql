-- A proposal, not the engine's: claim_runs (migration 0012, at commit b5ab101) with its one-run-at-a-time
-- branch (rate-limited and per-key queues) made set-based: per pass, one statement picks the candidates,
-- counts the executing runs of their keys once, ranks each key's candidates and decides take / park / skip
-- (rate budget), then one UPDATE parks and one UPDATE takes. benchmarks/queues.py --part claimcost loads it
-- as claim_runs_batched into a benchmark schema and times it against claim_runs. Difference: a candidate
-- skipped for the rate budget still counts against its key's slots in that pass (so a later run of the
-- same key may be parked where the original would take it); the limits hold either way.
CREATE OR REPLACE FUNCTION claim_runs_batched(p_worker text, p_queues text[], p_names text[], p_versions text[], p_limit integer,
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
    v_parked boolean;
    v_due record;
    v_take uuid[];
    v_first boolean[];
    v_previous text[];
    v_park uuid[];
    v_starts integer;
    v_holding boolean := false;  -- a queue lock is held: take no other one by waiting for it
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

            IF NOT v_one_by_one THEN
                RETURN QUERY
                WITH due AS (
                    SELECT d.id, d.status AS previous_status, d.started_at IS NULL AS first_claim
                    FROM unnest(p_names, p_versions) AS w(name, version)
                    CROSS JOIN LATERAL (
                        SELECT r.id, r.status, r.started_at, r.available_at FROM runs r
                        WHERE r.queue = v_queue AND r.workflow_name = w.name AND r.version = w.version
                          AND r.priority = v_level
                          AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
                          AND r.available_at <= v_now
                        ORDER BY r.available_at
                        LIMIT v_cap
                        FOR UPDATE SKIP LOCKED
                    ) AS d
                    ORDER BY d.available_at
                    LIMIT v_cap
                )
                UPDATE runs AS r
                SET status = 'running',
                    lease_token = gen_random_uuid(),
                    worker_id = p_worker,
                    available_at = v_now + p_lease,
                    started_at = COALESCE(r.started_at, v_now),
                    recoveries = r.recoveries + CASE WHEN due.previous_status = 'running' THEN 1 ELSE 0 END,
                    updated_at = v_now
                FROM due
                WHERE r.id = due.id
                RETURNING r.id::text, r.workflow_name, r.version, r.input, r.attempts, r.recoveries,
                          r.lease_token::text, v_now, due.first_claim, r.deadline_at, r.requested_action,
                          r.trace_context;
                GET DIAGNOSTICS v_count = ROW_COUNT;
                v_taken := v_taken + v_count;
                v_cap := v_cap - v_count;
            ELSE
                -- Set-based: per pass, one statement decides for every candidate, one UPDATE parks, one takes.
                LOOP
                    SELECT array_agg(c.id ORDER BY c.available_at) FILTER (WHERE c.take),
                           array_agg(c.first_claim ORDER BY c.available_at) FILTER (WHERE c.take),
                           array_agg(c.status ORDER BY c.available_at) FILTER (WHERE c.take),
                           array_agg(c.id) FILTER (WHERE c.park),
                           count(*) FILTER (WHERE c.take AND c.status = 'pending')
                    INTO v_take, v_first, v_previous, v_park, v_starts
                    FROM (
                        SELECT o.*, o.eligible AND o.nth <= v_cap AS take,
                               NOT o.key_ok AND o.nth < v_cap AS park
                        FROM (
                            SELECT e.*, count(*) FILTER (WHERE e.eligible) OVER w AS nth
                            FROM (
                                SELECT k.*, k.key_ok AND (v_budget IS NULL OR k.status <> 'pending'
                                                          OR k.nth_start <= v_budget) AS eligible
                                FROM (
                                    SELECT r.*, count(*) FILTER (WHERE r.key_ok AND r.status = 'pending') OVER w
                                               AS nth_start
                                    FROM (
                                        SELECT c.*,
                                               c.concurrency_key IS NULL OR v_limits.per_key_concurrency IS NULL
                                               OR COALESCE(b.n, 0) + row_number() OVER (
                                                      PARTITION BY c.concurrency_key ORDER BY c.available_at, c.id)
                                                  <= v_limits.per_key_concurrency AS key_ok
                                        FROM (
                                            SELECT d.id, d.status, d.started_at IS NULL AS first_claim,
                                                   d.concurrency_key, d.available_at
                                            FROM unnest(p_names, p_versions) AS w(name, version)
                                            CROSS JOIN LATERAL (
                                                SELECT r.id, r.status, r.started_at, r.available_at,
                                                       r.concurrency_key
                                                FROM runs r
                                                WHERE r.queue = v_queue AND r.workflow_name = w.name
                                                  AND r.version = w.version AND r.priority = v_level
                                                  AND r.status IN ('pending', 'running', 'sleeping', 'waiting')
                                                  AND NOT r.key_parked AND r.available_at <= v_now
                                                ORDER BY r.available_at
                                                LIMIT v_cap
                                                FOR UPDATE SKIP LOCKED
                                            ) AS d
                                        ) AS c
                                        LEFT JOIN LATERAL (
                                            SELECT count(*) AS n FROM runs x
                                            WHERE x.queue = v_queue AND x.concurrency_key = c.concurrency_key
                                              AND x.status = 'running' AND x.available_at > v_now
                                        ) AS b ON v_limits.per_key_concurrency IS NOT NULL
                                    ) AS r
                                    WINDOW w AS (ORDER BY r.available_at, r.id ROWS UNBOUNDED PRECEDING)
                                ) AS k
                            ) AS e
                            WINDOW w AS (ORDER BY e.available_at, e.id ROWS UNBOUNDED PRECEDING)
                        ) AS o
                    ) AS c;
                    IF v_park IS NOT NULL THEN
                        UPDATE runs r SET key_parked = true WHERE r.id = ANY (v_park);
                    END IF;
                    IF v_take IS NOT NULL THEN
                        RETURN QUERY
                        UPDATE runs AS r
                        SET status = 'running',
                            lease_token = gen_random_uuid(),
                            worker_id = p_worker,
                            available_at = v_now + p_lease,
                            started_at = COALESCE(r.started_at, v_now),
                            recoveries = r.recoveries + CASE WHEN t.previous = 'running' THEN 1 ELSE 0 END,
                            updated_at = v_now
                        FROM unnest(v_take, v_first, v_previous) AS t(id, first_claim, previous)
                        WHERE r.id = t.id
                        RETURNING r.id::text, r.workflow_name, r.version, r.input, r.attempts, r.recoveries,
                                  r.lease_token::text, v_now, t.first_claim, r.deadline_at, r.requested_action,
                                  r.trace_context;
                        v_taken := v_taken + cardinality(v_take);
                        v_cap := v_cap - cardinality(v_take);
                        IF v_starts > 0 AND v_budget IS NOT NULL THEN
                            v_budget := v_budget - v_starts;
                            INSERT INTO queue_starts (queue, started_at)
                            SELECT v_queue, v_now FROM generate_series(1, v_starts);
                        END IF;
                    END IF;
                    EXIT WHEN v_park IS NULL OR v_cap <= 0;
                END LOOP;
            END IF;
            EXIT WHEN v_cap <= 0;
        END LOOP;
    END LOOP;
END
$$;
