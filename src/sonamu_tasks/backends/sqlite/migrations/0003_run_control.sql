-- Cancel and pause of a running run: recorded as a request that its worker honours at the next step
-- boundary (a run that is not running is canceled or paused at once, by a status change).

ALTER TABLE runs ADD COLUMN requested_action TEXT CHECK (requested_action IN ('cancel', 'pause'));
