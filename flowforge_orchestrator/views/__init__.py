"""What people read about a run, drawn from its history: a step tree for a terminal,
Mermaid and Graphviz pictures (pure)."""
