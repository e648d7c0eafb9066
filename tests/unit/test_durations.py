"""Durations: every accepted form, every refusal, and display that reads back."""

from __future__ import annotations

import random

import pytest

from flowforge_orchestrator.core.durations import ACCEPTED_FORMS, format_duration, parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (0, 0.0),
        (0.5, 0.5),
        ("90", 90.0),
        ("1.5", 1.5),
        (" 10s ", 10.0),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("2d", 172_800.0),
        ("1.5h", 5400.0),
        ("1d2h3m4s5ms", 93_784.005),
        ("0s", 0.0),
        ("PT1H30M", 5400.0),
        ("P1DT2H", 93_600.0),
        ("PT0.5S", 0.5),
        ("PT0,5S", 0.5),
        ("P2W", 1_209_600.0),
        ("P1D", 86_400.0),
        ("pt1m", 60.0),
    ],
)
def test_accepted_forms(value: str | int | float, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "-1s",
        -1,
        -0.5,
        float("nan"),
        float("inf"),
        "5M",  # months? minutes? refused: units are lower case
        "10S",
        "5x",
        "1s1s",
        "5m1h",  # largest unit first
        "1h30",
        "10 s",
        "1e3",
        "abc",
        "P",
        "PT",
        "P1DT",
        "P1Y",
        "P1M",
        "PT1H30M10",
    ],
)
def test_refused_forms_name_the_accepted_ones(value: str | float) -> None:
    with pytest.raises(ValueError, match="expected a number of seconds") as info:
        parse_duration(value)
    assert ACCEPTED_FORMS in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [True, None, [1], {"s": 1}])
def test_other_types_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="expected a number of seconds"):
        parse_duration(value)  # type: ignore[arg-type]  # a wrong type is what this test sends


def test_years_and_months_say_why() -> None:
    with pytest.raises(ValueError, match="no fixed length"):
        parse_duration("P1Y2M")


def test_unit_order_says_why() -> None:
    with pytest.raises(ValueError, match="largest first"):
        parse_duration("30s1m")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (0.0005, "0.5ms"),
        (1, "1s"),
        (90.5, "1m30.5s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (93_601.25, "1d2h1.25s"),
        (-5, "-5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_reads_back_within_a_millisecond() -> None:
    rng = random.Random(20240601)
    for _ in range(2000):
        seconds = rng.choice([rng.uniform(0, 2), rng.uniform(0, 400_000), rng.randrange(10**6)])
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-3)


def test_iso_and_units_agree() -> None:
    rng = random.Random(7)
    for _ in range(500):
        d, h, m, s = (rng.randrange(0, 50) for _ in range(4))
        if not any((d, h, m, s)):
            continue
        units = "".join(f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if n)
        iso = f"P{d}DT{h}H{m}M{s}S"
        assert parse_duration(units) == parse_duration(iso) == d * 86400 + h * 3600 + m * 60 + s
