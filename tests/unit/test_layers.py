"""The pure core imports no I/O library, even indirectly: checked in a fresh interpreter,
where nothing else has imported them first (import-linter checks the same statically)."""

from __future__ import annotations

import json
import subprocess
import sys

IO_LIBRARIES = (
    "asyncpg",
    "arq",
    "redis",
    "httpx",
    "httpcore",
    "opentelemetry",
    "prometheus_client",
)


def test_importing_the_whole_core_loads_no_io_library() -> None:
    script = """
import json, pkgutil, importlib, sys
import flowforge_orchestrator.core as core
for info in pkgutil.walk_packages(core.__path__, core.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(done.stdout))
    assert "flowforge_orchestrator" in loaded
    assert not loaded & set(IO_LIBRARIES), sorted(loaded & set(IO_LIBRARIES))
