"""Signed jobs: a worker opens only what the orchestrator sealed, for the queue it came from."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from uuid import UUID, uuid4

import pytest

from flowforge_orchestrator.errors import ConfigError, JobRefused
from flowforge_orchestrator.queue.jobs import MIN_KEY_LENGTH, Job, JobKeys

KEY = "k" * MIN_KEY_LENGTH
OTHER = "o" * MIN_KEY_LENGTH


def queue_of(step_type: str) -> str:
    return f"flowforge:queue:{step_type}"


def job(**changes: Any) -> Job:
    base = Job(
        attempt_id=uuid4(),
        run_id=uuid4(),
        step_id="charge",
        type="http",
        attempt=1,
        params={"url": "https://pay.test/", "headers": {"Authorization": "${{ secrets.T }}"}},
        timeout=30.0,
        traceparent=None,
        secret_paths=(("headers", "Authorization"),),
        token=bytes(range(16)),
    )
    return replace(base, **changes)


def sealed(keys: JobKeys, j: Job, queue: str = "flowforge:queue:http") -> list[Any]:
    return list(keys.seal(j, queue))


def test_a_sealed_job_opens_as_itself() -> None:
    keys = JobKeys.parse(KEY)
    original = job()
    opened = keys.open(
        str(original.attempt_id), queue_of("http"), sealed(keys, original), {}, queue_of
    )
    assert opened == original


def test_the_payload_is_canonical_json_and_the_token_is_masked() -> None:
    keys = JobKeys.parse(KEY)
    original = job()
    text, signature = keys.seal(original, queue_of("http"))
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert data["attempt_id"] == str(original.attempt_id)
    assert bytes.fromhex(data["token"]) != original.token  # reading Redis does not tell it
    assert len(signature) == 64


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t.replace("https://pay.test/", "https://evil.test/"), "bad_signature"),
        (lambda t: t.replace('"attempt":1', '"attempt":2'), "bad_signature"),
        (lambda t: t + " ", "bad_signature"),
        (lambda t: t.replace("pay.test", "p\u00e4y.test"), "bad_signature"),
    ],
)
def test_an_altered_payload_is_refused(mutate: Any, reason: str) -> None:
    keys = JobKeys.parse(KEY)
    original = job()
    text, signature = keys.seal(original, queue_of("http"))
    with pytest.raises(JobRefused) as info:
        keys.open(
            str(original.attempt_id), queue_of("http"), [mutate(text), signature], {}, queue_of
        )
    assert info.value.reason == reason
    assert "pay.test" not in str(info.value)  # never quotes the payload


def test_a_copy_under_another_job_id_is_refused() -> None:
    keys = JobKeys.parse(KEY)
    original = job()
    with pytest.raises(JobRefused) as info:
        keys.open(str(uuid4()), queue_of("http"), sealed(keys, original), {}, queue_of)
    assert info.value.reason == "wrong_job_id"
    assert str(original.attempt_id) in str(info.value)


def test_a_job_moved_to_another_queue_is_refused() -> None:
    keys = JobKeys.parse(KEY)
    original = job()
    # Signed for its own queue, pushed onto another: the signature covers the queue.
    args = sealed(keys, original)
    with pytest.raises(JobRefused) as info:
        keys.open(str(original.attempt_id), queue_of("sms"), args, {}, queue_of)
    assert info.value.reason == "bad_signature"
    # Signed (by a key holder) for a queue that is not its type's: still refused.
    args = sealed(keys, original, queue_of("sms"))
    with pytest.raises(JobRefused) as info:
        keys.open(str(original.attempt_id), queue_of("sms"), args, {}, queue_of)
    assert info.value.reason == "wrong_queue"


def test_keys_rotate_sign_with_the_first_accept_any() -> None:
    old, new = JobKeys.parse(OTHER), JobKeys.parse(f"{KEY}, {OTHER}")
    original = job()
    from_old = sealed(old, original)
    from_new = sealed(new, original)
    assert new.open(str(original.attempt_id), queue_of("http"), from_old, {}, queue_of) == original
    with pytest.raises(JobRefused):
        old.open(str(original.attempt_id), queue_of("http"), from_new, {}, queue_of)
    with pytest.raises(JobRefused):
        JobKeys.parse("x" * 20).open(
            str(original.attempt_id), queue_of("http"), from_old, {}, queue_of
        )


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ([], {}),
        ([{"attempt_id": "x"}], {}),
        (["{}", "0" * 64, "extra"], {}),
        (["{}"], {"signature": "0" * 64}),
        ([1, 2], {}),
        (["{}", None], {}),
    ],
)
def test_arguments_of_the_wrong_shape_are_refused(args: list[Any], kwargs: dict[str, Any]) -> None:
    with pytest.raises(JobRefused) as info:
        JobKeys.parse(KEY).open("id", queue_of("http"), args, kwargs, queue_of)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("signature", ["", "zz" * 32, "0" * 63, "0" * 64, "\u00e9" * 64])
def test_a_signature_that_is_not_ours_is_refused(signature: str) -> None:
    keys = JobKeys.parse(KEY)
    text, _ = keys.seal(job(), queue_of("http"))
    with pytest.raises(JobRefused) as info:
        keys.open("id", queue_of("http"), [text, signature], {}, queue_of)
    assert info.value.reason == "bad_signature"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attempt_id", "not-a-uuid"),
        ("run_id", 7),
        ("step_id", ""),
        ("type", None),
        ("attempt", True),
        ("attempt", 0),
        ("timeout", -1),
        ("timeout", "30"),
        ("traceparent", 1),
        ("secret_paths", [["headers", 1.5]]),
        ("secret_paths", "headers"),
        ("token", "00"),
    ],
)
def test_a_payload_with_a_wrong_field_is_malformed_and_names_it(field: str, value: Any) -> None:
    data = job().to_json()
    data[field] = value
    with pytest.raises(JobRefused) as info:
        Job.from_json(data)
    assert info.value.reason == "malformed"
    assert field in str(info.value)


def test_job_keys_must_be_long_enough_and_the_error_names_the_setting() -> None:
    for text in ("", " , ", "short", f"{KEY},short", "CHANGE-ME-to-a-random-string"):
        with pytest.raises(ConfigError, match="FLOWFORGE_JOB_KEY"):
            JobKeys.parse(text)


def test_a_job_id_is_compared_as_text() -> None:
    keys = JobKeys.parse(KEY)
    original = job(attempt_id=UUID("12345678-1234-5678-1234-567812345678"))
    with pytest.raises(JobRefused):
        keys.open(
            "12345678123456781234567812345678",
            queue_of("http"),
            sealed(keys, original),
            {},
            queue_of,
        )
