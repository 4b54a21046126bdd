-- A worker records the queues it claims from (see the PostgreSQL migration 0016).

ALTER TABLE workers ADD COLUMN queues TEXT NOT NULL DEFAULT '[]';
