-- A worker records the queues it claims from, so `workers` and the dashboard can show which queue nothing
-- serves. A worker of an older release registers without them: NULL, unknown (not "none").

ALTER TABLE workers ADD COLUMN queues jsonb;
