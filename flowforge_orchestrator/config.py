"""Settings: read once from `FLOWFORGE_*` environment variables at the edge (the CLI).

Nothing below the CLI reads `os.environ`; it receives a `Settings`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowforge_orchestrator.core.destinations import parse_entries
from flowforge_orchestrator.core.durations import parse_duration

__all__ = ["Settings"]


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Every knob of the orchestrator and the worker. Defaults are production-sane."""

    model_config = SettingsConfigDict(env_prefix="FLOWFORGE_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL DSN. Unset: `run`/`demo` start a private server in data_dir.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis DSN for arq. Unset: `run`/`demo` start a private server in data_dir.",
    )
    data_dir: Path = Field(
        default=Path(".flowforge"),
        description="Where private PostgreSQL/Redis servers keep their data.",
    )
    node_id: str = Field(
        default_factory=_default_node_id,
        description="This process's name as a run owner or result writer.",
    )

    # Ownership and polling.
    lease_seconds: float = Field(default=30.0, gt=0, description="Run lease length.")
    liveness_interval: float = Field(
        default=0.5,
        gt=0,
        description="How often an orchestrator checks, in one query, that the owners of "
        "running runs still hold their PostgreSQL session; a dead owner's runs are adopted "
        "then, not after their lease (seconds).",
    )
    poll_interval: float = Field(
        default=5.0, gt=0, description="Slow poll for runs and results missed by NOTIFY."
    )
    shutdown_timeout: float = Field(
        default=10.0,
        gt=0,
        description="On SIGTERM, how long the orchestrator may take to commit what it holds.",
    )
    claim_batch: int = Field(default=100, gt=0, description="Runs claimed per statement.")
    lock_timeout: float = Field(
        default=1.0,
        gt=0,
        description="Longest the orchestrator waits for a row or key locked by another "
        "session before it writes the other runs and retries that one later (seconds).",
    )
    event_retention: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="How long an event sent by key waits for runs that reach their wait "
        "step later (seconds; events sent to one run are kept for it).",
    )
    hibernate_after: float = Field(
        default=60.0,
        ge=0,
        description="A running run with nothing to do until a timer further away than this "
        "(seconds), or until an event, leaves the orchestrator's memory and is claimed again "
        'when due (README: "Hibernation"); 0 keeps every run in memory.',
    )
    db_pool_size: int = Field(default=10, gt=1, description="Connections per process.")

    # Payload limits.
    max_output_bytes: int = Field(
        default=256 * 1024, gt=0, description="Largest step output (JSON bytes)."
    )
    max_context_bytes: int = Field(
        default=4 * 1024 * 1024,
        gt=0,
        description="Largest run context: input plus every step output (JSON bytes).",
    )

    # Child runs (README: "Child runs").
    max_child_depth: int = Field(
        default=16,
        ge=1,
        description="How deep child runs (`type: workflow` steps) may nest; a step that would "
        "start one deeper fails with child_depth_exceeded.",
    )

    # Expressions (README: "Expression limits").
    expression_timeout: float = Field(
        default=0.1,
        gt=0,
        description="Longest one CEL evaluation may take; a costly one runs in a sandbox "
        "process that is killed past it, and its step fails with expression_error.",
    )
    expression_memory_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=64 * 1024 * 1024,
        description="Address space of the expression sandbox process; an evaluation that "
        "needs more fails its step with expression_error.",
    )

    # Workers.
    worker_poll_delay: float = Field(
        default=0.5,
        gt=0,
        description="arq poll_delay: how often an idle worker checks Redis (a new job wakes "
        "it at once; this bounds the wait when a wake-up is lost).",
    )
    worker_max_jobs: int = Field(default=100, gt=0, description="Concurrent jobs per worker.")
    worker_shutdown_grace: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight attempts may finish."
    )
    worker_redis_give_up: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a worker goes on trying a Redis it cannot reach before it exits "
        "with code 3 (a Redis that moved); shorter outages are ridden out. 0: never gives up.",
    )
    step_timeout: float = Field(
        default=300.0, gt=0, description="Default step timeout when a definition sets none."
    )

    # Data lifecycle (README: "Outbox feed and retention"). Durations: seconds or 30d, 2s, PT1H.
    run_retention: float = Field(
        default=30 * 86400.0,
        ge=0,
        description="Finished runs older than this (seconds, or a duration such as 30d) are "
        "deleted with their history and results, once every registered outbox consumer has "
        "read their events; 0 keeps them forever.",
    )
    outbox_max_age: float = Field(
        default=7 * 86400.0,
        ge=0,
        description="Longest a registered outbox consumer that has not read a run's events "
        "may hold back its deletion past FLOWFORGE_RUN_RETENTION; then the run is deleted "
        "anyway, and the consumer's lost events are logged, counted and shown by `doctor`.",
    )

    # Where http steps may connect (README: "HTTP steps: destinations and URLs").
    http_deny: str | None = Field(
        default=None,
        description="Destinations http steps may never reach, checked first: comma-separated "
        "CIDRs, IP addresses and host names ('*.example.com' for every name under it).",
    )
    http_allow: str | None = Field(
        default=None,
        description="Destinations allowed although a built-in rule denies them (loopback, "
        "link-local and cloud metadata, ...): same form; FLOWFORGE_HTTP_DENY wins.",
    )

    # Telemetry.
    otel_console: bool = Field(
        default=False, description="Print spans to stderr (local debugging)."
    )

    # Operation: health and metrics endpoints, logs.
    http_host: str = Field(
        default="0.0.0.0",
        description="Address of the HTTP server for /healthz, /readyz and /metrics.",
    )
    http_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="Port of the HTTP server for /healthz, /readyz and /metrics; 0 disables it.",
    )
    log_format: Literal["json", "text", "auto"] = Field(
        default="auto",
        description="Log lines as JSON, as readable text, or auto: text on a terminal, else JSON.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Lowest level logged (DEBUG, INFO, WARNING, ERROR)."
    )

    # Trust between processes.
    job_key: SecretStr | None = Field(
        default=None,
        description="Key(s) that sign jobs (HMAC), shared by orchestrators and workers; "
        "comma-separated to rotate: sign with the first, accept any. Unset: `run`/`demo` on "
        "private servers create `<data_dir>/job.key`, `worker` reads it; else both refuse to "
        "start.",
    )

    @field_validator("http_deny", "http_allow")
    @classmethod
    def _destinations(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A mistyped entry is named at startup, not when a step first connects.
        parse_entries(value or "", f"FLOWFORGE_{(info.field_name or '').upper()}")
        return value

    @field_validator("run_retention", "outbox_max_age", mode="before")
    @classmethod
    def _duration(cls, value: object, info: ValidationInfo) -> object:
        # FLOWFORGE_RUN_RETENTION=30d reads better than 2592000.
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as exc:
                raise ValueError(f"FLOWFORGE_{(info.field_name or '').upper()}: {exc}") from exc
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object, info: ValidationInfo) -> object:
        # FLOWFORGE_LOG_LEVEL=info is as clear as INFO; accept both spellings.
        if not isinstance(value, str):
            return value
        value = value.strip()
        return value.upper() if info.field_name == "log_level" else value.lower()
