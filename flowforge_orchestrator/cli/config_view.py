"""The settings for people: the effective values with secrets masked (`config`), and the
README's table of every setting, generated from the `Settings` model so the two never drift
(`config --markdown`). Pure: the environment is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePath
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from flowforge_orchestrator.cli.common import SECRET_PREFIX
from flowforge_orchestrator.config import Settings

__all__ = [
    "MASK",
    "SettingValue",
    "effective_settings",
    "env_name",
    "mask_url",
    "replace_settings_table",
    "settings_table",
]

MASK = "***"
ENV_PREFIX = "FLOWFORGE_"

# Defaults computed when a process starts: the table says what they are made of.
DYNAMIC_DEFAULTS = {"node_id": "`<hostname>-<pid>`"}

# Not a field of the model: any number of variables, read by workers only.
SECRET_ROW = (
    f"| `{SECRET_PREFIX}<NAME>` | unset | The value of `${{{{ secrets.NAME }}}}`, read by "
    "workers only, never stored or logged. |"
)

_DURATION = re.compile(r"(seconds|interval|timeout|delay|grace)$")  # floats of seconds
_SENSITIVE_NAME = re.compile(r"password|secret|token|credential|api_key", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def mask_url(url: str) -> str:
    """`postgresql://app:s3cret@db/x` -> `postgresql://app:***@db/x`; a `password=` query
    parameter or libpq keyword (`host=db password=s3cret`) is masked too."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub(lambda m: m[1] + MASK, url)
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SENSITIVE_NAME.search(k) for k, _ in pairs):
            masked = [(k, MASK if _SENSITIVE_NAME.search(k) else v) for k, v in pairs]
            query = urlencode(masked, safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _shown(name: str, value: object) -> str:
    if isinstance(value, SecretStr) or (_SENSITIVE_NAME.search(name) and value is not None):
        return MASK
    text = _text(value)
    return mask_url(text) if name.endswith("_url") and text else text


@dataclass(frozen=True)
class SettingValue:
    env: str
    value: str  # masked where it holds a secret; "" when unset
    source: str  # "environment" | "default" | "unset"


def effective_settings(settings: Settings, environ: Mapping[str, str]) -> list[SettingValue]:
    """Every setting as this process sees it, then each `FLOWFORGE_SECRET_*` (masked)."""
    present = {key.upper() for key in environ}
    found = [
        SettingValue(
            env_name(name),
            _shown(name, value),
            "environment"
            if env_name(name) in present
            else "default"
            if value is not None
            else "unset",
        )
        for name in Settings.model_fields
        for value in [getattr(settings, name)]
    ]
    found += [
        SettingValue(key, MASK, "environment")
        for key in sorted(environ)
        if key.upper().startswith(SECRET_PREFIX)
    ]
    return found


# -- the README table ------------------------------------------------------------------------


def _default(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        if name not in DYNAMIC_DEFAULTS:
            raise ValueError(
                f"setting {name} has a computed default: describe it in DYNAMIC_DEFAULTS"
            )
        return DYNAMIC_DEFAULTS[name]
    value = field.default
    if value is None:
        return "unset"
    text = f"`{_text(value)}`"
    if isinstance(value, int) and not isinstance(value, bool) and name.endswith("_bytes"):
        text += f" ({_bytes(value)})"
    if isinstance(value, PurePath):
        text = f"`{value}`"
    if isinstance(value, float) and _DURATION.search(name):
        text += " s"
    return text


def _bytes(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} bytes"


def settings_table() -> str:
    """The Markdown table of every setting: variable, default, meaning."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{env_name(name)}` | {_default(name, field)} | {meaning} |")
    lines.append(SECRET_ROW)
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- settings table: generated by `flowforge-orchestrator config --markdown`; "
TABLE_END = "<!-- end of settings table -->"


def replace_settings_table(text: str, table: str) -> str:
    """`text` (the README) with the table between its markers replaced by `table`."""
    start = text.find(TABLE_START)
    end = text.find(TABLE_END, start)
    if start < 0 or end < 0:
        raise ValueError(f"no settings table markers ({TABLE_START}... {TABLE_END}) found")
    body = text.index("\n", start) + 1
    return text[:body] + table + text[end:]
