-- When each queue's claim last looked for parked runs whose key has a free slot (see the PostgreSQL migration
-- 0012, whose queues table has had swept_at from the start, and sweep_parked_keys in queries.sql).
--
-- The trigger runs_release_key_slot brings a parked run back only when a run of its key leaves 'running'. Two
-- ways a key's slot frees without that: the run holding it belonged to a killed worker and its lease expired
-- with no live worker of its version to take it over (it stays 'running'); or the trigger handed the slot to
-- the key's oldest parked run, of a version no live worker serves (a rolling deploy). The key's other parked
-- runs then waited for a new run of the key; the claim's periodic sweep now brings them back.

ALTER TABLE queues ADD COLUMN swept_at INTEGER NOT NULL DEFAULT 0;  -- microseconds; 0: never, the next claim sweeps
