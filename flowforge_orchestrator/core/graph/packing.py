"""A running fan-out's element states, packed one letter each and kept current as its
elements move, so that a commit costs what changed, not the size of the fan-out.

An element's letter is its status ('p': pending, or saved on its own entry because it has
an error or a retry timer), its attempt is kept when past 1. The letters live in a
`bytearray` split into parts of `size` letters; an element that moves is only *touched*
(`touch`), and the next checkpoint refreshes the touched ones (`refresh`): a letter or an
attempt that changed marks its part dirty. A fan-out of more than one part stores its
letters in parts (`flowforge.run_parts`), each written by the commit after it changes
(`take_parts`); a smaller one keeps them inline in its checkpoint entry, as before.

So a commit of k changed elements costs O(k + parts touched) in CPU and bytes, where
packing the whole fan-out at every commit cost O(n): O(n^2) over a fan-out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from flowforge_orchestrator.core.graph.nodes import Node
from flowforge_orchestrator.core.records import CheckpointPart
from flowforge_orchestrator.core.state import StepStatus

__all__ = ["LETTERS", "PART_SIZE", "STATUSES", "Packing", "touch"]

# Letters per part: a part row holds ~1 KB of letters (under PostgreSQL's 2 KB TOAST
# threshold, so it is updated in place), and 100,000 elements take 98 rows.
PART_SIZE: Final = 1024

LETTERS: Final = {
    StepStatus.DISPATCHED: "d",
    StepStatus.RUNNING: "r",
    StepStatus.RETRYING: "w",
    StepStatus.PENDING: "p",  # saved only with attempts behind it (a redriven step)
    StepStatus.SUCCEEDED: "S",
    StepStatus.FAILED: "F",
    StepStatus.TIMED_OUT: "T",
    StepStatus.SKIPPED: "K",
    StepStatus.CANCELLED: "C",
}
STATUSES: Final = {letter: status for status, letter in LETTERS.items()}
_CODES: Final = {status: ord(letter) for status, letter in LETTERS.items()}
_PENDING: Final = ord("p")


class Packing:
    """The packed elements of one running fan-out of one worker step (`node.elements`)."""

    __slots__ = ("_dirty", "_new", "_touched", "alone", "attempts", "letters", "node", "size")

    def __init__(self, node: Node, size: int = PART_SIZE) -> None:
        """A fresh expansion: every element pending, every part still to be written."""
        self.node = node
        self.size = size
        count = len(node.elements)
        self.letters = bytearray(b"p" * count)
        parts = -(-count // size)
        self.attempts: list[dict[int, int]] = [{} for _ in range(parts)]  # past 1, by index
        self.alone: dict[str, Node] = {}  # elements saved on their own entry
        self._touched: set[Node] = set()
        self._dirty: set[int] = set(range(parts))
        self._new: set[int] = set(range(parts))  # parts not stored yet: inserted, not updated

    @property
    def parted(self) -> bool:
        """Whether the letters are stored in parts (more than one), not inline."""
        return len(self.attempts) > 1

    def touch(self, element: Node) -> None:
        self._touched.add(element)

    def refresh(self) -> None:
        """Bring the letters up to date with the elements touched since the last refresh."""
        for element in self._touched:
            self._set(element)
        self._touched.clear()

    def reload(self, *, stored: bool) -> None:
        """After a restore set the elements' states: pack them all (once, O(n)). `stored`:
        the parts are in the database as they are now (else all are written next)."""
        self._touched.clear()
        for element in self.node.elements:
            self._set(element)
        if stored:
            self._dirty.clear()
            self._new.clear()

    def _set(self, element: Node) -> None:
        index = element.scope.frame.index
        assert index is not None
        status = element.status
        alone = element.error is not None or status is StepStatus.RETRYING
        if alone and status is not StepStatus.PENDING:
            self.alone[element.key] = element
            code, attempt = _PENDING, 1
        else:
            self.alone.pop(element.key, None)
            code = _CODES[status]
            attempt = 1 if status is StepStatus.PENDING else element.attempt
        part = index // self.size
        attempts = self.attempts[part]
        if self.letters[index] != code:
            self.letters[index] = code
            self._dirty.add(part)
        if attempts.get(index, 1) != attempt:
            if attempt == 1:
                del attempts[index]
            else:
                attempts[index] = attempt
            self._dirty.add(part)

    def inline(self) -> tuple[str, dict[str, int]]:
        """All the letters and the attempts past 1 by index (`i` and `na`)."""
        merged = {str(i): n for part in self.attempts for i, n in sorted(part.items())}
        return self.letters.decode("ascii"), merged

    def take_parts(self) -> list[CheckpointPart]:
        """The parts that changed since the last call, to write with the next commit."""
        key, size, out = self.node.key, self.size, []
        for part in sorted(self._dirty):
            attempts = self.attempts[part]
            out.append(
                CheckpointPart(
                    step=key,
                    part=part,
                    letters=self.letters[part * size : (part + 1) * size].decode("ascii"),
                    attempts={str(i): n for i, n in sorted(attempts.items())} or None,
                    new=part in self._new,
                )
            )
        self._dirty.clear()
        self._new.clear()
        return out


def touch(packed: Mapping[str, Packing], node: Node) -> None:
    """`node` moved: if it is a packed element, its fan-out repacks it at the next
    checkpoint."""
    if node.packed and node.scope.owner is not None:
        packing = packed.get(node.scope.owner.key)
        if packing is not None:
            packing.touch(node)
