"""A run's step tree as a picture: Mermaid `flowchart` text or a Graphviz `digraph`.

Pure, like `views.render`. Both pictures have one shape: a node per step (its shape by kind,
its colour by status), `depends_on` edges, and for a composite step a group (Mermaid
subgraph, Graphviz cluster) per nested list, which the step leads into: labelled `then`,
`else`, `branch n`, `case n: <when>`, `default`, `catch <errors>`, `compensate`; dashed into
a list that was not taken. A fan-out's elements
share one group, summarised past `max_elements` as in the tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from flowforge_orchestrator.views.render import StepList, StepNode, facts, list_title, summary

__all__ = ["render_dot", "render_mermaid"]

_COLOURS = {  # fill, stroke
    "succeeded": ("#dcfce7", "#16a34a"),
    "failed": ("#fee2e2", "#dc2626"),
    "timed_out": ("#fee2e2", "#dc2626"),
    "running": ("#dbeafe", "#2563eb"),
    "dispatched": ("#dbeafe", "#2563eb"),
    "retrying": ("#fef9c3", "#ca8a04"),
    "cancelled": ("#f3f4f6", "#6b7280"),
    "skipped": ("#f3f4f6", "#9ca3af"),
    "pending": ("#ffffff", "#9ca3af"),
}


def _label(node: StepNode, now: datetime) -> list[str]:
    lines = [node.key, " · ".join(fact for fact in facts(node, now) if fact)]
    if node.caught:
        caught = "failed, caught: " + node.caught
        lines.append(caught if len(caught) <= 60 else caught[:59] + "…")
    if node.error and node.status not in ("succeeded", "skipped"):
        lines.append(node.error if len(node.error) <= 60 else node.error[:59] + "…")
    return lines


def _groups(node: StepNode) -> list[tuple[str, list[StepNode]]]:
    """A group per labelled list, or one group for all of a fan-out's elements."""
    groups = [(list_title(c), c.steps) for c in node.lists if c.label is not None and c.steps]
    elements = [s for c in node.lists if c.label is None for s in c.steps]
    if elements or node.hidden:
        groups.append((f"{node.key}: for each", elements))
    return groups


def _entries(node: StepNode) -> list[tuple[StepList, StepNode]]:
    """The first steps of each nested list: where the composite step leads."""
    found: list[tuple[StepList, StepNode]] = []
    for child in node.lists:
        keys = {s.key for s in child.steps}
        found += [(child, s) for s in child.steps if not keys.intersection(s.depends_on)]
    return found


@dataclass
class _Picture:
    """Walks the tree; a subclass says how a node, a group and an edge are written."""

    now: datetime
    out: list[str] = field(default_factory=list)
    edges: list[str] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)
    count: int = 0

    def new_id(self) -> str:
        # Generated: step keys (`charge[3]`) are not valid Mermaid or DOT ids.
        self.count += 1
        return f"s{self.count}"

    def id_of(self, key: str) -> str:
        if key not in self.ids:
            self.ids[key] = self.new_id()
        return self.ids[key]

    def steps(self, nodes: Sequence[StepNode], indent: str) -> None:
        for node in nodes:
            nid = self.id_of(node.key)
            self.out.append(indent + self.node(nid, node))
            self.edges += [self.edge(self.id_of(dep), nid) for dep in node.depends_on]
            for title, steps in _groups(node):
                gid = self.new_id()
                self.out += [indent + line for line in self.open_group(gid, title)]
                self.steps(steps, indent + "  ")
                if node.hidden and node.kind == "for_each":
                    more = self.new_id()
                    self.out.append(f"{indent}  {self.summary(more, summary(node.hidden))}")
                    self.edges.append(self.edge(nid, more, dashed=True))
                self.out.append(indent + self.close_group())
            for child, entry in _entries(node):
                dashed = child.taken is False or (child.exceptional and child.taken is not True)
                self.edges.append(self.edge(nid, self.id_of(entry.key), child.label, dashed))

    def node(self, nid: str, node: StepNode) -> str:
        raise NotImplementedError

    def open_group(self, gid: str, title: str) -> list[str]:
        raise NotImplementedError

    def close_group(self) -> str:
        raise NotImplementedError

    def summary(self, nid: str, text: str) -> str:
        raise NotImplementedError

    def edge(self, source: str, target: str, label: str | None = None, dashed: bool = False) -> str:
        raise NotImplementedError


