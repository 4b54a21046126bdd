"""`python -m chaos [--short] [--only NAME,...]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .runner import SCENARIOS, run_all


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--short", action="store_true", help="small sizes: a few minutes in all")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios of {','.join(SCENARIOS)}")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    return asyncio.run(run_all(names, args.short))


if __name__ == "__main__":
    sys.exit(main())
