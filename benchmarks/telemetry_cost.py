"""What the engine's telemetry costs a worker per workflow, with no database: an attempt and three steps.

    python -m benchmarks.telemetry_cost [--repeat 5] [--number 20000]

Times `Telemetry.attempt` around three `Telemetry.step`s (what a 3-step workflow's attempt goes through), best
of --repeat rounds of --number: with the default telemetry and with tracing off, each for a run stored without
a trace context and for one whose caller was traced. Run it in a process with no tracer provider set (as here):
the worker of a team that has not configured OpenTelemetry. Prometheus metrics are on when prometheus_client
is installed, in both.
"""

from __future__ import annotations

import argparse
import functools
import timeit

from sonamu_tasks.telemetry import Telemetry

CALLER = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def one_workflow(telemetry: Telemetry, context: dict[str, str] | None) -> None:
    with telemetry.attempt("run", "workflow", "1", 1, context, True):
        for name in ("one", "two", "three"):
            with telemetry.step("workflow", "1", "run", 1, name):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args()
    for label, telemetry in (("default", Telemetry()), ("tracing_off", Telemetry(tracing=False))):
        for traced, context in (("no", None), ("yes", CALLER)):
            call = functools.partial(one_workflow, telemetry, context)
            seconds = min(timeit.repeat(call, number=args.number, repeat=args.repeat))
            micros = seconds / args.number * 1e6
            print(f"telemetry.per_3_step_workflow {micros:10.1f} us   telemetry={label} caller_traced={traced}")


if __name__ == "__main__":
    main()
