-- The claim reads one ordered queue per (workflow, version): an index scan in available_at order that
-- stops after `limit` rows, whatever the planner believes about the table. With the single available_at
-- index, a table without fresh statistics (a burst of runs just enqueued) was claimed by a bitmap scan
-- that sorted the whole backlog at every claim: 2 ms at 2,000 due runs, 35 ms at 20,000.
-- Building the index reads the whole table while writes to runs wait (0.3 s for a million finished runs on a
-- 2-core machine); the index itself holds only unfinished runs.

CREATE INDEX runs_claim_queue ON runs (workflow_name, version, available_at)
    WHERE status IN ('pending', 'running', 'sleeping');
DROP INDEX runs_claimable;
