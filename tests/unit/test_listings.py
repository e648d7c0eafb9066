"""Listings people read: aligned columns under a header; durations as written."""

from __future__ import annotations

import yaml

from flowforge_orchestrator.cli.definitions import durations_as_written, spec_yaml
from flowforge_orchestrator.views.tables import format_table


def test_columns_are_aligned_under_an_upper_case_header() -> None:
    text = format_table(["run", "status", "took"], [["a1", "completed", "2s"], ["b", None, ""]])
    assert text.splitlines() == [
        "RUN  STATUS     TOOK",
        "a1   completed  2s",
        "b",
    ]
    assert format_table(["name"], []) == "NAME"


SPEC = {
    "name": "slow",
    "version": 1,
    "timeout": 300.0,
    "defaults": {"retry": {"initial_interval": 1.0, "max_interval": 90.0, "max_retries": 3}},
    "steps": [
        {"id": "nap", "type": "delay", "duration": 2.0},
        {
            "id": "call",
            "type": "http",
            "timeout": 0.25,
            "with": {"url": "https://x/", "timeout": 7},
        },
    ],
}


def test_durations_are_shown_as_written_and_user_data_is_left_alone() -> None:
    shown = durations_as_written(SPEC)
    assert shown["timeout"] == "5m"
    assert shown["defaults"]["retry"] == {
        "initial_interval": "1s",
        "max_interval": "1m30s",
        "max_retries": 3,
    }
    assert shown["steps"][0]["duration"] == "2s"
    assert shown["steps"][1]["timeout"] == "250ms"
    assert shown["steps"][1]["with"] == {"url": "https://x/", "timeout": 7}


def test_definitions_show_prints_5m_not_300_seconds() -> None:
    shown = yaml.safe_load(spec_yaml(SPEC))
    assert (shown["timeout"], shown["steps"][0]["duration"]) == ("5m", "2s")
