-- The claim reads one stream per (queue, workflow, version), as PostgreSQL's does (its migrations 0012 and 0020):
-- a claim, and a worker's look for its next due run, probe the index for each (workflow, version) the worker
-- serves and never read the runs of the others (see next_level, due_runs and next_due_at in queries.sql).
--
-- Until now runs_claim_queue was (queue, priority, available_at, id): the claim walked the whole queue and
-- filtered the rows by workflow one by one, so runs no live worker serves (a fleet not deployed yet, a retired
-- version, runs started with a delay) were read again by every claim and every poll, under the write lock for
-- the claim: 50,000 of them made an idle claim take 10 ms instead of 0.07.
--
-- Same name, so the queries of a release before this one still find the index (in a rolling deploy): they seek
-- it by workflow too, then sort what it gives them. runs_claimable (0004), which next_due_at read until now, is
-- no longer read by this release but stays for those queries (they name it). Building the index reads the runs
-- table once while other writers wait.
DROP INDEX runs_claim_queue;
CREATE INDEX runs_claim_queue ON runs (queue, workflow_name, version, priority, available_at, id)
    WHERE status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT key_parked;
