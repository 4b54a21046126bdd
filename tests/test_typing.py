"""What users' type checkers see: a program using the public API passes `mypy --strict` with the types it
expects (an async step gives what its coroutine returns), and wrong uses of it are reported (a misspelled
run option, a step called with the wrong arguments). The samples are in tests/typing_samples/."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sonamu_tasks import SyncClient, WorkflowDefinition, WorkflowManager
from sonamu_tasks.testing import WorkflowTestEnv

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parent / "typing_samples"
CORRECT = SAMPLES / "user_program.py"
WRONG = SAMPLES / "wrong_uses.py"
ERROR_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")
EXPECTED = re.compile(r"# error: (?P<code>[a-z-]+)$")


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[int, str]]]:
    """mypy --strict over both samples, once: {sample file name: {(line, error code)}}. MYPYPATH puts this
    tree's src first, ahead of whatever sonamu_tasks the interpreter has installed."""
    cache = tmp_path_factory.mktemp("mypy-cache")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-pretty", "--cache-dir", str(cache), str(CORRECT), str(WRONG)],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    errors: dict[str, set[tuple[int, str]]] = {CORRECT.name: set(), WRONG.name: set()}
    for line in result.stdout.splitlines():
        match = ERROR_LINE.match(line)
        if match:
            errors.setdefault(Path(match["path"]).name, set()).add((int(match["line"]), match["code"]))
    return errors


def test_a_program_using_the_public_api_passes_mypy_strict_with_the_types_it_expects(
    mypy_errors: dict[str, set[tuple[int, str]]],
) -> None:
    assert mypy_errors[CORRECT.name] == set()


def test_wrong_uses_of_the_public_api_are_reported_by_mypy(mypy_errors: dict[str, set[tuple[int, str]]]) -> None:
    expected = {
        (number, match["code"])
        for number, text in enumerate(WRONG.read_text().splitlines(), start=1)
        if (match := EXPECTED.search(text))
    }
    assert expected  # the sample marks its wrong lines
    assert mypy_errors[WRONG.name] == expected


@pytest.mark.parametrize(
    ("wrapper", "original"),
    [
        (WorkflowDefinition.run, WorkflowManager.run),
        (SyncClient.run, WorkflowManager.run),
        (SyncClient.run_many, WorkflowManager.run_many),
        (WorkflowTestEnv.run, WorkflowManager.run),
        (WorkflowTestEnv.send, WorkflowManager.send),
    ],
    ids=lambda f: f.__qualname__,
)
def test_the_run_wrappers_take_the_keywords_of_the_manager(wrapper: object, original: object) -> None:
    """Each names the manager's options (so a misspelled one is a type error) and stays in step with it."""

    def keywords(function: object) -> list[tuple[str, object, object]]:
        parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
        return [(p.name, p.annotation, p.default) for p in parameters if p.kind is p.KEYWORD_ONLY]

    assert keywords(wrapper) == keywords(original)
    assert keywords(wrapper)
