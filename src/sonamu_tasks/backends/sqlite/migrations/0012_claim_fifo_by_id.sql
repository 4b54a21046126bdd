-- FIFO within a priority level, also among runs due at the same moment (see the PostgreSQL migration 0020):
-- the claim breaks ties of available_at by id, which sorts runs created together (one run_many, run() calls
-- in one transaction) in creation order. Until now the ties came out in rowid order, which is the order of
-- insertion but no order the claim asked for. The claim reads (priority, available_at, id) off the index,
-- still without a sort.

DROP INDEX runs_claim_queue;
CREATE INDEX runs_claim_queue ON runs (queue, priority, available_at, id)
    WHERE status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT key_parked;
