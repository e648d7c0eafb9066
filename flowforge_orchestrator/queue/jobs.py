"""Signed jobs: what the orchestrator hands a worker through Redis, sealed with a shared key.

Any client of Redis can write a queue, so a worker trusts a job only when it verifies:

* the orchestrator writes the job's payload as canonical JSON (sorted keys, compact, ASCII)
  and signs that text and the queue name with HMAC-SHA256 under the first key of
  `FLOWFORGE_JOB_KEY` (a comma-separated list: sign with the first, accept any, so keys
  rotate without downtime);
* the worker checks the signature over the bytes it received before it parses anything,
  then that the arq job id is the payload's attempt id (a copy re-enqueued under another id
  is refused) and that the job came off its own type's queue.

The attempt's result token (see `core.tokens`) travels in the payload masked with the
signing key: reading Redis is not enough to learn it.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from flowforge_orchestrator.errors import ConfigError, JobRefused

__all__ = ["JOB_KEY_ENV", "MIN_KEY_LENGTH", "REFUSAL_REASONS", "Job", "JobKeys"]

JOB_KEY_ENV = "FLOWFORGE_JOB_KEY"
MIN_KEY_LENGTH = 16
"""Characters a job key needs at least: shorter ones are guessable."""

# Why a worker refuses a job, as labelled in its log and its metrics.
REFUSAL_REASONS = JobRefused.REASONS

_PLACEHOLDER = "CHANGE-ME"  # what deploy/ examples hold until someone sets a real key
_DOMAIN = b"flowforge-job-v1\x00"
_MASK_DOMAIN = b"flowforge-token-mask-v1\x00"
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Job:
    """One attempt of one leaf step, as a worker runs it."""

    attempt_id: UUID
    run_id: UUID
    step_id: str
    type: str
    attempt: int
    params: Any
    timeout: float | None
    traceparent: str | None
    secret_paths: tuple[tuple[str | int, ...], ...]
    token: bytes  # the attempt's result token, written with its result
    heartbeat_timeout: float | None = None
    last_heartbeat: Any = None  # the previous attempt's last heartbeat details

    def to_json(self) -> dict[str, Any]:
        # The heartbeat fields only when set: jobs of steps that do not beat read as before.
        beats: dict[str, Any] = {}
        if self.heartbeat_timeout is not None:
            beats["heartbeat_timeout"] = self.heartbeat_timeout
        if self.last_heartbeat is not None:
            beats["last_heartbeat"] = self.last_heartbeat
        return beats | {
            "attempt_id": str(self.attempt_id),
            "run_id": str(self.run_id),
            "step_id": self.step_id,
            "type": self.type,
            "attempt": self.attempt,
            "params": self.params,
            "timeout": self.timeout,
            "traceparent": self.traceparent,
            "secret_paths": [list(path) for path in self.secret_paths],
            "token": self.token.hex(),
        }

    @classmethod
    def from_json(cls, data: object) -> Job:
        """The job in `data`; JobRefused("malformed") naming the first field that is wrong."""
        if not isinstance(data, Mapping):
            raise _malformed("the payload is not a JSON object")
        timeout = data.get("timeout")
        if timeout is not None and not (_is_number(timeout) and 0 < timeout < float("inf")):
            raise _malformed("field 'timeout' is not a positive number")
        attempt = data.get("attempt")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise _malformed("field 'attempt' is not a positive integer")
        traceparent = data.get("traceparent")
        if traceparent is not None and not isinstance(traceparent, str):
            raise _malformed("field 'traceparent' is not a string")
        token = data.get("token")
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise _malformed("field 'token' is not 32 hex digits")
        beat = data.get("heartbeat_timeout")
        if beat is not None and not (_is_number(beat) and 0 < beat < float("inf")):
            raise _malformed("field 'heartbeat_timeout' is not a positive number")
        return cls(
            attempt_id=_uuid(data, "attempt_id"),
            run_id=_uuid(data, "run_id"),
            step_id=_text(data, "step_id"),
            type=_text(data, "type"),
            attempt=attempt,
            params=data.get("params"),
            timeout=None if timeout is None else float(timeout),
            traceparent=traceparent,
            secret_paths=_paths(data.get("secret_paths")),
            token=bytes.fromhex(token),
            heartbeat_timeout=None if beat is None else float(beat),
            last_heartbeat=data.get("last_heartbeat"),
        )


def _malformed(problem: str) -> JobRefused:
    return JobRefused("malformed", f"malformed job: {problem}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _uuid(data: Mapping[str, object], name: str) -> UUID:
    value = data.get(name)
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            pass
    raise _malformed(f"field '{name}' is not a UUID")


def _text(data: Mapping[str, object], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise _malformed(f"field '{name}' is not a non-empty string")
    return value


def _paths(value: object) -> tuple[tuple[str | int, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(path, list) and all(_is_path_part(p) for p in path) for path in value
    ):
        raise _malformed("field 'secret_paths' is not a list of paths")
    return tuple(tuple(path) for path in value)


def _is_path_part(part: object) -> bool:
    return isinstance(part, str) or (isinstance(part, int) and not isinstance(part, bool))


def _message(queue: str, text: str) -> bytes:
    return _DOMAIN + queue.encode("utf-8", "surrogatepass") + b"\x00" + text.encode("ascii")


def _mask(key: bytes, attempt_id: UUID, token: bytes) -> bytes:
    pad = hmac.new(key, _MASK_DOMAIN + attempt_id.bytes, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(token, pad, strict=False))


class JobKeys:
    """The keys jobs are signed with (the first) and accepted under (any)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ConfigError(f"{JOB_KEY_ENV} holds no key")
        self._keys = tuple(keys)

    @classmethod
    def required(cls, text: str | None, process: str) -> JobKeys:
        """The keys of `FLOWFORGE_JOB_KEY` (`text`), or a ConfigError saying `process`
        cannot start without them."""
        if text is None:
            raise ConfigError(
                f"the {process} needs {JOB_KEY_ENV}: the key that signs jobs, the same for "
                "orchestrators and workers (a random string of at least "
                f"{MIN_KEY_LENGTH} characters, e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)"
            )
        return cls.parse(text)

    @classmethod
    def parse(cls, text: str) -> JobKeys:
        """Keys from `FLOWFORGE_JOB_KEY`: comma-separated, the first one signs."""
        keys = [k.strip() for k in text.split(",")]
        keys = [k for k in keys if k]
        if not keys:
            raise ConfigError(
                f"{JOB_KEY_ENV} is empty: set a random string of at least "
                f"{MIN_KEY_LENGTH} characters"
            )
        for number, key in enumerate(keys, start=1):
            if _PLACEHOLDER in key:
                raise ConfigError(
                    f"{JOB_KEY_ENV}: key {number} is still the example's placeholder; "
                    "set a random string"
                )
            if len(key) < MIN_KEY_LENGTH:
                raise ConfigError(
                    f"{JOB_KEY_ENV}: key {number} has {len(key)} characters; each key needs at "
                    f"least {MIN_KEY_LENGTH} (e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`)"
                )
        return cls([k.encode() for k in keys])

    def seal(self, job: Job, queue: str) -> tuple[str, str]:
        """The arq arguments of `job` on `queue`: (payload text, signature)."""
        key = self._keys[0]
        data = job.to_json()
        data["token"] = _mask(key, job.attempt_id, job.token).hex()
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return text, hmac.new(key, _message(queue, text), hashlib.sha256).hexdigest()

    def open(
        self,
        job_id: str,
        queue: str,
        args: Sequence[object],
        kwargs: Mapping[str, object],
        queue_of: Callable[[str], str],
    ) -> Job:
        """The job behind arq's `args` and `kwargs`, if it verifies; else JobRefused.

        `job_id` is arq's job id, `queue` the queue it was taken from, and `queue_of` gives
        the queue of a step type. Nothing of the payload is parsed before its signature is
        checked.
        """
        text, signature = args if len(args) == 2 else (None, None)
        if kwargs or not isinstance(text, str) or not isinstance(signature, str):
            raise _malformed("the job's arguments are not (payload, signature)")
        if not text.isascii():
            raise JobRefused("bad_signature", "the job's signature does not verify")
        key = self._verifying_key(_message(queue, text), signature)
        if key is None:
            raise JobRefused("bad_signature", "the job's signature does not verify")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise _malformed("the payload is not JSON") from None
        job = Job.from_json(data)
        if job_id != str(job.attempt_id):
            raise JobRefused(
                "wrong_job_id",
                f"job id {job_id[:80]!r} is not the payload's attempt {job.attempt_id}",
            )
        if queue != queue_of(job.type):
            raise JobRefused(
                "wrong_queue", f"a job of step type '{job.type}' came off queue {queue}"
            )
        return replace(job, token=_mask(key, job.attempt_id, job.token))

    def _verifying_key(self, message: bytes, signature: str) -> bytes | None:
        if not _SIGNATURE.fullmatch(signature):
            return None
        for key in self._keys:
            expected = hmac.new(key, message, hashlib.sha256).hexdigest()
            if hmac.compare_digest(expected, signature):
                return key
        return None
