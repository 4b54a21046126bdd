"""Bad arguments to the command: one line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_m(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sonamu_tasks", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_python_m_sonamu_tasks_is_the_command() -> None:
    helped = python_m("--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("Usage: sonamu-tasks ")
    for command in ("worker", "run", "runs", "show", "dashboard", "migrate"):
        assert f"\n  {command} " in helped.stdout


def test_python_m_sonamu_tasks_refuses_a_bad_argument() -> None:
    refused = python_m("--no-such-option")
    assert refused.returncode == 2
    assert "No such option" in refused.stderr and "Traceback" not in refused.stderr
