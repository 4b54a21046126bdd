"""`python -m sonamu_tasks`: the `sonamu-tasks` command, for when the script is not on PATH."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    # prog_name keeps usage and error lines identical to the installed script's.
    main(prog_name="sonamu-tasks")
