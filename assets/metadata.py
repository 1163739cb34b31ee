"""Small helpers that turn counts into Dagster metadata people can read in the UI."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg


def count_table(counts: Mapping[str, int | float], key: str = "reason", value: str = "rows") -> dg.MetadataValue:
    """A Markdown table (rendered in the asset's materialization panel); '(none)' when there is nothing."""
    if not counts:
        return dg.MetadataValue.md("(none)")
    lines = [f"| {key} | {value} |", "| --- | ---: |"] + [f"| {k} | {v:,} |" for k, v in counts.items()]
    return dg.MetadataValue.md("\n".join(lines))
