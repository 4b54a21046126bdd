-- A fork remembers its source run and the step it was forked from, so `show` and the dashboard can say so.

ALTER TABLE runs ADD COLUMN forked_from uuid;
ALTER TABLE runs ADD COLUMN forked_step text;
