"""Coverage floors of the engine's core, module by module: `python -m tests.coverage_floors`.

`coverage report` enforces the floor of the whole package (`fail_under` in pyproject.toml);
the modules that decide what happens to a run (claims, commits, leases, the reconciler,
the worker and its results, the SQL) must each be covered far better than that, so a
total lifted by easy code cannot hide an untested decision in them. Reads the combined
data file (`coverage combine` first); lines and branches count together, as in the report.
Exits 1 when a floor is not met, or a module has no data at all.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import coverage
from coverage.exceptions import NoDataError

__all__ = ["FLOORS", "main"]

PACKAGE = Path(__file__).resolve().parents[1] / "flowforge_orchestrator"

# What each floor covers (files, or a directory taken as a whole) -> its floor in percent.
FLOORS: dict[str, float] = {
    "engine/": 90.0,  # the orchestrator and its parts (the sandbox too), as a whole
    "worker/results.py": 90.0,
    "worker/runtime.py": 90.0,
    "store/": 90.0,
}


def _percent(cov: coverage.Coverage, part: str) -> float | None:
    target = PACKAGE / part
    pattern = f"{target}/*" if part.endswith("/") else str(target)
    try:
        return cov.report(include=[pattern], file=io.StringIO(), skip_covered=False)
    except NoDataError:
        return None


def main() -> int:
    cov = coverage.Coverage()
    cov.load()
    failed = False
    for part, floor in FLOORS.items():
        percent = _percent(cov, part)
        if percent is None:
            print(f"{part:<28} no data                (floor {floor:g}%)  FAIL")
            failed = True
            continue
        verdict = "ok" if percent >= floor else "FAIL"
        failed = failed or percent < floor
        print(f"{part:<28} {percent:6.2f}% of lines+branches (floor {floor:g}%)  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
