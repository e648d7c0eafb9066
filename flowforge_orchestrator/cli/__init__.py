"""`flowforge-orchestrator`: the daemon, the worker, migrations, definitions, runs, and the
operator's tools (doctor, config, outbox).

Settings are read here, once, from `FLOWFORGE_*` variables, and passed down. Each module of
this package adds its commands to the parser:

* `daemons`: migrate, run, worker, demo;
* `definitions`: definitions apply|validate|schema|list|show|diff;
* `runs`: submit, runs show|watch|list|cancel|retry;
* `events`: events send|complete;
* `ops`: doctor, config, outbox tail;
* `dev`: servers, orchestrator, a worker and a folder of definitions in one command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import traceback

from flowforge_orchestrator.cli import daemons, definitions, dev, events, ops, runs
from flowforge_orchestrator.cli.common import load_settings
from flowforge_orchestrator.cli.failures import EXIT_USAGE, explain
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.ops.logs import configure_logging

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowforge-orchestrator", description="Durable workflow engine on PostgreSQL + arq."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (FLOWFORGE_LOG_LEVEL=DEBUG)"
    )
    parser.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    sub = parser.add_subparsers(dest="command", required=True)
    daemons.add_commands(sub)
    definitions.add_commands(sub)
    runs.add_commands(sub)
    events.add_commands(sub)
    ops.add_commands(sub)
    daemons.add_demo(sub)
    dev.add_commands(sub)
    return parser


def _logging(settings: Settings, verbose: bool) -> logging.Handler:
    as_json = {"json": True, "text": False}.get(settings.log_format)  # auto: by the terminal
    return configure_logging("DEBUG" if verbose else settings.log_level, json=as_json)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return exc.code if isinstance(exc.code, int) else 2
    try:
        settings = load_settings()
    except ConfigError as exc:
        on_bad_settings = getattr(args, "on_bad_settings", None)
        if on_bad_settings is not None:  # doctor: a bad setting is one of its findings
            return int(on_bad_settings(exc, args))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = dev.with_dev_servers(settings)  # no URLs set: those of a running `dev`, if any
    root = logging.getLogger()
    level = root.level
    handler = _logging(settings, args.verbose)
    try:
        code: int = asyncio.run(args.fn(settings, args))
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader has gone, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is silent
        return 141
    except Exception as exc:  # every expected failure is one line; a bug says so too
        message, code = explain(exc)
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        return code
    finally:
        # main() also runs in-process (tests, embedding): leave no handler on a stream that
        # its caller may close, and the root level as it was.
        handler.flush()
        root.removeHandler(handler)
        root.setLevel(level)
