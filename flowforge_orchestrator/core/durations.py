"""Durations as written in definitions: a number of seconds, `1h30m`, or ISO 8601 `PT1H30M`.

Everything inside the engine is a float of seconds; these forms exist only for the people
writing definitions. Accepted, all non-negative:

* a number (int or float) or a numeric string: seconds (`30`, `0.5`, `"90"`);
* units, largest first, each at most once, optional spaces between them: `250ms`, `10s`,
  `5m`, `1h30m`, `1h 30m`, `2d`, `1.5h` (`d`, `h`, `m`, `s`, `ms`; lower case only, so `M`
  is never mistaken for months);
* ISO 8601 durations with weeks, days, hours, minutes and seconds: `PT1H30M`, `P1DT2H`,
  `PT0.5S`, `P2W`. Years and months are refused: they have no fixed length.
"""

from __future__ import annotations

import math
import re

__all__ = ["ACCEPTED_FORMS", "format_duration", "parse_duration"]

ACCEPTED_FORMS = (
    "a number of seconds, a string like 250ms, 10s, 5m, 1h30m or 2d "
    "(units d, h, m, s, ms, largest first), or an ISO 8601 duration like PT1H30M or P1DT2H"
)

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_UNIT_ORDER = ("d", "h", "m", "s", "ms")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN = re.compile(rf"{_NUMBER}")
_COMPONENT = re.compile(rf"\s*({_NUMBER})(ms|d|h|m|s)\s*")
_ISO_NUMBER = r"(?:\d+(?:[.,]\d*)?|[.,]\d+)"
_ISO = re.compile(
    rf"P(?:(?P<Y>{_ISO_NUMBER})Y)?(?:(?P<MO>{_ISO_NUMBER})M)?(?:(?P<W>{_ISO_NUMBER})W)?"
    rf"(?:(?P<D>{_ISO_NUMBER})D)?"
    rf"(?:T(?:(?P<H>{_ISO_NUMBER})H)?(?:(?P<MI>{_ISO_NUMBER})M)?(?:(?P<S>{_ISO_NUMBER})S)?)?",
    re.IGNORECASE,
)
_ISO_SECONDS = {"W": 604800.0, "D": 86400.0, "H": 3600.0, "MI": 60.0, "S": 1.0}


def _invalid(value: object, why: str = "") -> ValueError:
    detail = f" ({why})" if why else ""
    return ValueError(f"invalid duration {value!r}{detail}: expected {ACCEPTED_FORMS}")


def _checked(value: object, seconds: float) -> float:
    if math.isnan(seconds) or math.isinf(seconds):
        raise _invalid(value, "not a finite number")
    if seconds < 0:
        raise _invalid(value, "negative")
    return seconds


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value`; raises ValueError naming the accepted forms on anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _invalid(value, f"a {type(value).__name__}")
    if not isinstance(value, str):
        return _checked(value, float(value))
    text = value.strip()
    if not text:
        raise _invalid(value, "empty")
    if text.startswith("-"):
        raise _invalid(value, "negative")
    if _PLAIN.fullmatch(text):
        return _checked(value, float(text))
    if text[0] in "Pp":
        return _checked(value, _parse_iso(value, text))
    return _checked(value, _parse_units(value, text))


def _parse_units(value: str, text: str) -> float:
    total = 0.0
    position = 0
    last_rank = -1
    while position < len(text):
        match = _COMPONENT.match(text, position)
        if match is None:
            raise _invalid(value)
        number, unit = match.groups()
        rank = _UNIT_ORDER.index(unit)
        if rank <= last_rank:
            raise _invalid(value, "units must be largest first, each at most once")
        last_rank = rank
        total += float(number) * _UNITS[unit]
        position = match.end()
    return total


def _parse_iso(value: str, text: str) -> float:
    match = _ISO.fullmatch(text)
    if match is None or not any(match.groupdict().values()) or text.upper().endswith("T"):
        raise _invalid(value)
    if match["Y"] is not None or match["MO"] is not None:
        raise _invalid(value, "years and months have no fixed length")
    return sum(
        float(match[key].replace(",", ".")) * factor
        for key, factor in _ISO_SECONDS.items()
        if match[key] is not None
    )


def format_duration(seconds: float) -> str:
    """Short display form (`1h30m`, `250ms`, `1m30.5s`) that `parse_duration` reads back."""
    if math.isnan(seconds) or math.isinf(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    millis = round(seconds * 1000, 3)
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{_trim(millis)}ms"
    whole_ms = int(millis)
    days, rest = divmod(whole_ms, 86_400_000)
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = rest / 1000 + (millis - whole_ms) / 1000
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if secs:
        parts.append(f"{_trim(round(secs, 6))}s")
    return "".join(parts)


def _trim(number: float) -> str:
    text = f"{number:.6f}".rstrip("0").rstrip(".")
    return text or "0"
