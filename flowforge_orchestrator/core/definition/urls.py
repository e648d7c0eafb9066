"""The `with.url` of an http step as a template: each `${{ }}` value is percent-encoded for
the part of the URL it lands in, so data cannot change what the definition wrote.

A value in the path is one segment (`/` is encoded too) and may not make a `.` or `..`
segment; a value in the query is a name or a value (`&`, `=`, `+` and `#` encoded); a
value in the fragment stays in the fragment. The scheme, userinfo, host and port are the
definition's: the literal text before the first `${{` must end them (`https://host[:port]`
followed by `/`, `?` or `#`). One exception, on purpose: a URL may start with one
expression giving the base (an absolute http(s) URL, so data chooses the host; the worker's
destination policy still applies), followed by literal text starting with `/`, `?` or `#`,
or by nothing.

Pure: no I/O. Shape problems are reported by definition validation (`url_template_problem`)
and, for a definition registered before the rule, when the URL is rendered (its step fails
with an expression error; nothing else is touched).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from flowforge_orchestrator.core.expressions.templates import (
    Evaluator,
    Expression,
    Template,
    TemplateString,
    compile_template,
    to_text,
)
from flowforge_orchestrator.errors import ExpressionError

__all__ = ["UrlTemplate", "url_string", "url_template_problem"]

FIELD = "with.url"
# `scheme://authority` then the delimiter that ends the authority.
_LITERAL_BASE = re.compile(r"(?i)(https?)://([^/?#]+)(?=[/?#])")
_DELIMITERS = "/?#"
_DELIMITER = re.compile(r"[/?#]")
_SPECIAL = re.compile(r"[/?#&=]")  # the characters that move from one part to another


class _Part(enum.Enum):
    PATH = "path"
    QUERY_NAME = "query name"
    QUERY_VALUE = "query value"
    FRAGMENT = "fragment"


# What each part leaves as it is besides letters, digits and `_.-~` (RFC 3986). Everything that
# could end the part (`/` in a segment, `&` `=` `#` in the query, `%` everywhere) is encoded,
# and so are `+` and `;`, which some servers read as a space or a path parameter.
_SAFE = {
    _Part.PATH: ":@!$'()*,",
    _Part.QUERY_NAME: ":@!$'()*,/?",
    _Part.QUERY_VALUE: ":@!$'()*,/?",
    _Part.FRAGMENT: ":@!$&'()*+,;=/?",
}
_SHAPE = (
    "the text before the first ${{ }} must end the scheme and host, as in "
    "'https://api.example.com/' followed by the path, '?' or '#' (a value may not choose "
    "the host, port or credentials); or the URL may start with one expression that gives "
    "the base URL, followed by text starting with '/', '?' or '#'"
)


def url_string(template: Template) -> TemplateString | None:
    """The `url` string of a `with` template, when it holds `${{ }}`."""
    return next((s for s in template.strings if s.path == ("url",)), None)


def url_template_problem(text: str) -> str | None:
    """Why `text` cannot be an http step's URL template, or None (also when an expression
    does not compile: that is reported as an expression problem)."""
    try:
        string = url_string(compile_template({"url": text}, field="with"))
    except ExpressionError:
        return None
    return None if string is None else _shape_problem(string.parts)


def _shape_problem(parts: tuple[str | Expression, ...]) -> str | None:
    first = parts[0]
    if isinstance(first, Expression):  # the base form
        after = parts[1] if len(parts) > 1 else ""
        if isinstance(after, str) and (not after or after[0] in _DELIMITERS):
            return None
        return _SHAPE
    if _LITERAL_BASE.match(first):
        return None
    return _SHAPE


@dataclass(frozen=True)
class UrlTemplate:
    """A compiled URL template; `render` gives the URL with every value encoded."""

    parts: tuple[str | Expression, ...]
    step_id: str | None = None
    problem: str | None = None  # a shape the rules refuse: rendering fails with it

    @classmethod
    def of(cls, string: TemplateString, step_id: str | None = None) -> UrlTemplate:
        """From the `url` string of a compiled `with` template; never raises."""
        return cls(string.parts, step_id, _shape_problem(string.parts))

    @classmethod
    def compile(cls, text: str, *, step_id: str | None = None) -> UrlTemplate:
        """Compile `text` (a CEL syntax error is an ExpressionError naming `with.url`)."""
        string = url_string(compile_template({"url": text}, step_id=step_id, field="with"))
        if string is None:
            return cls((text,), step_id, None)
        return cls.of(string, step_id)

    def render(self, context: Mapping[str, Any], evaluator: Evaluator | None = None) -> str:
        """The URL for `context`; ExpressionError (naming `with.url`) if it cannot be made.
        `evaluator` evaluates its expressions (the graph's bounded one), as for templates."""
        if self.problem is not None:
            raise ExpressionError(
                self.problem, expression=_source(self.parts), step_id=self.step_id, field=FIELD
            )
        if all(isinstance(p, str) for p in self.parts):
            return "".join(str(p) for p in self.parts)
        writer = _Writer()
        for index, part in enumerate(self.parts):
            if isinstance(part, str):
                if index == 0:
                    part = writer.authority(part)
                writer.literal(part)
            elif index == 0:
                writer.literal(writer.authority(_base(part, part.evaluate(context, evaluator))))
            else:
                writer.value(part, _text(part, part.evaluate(context, evaluator)))
        return writer.finish()


def _source(parts: tuple[str | Expression, ...]) -> str:
    return "".join(p if isinstance(p, str) else "${{ " + p.source + " }}" for p in parts)


def _base(expression: Expression, value: Any) -> str:
    """The base URL an expression gave; its text is never quoted in an error (it may hold
    credentials)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            parts = urlsplit(text)
        except ValueError:
            parts = None
        if parts is not None and parts.scheme.lower() in ("http", "https") and parts.netloc:
            return text
    what = "a string that is not one" if isinstance(value, str) else f"a {type(value).__name__}"
    raise expression.error(
        f"the base of {FIELD} must be an absolute http:// or https:// URL; it gave {what}"
    )


def _text(expression: Expression, value: Any) -> str:
    try:
        return to_text(value)
    except ValueError as exc:
        raise expression.error(f"result is not JSON: {exc}") from exc


class _Writer:
    """Builds the URL, knowing which part it is in and the path segment being written."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.part = _Part.PATH
        self.segment: list[str] = []
        self.touched: Expression | None = None  # the (last) expression in this segment

    def authority(self, text: str) -> str:
        """Write `scheme://authority` of `text` as it is; return the rest."""
        found = _DELIMITER.search(text, text.find("://") + 3)
        end = found.start() if found else len(text)
        self.out.append(text[:end])
        return text[end:]

    def literal(self, text: str) -> None:
        position = 0
        for found in _SPECIAL.finditer(text):
            self._plain(text[position : found.start()])
            self._char(found.group())
            position = found.end()
        self._plain(text[position:])

    def _plain(self, text: str) -> None:
        if text:
            (self.segment if self.part is _Part.PATH else self.out).append(text)

    def _char(self, char: str) -> None:
        part = self.part
        if part is _Part.PATH:
            if char in _DELIMITERS:
                self._end_segment()
                if char == "?":
                    self.part = _Part.QUERY_NAME
                elif char == "#":
                    self.part = _Part.FRAGMENT
                self.out.append(char)
            else:
                self.segment.append(char)
            return
        if part is not _Part.FRAGMENT:
            if char == "#":
                self.part = _Part.FRAGMENT
            elif char == "&":
                self.part = _Part.QUERY_NAME
            elif char == "=" and part is _Part.QUERY_NAME:
                self.part = _Part.QUERY_VALUE
        self.out.append(char)

    def value(self, expression: Expression, text: str) -> None:
        encoded = quote(text, safe=_SAFE[self.part])
        if self.part is _Part.PATH:
            self.segment.append(encoded)
            self.touched = expression
        else:
            self.out.append(encoded)

    def _end_segment(self) -> None:
        segment = "".join(self.segment)
        if self.touched is not None and unquote(segment) in (".", ".."):
            # `..` (or `%2E%2E`, which servers may decode) would climb out of the path.
            raise self.touched.error(
                f"its value makes the path segment {unquote(segment)!r} of {FIELD}, "
                "which would change the path the definition wrote"
            )
        self.out.append(segment)
        self.segment, self.touched = [], None

    def finish(self) -> str:
        if self.part is _Part.PATH:
            self._end_segment()
        return "".join(self.out)
