"""`definitions apply|validate|schema|list|show|diff`."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import yaml

from flowforge_orchestrator import store
from flowforge_orchestrator.cli.common import Subcommands, add_command, connection
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.calls import unguarded_self_calls
from flowforge_orchestrator.core.definition.models import (
    WorkflowDefinition,
    definition_json_schema,
)
from flowforge_orchestrator.core.definition.parse import parse_definition, parse_definition_text
from flowforge_orchestrator.core.durations import format_duration
from flowforge_orchestrator.errors import (
    ConfigError,
    DefinitionError,
    DefinitionProblem,
    FlowForgeError,
    NotFound,
)
from flowforge_orchestrator.store import reads
from flowforge_orchestrator.views.tables import format_table

__all__ = ["add_commands", "load_definition", "spec_yaml"]

Format = Literal["yaml", "json"]


def spec_yaml(spec: object) -> str:
    """A stored spec as YAML, its keys in the model's order (`jsonb` keeps its own)."""
    try:
        spec = store.definition_spec(parse_definition(spec))
    except FlowForgeError:
        pass  # a spec this version cannot read: shown as stored
    spec = durations_as_written(spec)
    text: str = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)
    return text


# Fields that hold a duration (stored as seconds), and fields whose values are the user's own
# data, where a key named `timeout` means whatever the user means by it.
_DURATIONS = frozenset(
    {"timeout", "duration", "initial_interval", "max_interval"}
    | {"schedule_to_start", "heartbeat_timeout"}
)
_OPAQUE = frozenset({"with", "output", "input", "data"})


def durations_as_written(value: object, key: str | None = None) -> Any:
    """A spec with its durations in the short form people write (`5m`, `2s`), not seconds."""
    if isinstance(value, dict):
        return {k: v if k in _OPAQUE else durations_as_written(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [durations_as_written(v, key) for v in value]
    if key in _DURATIONS and isinstance(value, int | float) and not isinstance(value, bool):
        return format_duration(float(value))
    return value


async def cmd_apply(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        known = set(await store.list_step_types(conn)) | set(args.allow_type or [])
        definition = load_definition(Path(args.file), known_types=known)
        for step_id in unguarded_self_calls(definition):
            print(
                f"warning: {args.file}: step '{step_id}' starts a run of '{definition.name}' "
                "itself with no condition on its path: every run starts another until the "
                "depth limit (FLOWFORGE_MAX_CHILD_DEPTH) fails them all",
                file=sys.stderr,
            )
        created, existing = await store.register_definition(conn, definition)
        if not created:
            if existing is not None and existing.spec != store.definition_spec(definition):
                raise ConfigError(
                    f"{args.file}: {definition.name} version {definition.version} is already "
                    "registered with a different spec; raise `version` to register a change"
                )
            print(f"{definition.name} version {definition.version} is already registered")
            return 0
    print(f"registered {definition.name} version {definition.version}")
    return 0


async def cmd_validate(_settings: Settings, args: argparse.Namespace) -> int:
    known = set(args.allow_type or []) if args.allow_type else None
    definition = load_definition(Path(args.file), known_types=known)
    steps = sum(1 for _ in definition.all_steps())
    print(f"{args.file}: {definition.name} version {definition.version} is valid ({steps} steps)")
    return 0


async def cmd_schema(_settings: Settings, _args: argparse.Namespace) -> int:
    print(json.dumps(definition_json_schema(), indent=2))
    return 0


async def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        if args.all or args.name:
            rows = await reads.definition_versions(conn, args.name)
            if args.name and not rows:
                raise NotFound(f"no workflow named '{args.name}' is registered")
        else:
            rows = await store.list_definitions(conn)
    versions = bool(args.all or args.name)
    if args.json:
        print(json.dumps([dict(row) for row in rows], indent=2, default=str))
        return 0
    headers = ["workflow", "version", "max_concurrency"] + (["registered"] if versions else [])
    table = []
    for row in rows:
        line = [row["name"], f"v{row['version']}", row["max_concurrency"] or "-"]
        if versions:
            line.append(f"{row['created_at'].astimezone():%Y-%m-%d %H:%M:%S}")
        table.append(line)
    print(format_table(headers, table))
    return 0


async def _spec(conn: store.Connection, name: str, version: int | None) -> store.Definition:
    found = await store.get_definition(conn, name, version)
    if found is None:
        which = f"version {version} of workflow '{name}'" if version else f"workflow '{name}'"
        raise NotFound(f"{which} is not registered (see `definitions list --all`)")
    return found


async def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        found = await _spec(conn, args.name, args.version)
    if args.json:
        print(json.dumps(found.spec, indent=2, ensure_ascii=False))
    else:
        print(spec_yaml(found.spec), end="")
    return 0


async def cmd_diff(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        old = await _spec(conn, args.name, args.old)
        new = await _spec(conn, args.name, args.new)
    lines = difflib.unified_diff(
        spec_yaml(old.spec).splitlines(keepends=True),
        spec_yaml(new.spec).splitlines(keepends=True),
        fromfile=f"{args.name} v{old.version}",
        tofile=f"{args.name} v{new.version}",
        n=args.context,
    )
    text = "".join(lines)
    if not text:
        text = f"v{old.version} and v{new.version} have the same spec\n"
    print(text, end="")
    return 0


_APPLY_ALLOWS = "accept this custom step type even if no worker registered it"
_VALIDATE_ALLOWS = "check step types against the built-ins and these"


def add_commands(sub: Subcommands) -> None:
    defs = sub.add_parser("definitions", help="workflow definitions").add_subparsers(
        dest="definitions_command", required=True
    )
    for name, fn, help, allow in (
        ("apply", cmd_apply, "validate and register a definition", _APPLY_ALLOWS),
        ("validate", cmd_validate, "validate a definition file", _VALIDATE_ALLOWS),
    ):
        command = add_command(defs, name, fn, help)
        command.add_argument("file")
        command.add_argument("--allow-type", action="append", metavar="TYPE", help=allow)
    add_command(defs, "schema", cmd_schema, "print the JSON Schema of definitions")
    listing = add_command(
        defs, "list", cmd_list, "registered workflows: the latest version of each, or every one"
    )
    listing.add_argument("name", nargs="?", help="every version of this workflow")
    listing.add_argument("--all", action="store_true", help="every version of every workflow")
    listing.add_argument("--json", action="store_true", help="the listing as a JSON array")
    show = add_command(defs, "show", cmd_show, "print a registered definition as YAML")
    show.add_argument("name")
    show.add_argument("--version", type=int, default=None, help="default: the latest")
    show.add_argument("--json", action="store_true", help="print the stored JSON instead")
    diff = add_command(
        defs, "diff", cmd_diff, "a unified diff between two registered versions, as YAML"
    )
    diff.add_argument("name")
    diff.add_argument("old", type=int, metavar="V1")
    diff.add_argument("new", type=int, metavar="V2", nargs="?", help="default: the latest")
    diff.add_argument("-U", "--context", type=int, default=3, help="lines of context")


def load_definition(
    path: Path | str, *, known_types: Collection[str] | None = None
) -> WorkflowDefinition:
    """Read and validate a `.yaml`, `.yml` or `.json` file."""
    path = Path(path)
    source = str(path)
    formats: dict[str, Format] = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
    format = formats.get(path.suffix.lower())
    if format is None:
        problem = "unsupported file type: use .yaml, .yml or .json"
        raise DefinitionError([DefinitionProblem(problem, source)])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError([DefinitionProblem(f"cannot read the file: {exc}", source)]) from exc
    return parse_definition_text(text, format=format, source=source, known_types=known_types)
