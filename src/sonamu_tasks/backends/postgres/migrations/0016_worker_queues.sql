-- A worker records the queues it claims from, so `workers` and the dashboard can show which queue nothing
-- serves. A worker of an older release registers without them: '[]', shown as unknown.

ALTER TABLE workers ADD COLUMN queues jsonb NOT NULL DEFAULT '[]';