# -- Mermaid ---------------------------------------------------------------------------------


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


_MERMAID_SHAPES = {
    "condition": ('{"', '"}'),
    "parallel": ('[["', '"]]'),
    "for_each": ('[["', '"]]'),
    "delay": ('(["', '"])'),
    "transform": ('[/"', '"/]'),
}


class _Mermaid(_Picture):
    def node(self, nid: str, node: StepNode) -> str:
        opening, closing = _MERMAID_SHAPES.get(node.kind, ('["', '"]'))
        label = "<br/>".join(_mermaid_text(line) for line in _label(node, self.now))
        return f"{nid}{opening}{label}{closing}:::{node.status}"

    def open_group(self, gid: str, title: str) -> list[str]:
        return [f'subgraph {gid}["{_mermaid_text(title)}"]']

    def close_group(self) -> str:
        return "end"

    def summary(self, nid: str, text: str) -> str:
        return f'{nid}["{_mermaid_text(text)}"]:::pending'

    def edge(self, source: str, target: str, label: str | None = None, dashed: bool = False) -> str:
        arrow = "-.->" if dashed else "-->"
        text = f"|{_mermaid_text(label)}|" if label else ""  # then, else, branch n
        return f"  {source} {arrow}{text} {target}"


def render_mermaid(nodes: Sequence[StepNode], now: datetime, *, title: str | None = None) -> str:
    """A Mermaid `flowchart TD` (with a front-matter title when given)."""
    picture = _Mermaid(now)
    if title:
        picture.out.append(f"---\ntitle: {_mermaid_text(title)}\n---")
    picture.out.append("flowchart TD")
    for status, (fill, stroke) in _COLOURS.items():
        picture.out.append(f"  classDef {status} fill:{fill},stroke:{stroke}")
    picture.steps(nodes, "  ")
    return "\n".join(picture.out + picture.edges) + "\n"


# -- Graphviz --------------------------------------------------------------------------------


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_DOT_SHAPES = {
    "condition": "diamond",
    "parallel": "box3d",
    "for_each": "box3d",
    "delay": "ellipse",
    "transform": "parallelogram",
}


class _Dot(_Picture):
    def node(self, nid: str, node: StepNode) -> str:
        fill, stroke = _COLOURS.get(node.status, _COLOURS["pending"])
        label = _dot_text("\n".join(_label(node, self.now)))
        shape = _DOT_SHAPES.get(node.kind, "box")
        return f'{nid} [label="{label}", shape={shape}, fillcolor="{fill}", color="{stroke}"];'

    def open_group(self, gid: str, title: str) -> list[str]:
        return [f"subgraph cluster_{gid} {{", f'  label="{_dot_text(title)}";', "  style=rounded;"]

    def close_group(self) -> str:
        return "}"

    def summary(self, nid: str, text: str) -> str:
        return f'{nid} [label="{_dot_text(text)}", shape=note, fillcolor="#ffffff"];'

    def edge(self, source: str, target: str, label: str | None = None, dashed: bool = False) -> str:
        attrs = ([f'label="{_dot_text(label)}"'] if label else []) + (
            ["style=dashed"] if dashed else []
        )
        return f"  {source} -> {target}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";"


def render_dot(nodes: Sequence[StepNode], now: datetime, *, title: str | None = None) -> str:
    """A Graphviz `digraph` (`dot -Tsvg` draws it)."""
    picture = _Dot(now)
    picture.out.append("digraph run {")
    if title:
        picture.out += [f'  label="{_dot_text(title)}";', "  labelloc=t;"]
    picture.out += [
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    picture.steps(nodes, "  ")
    return "\n".join([*picture.out, *picture.edges, "}"]) + "\n"
