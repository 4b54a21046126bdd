"""The guide under docs/ builds with `mkdocs build --strict`: a broken link, anchor, nav entry or include fails
the suite (issue 17). No network: the Material theme and the search plugin build from installed files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_guide_builds_strictly_without_a_broken_link(tmp_path: Path) -> None:
    # given the repository's mkdocs.yml and docs/
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build warning
    # when the site is built as CI would, into a throwaway directory
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # then it succeeds, and every page of the nav was written
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    for page in ("index.html", "getting-started/index.html", "benchmarks/index.html", "reliability/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "--8&lt;--" not in benchmarks and "--8<--" not in benchmarks, "the benchmarks include was not expanded"
    assert "throughput.py" in benchmarks, "benchmarks/README.md's content is missing from the benchmarks page"
