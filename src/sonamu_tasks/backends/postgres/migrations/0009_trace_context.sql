-- The trace context of the caller of run() (W3C traceparent and tracestate, as OpenTelemetry's propagator
-- writes them), so that every attempt's span joins the caller's trace, whichever process runs it.

ALTER TABLE runs ADD COLUMN trace_context jsonb;
