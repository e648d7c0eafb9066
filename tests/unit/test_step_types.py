"""Custom step types: what `--types-module` accepts, and the errors that name what is wrong."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.worker.runtime import StepContext, load_step_types, step_type


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for this test's modules, forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("ff_types_")]:
        del sys.modules[name]


def test_a_module_s_step_types_join_the_built_in_ones(modules: Path) -> None:
    (modules / "ff_types_ok.py").write_text(
        "from flowforge_orchestrator.worker.runtime import step_type\n"
        "@step_type('sms_send')\n"
        "async def sms(params, ctx):\n"
        "    return {'sent': True}\n"
    )
    types = load_step_types(["ff_types_ok"])
    assert sorted(types) == ["http", "sms_send"]
    assert types["sms_send"].__name__ == "sms"


def test_a_module_that_cannot_be_imported_is_named(modules: Path) -> None:
    (modules / "ff_types_broken.py").write_text("import ff_no_such_dependency\n")
    with pytest.raises(ConfigError, match="cannot import step module 'ff_types_broken'"):
        load_step_types(["ff_types_broken"])
    with pytest.raises(ConfigError, match="cannot import step module 'ff_types_missing'"):
        load_step_types(["ff_types_missing"])


def test_a_module_without_step_types_is_refused(modules: Path) -> None:
    (modules / "ff_types_empty.py").write_text("async def helper(params, ctx):\n    return 1\n")
    with pytest.raises(ConfigError, match="'ff_types_empty' defines no @step_type function"):
        load_step_types(["ff_types_empty"])


def test_a_step_type_must_be_an_async_function() -> None:
    def not_async(params: Any, ctx: StepContext) -> Any:
        return params

    with pytest.raises(ConfigError, match=r"step type 'sync_one'.*must be an async function"):
        step_type("sync_one")(not_async)
