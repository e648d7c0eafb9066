"""Listings for people: a header line and columns aligned to their widest cell (pure)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """`headers` in upper case over `rows`, two spaces between columns, no trailing blanks.
    An empty listing is the header alone, so a reader sees what would be there."""
    cells = [
        [str(h).upper() for h in headers],
        *[["" if c is None else str(c) for c in r] for r in rows],
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )
