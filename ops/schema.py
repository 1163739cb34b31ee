"""The one event schema every source is mapped onto, and the quarantine schema bad rows go to.

Readers (files) and, later, the stream consumer produce a *raw frame*: the canonical column names with values
still as the source gave them (strings, numbers), plus where each row came from. `ops.events.normalize` turns a
raw frame into typed events and quarantined rows; it is the single validation path for batch and stream.
"""

from __future__ import annotations

import polars as pl

#: Typed events as they land in the lake. Item and session ids are strings whatever the source used.
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "session_id": pl.String(),  # null when only a user/device id is known: sessions are derived then
    "user_id": pl.String(),
    "item_id": pl.String(),
    "timestamp": pl.Datetime("us", "UTC"),
    "event_type": pl.String(),
    "category": pl.String(),
    "price": pl.Float64(),
    "source": pl.String(),  # source file (or stream name) the event came from
    "source_line": pl.Int64(),  # 1-based line (file) or position (stream) inside that source
    "seq": pl.Int64(),  # arrival order across all ingested batches: the stable tie-break and the lateness clock
}

#: The raw frame every reader (and, later, the stream consumer) returns: canonical names, timestamps parsed,
#: ids still as the source spelled them. `source`/`source_line` say where each row came from.
RAW_FRAME_SCHEMA: dict[str, pl.DataType] = {name: dtype for name, dtype in EVENT_SCHEMA.items() if name != "seq"}
RAW_COLUMNS: tuple[str, ...] = tuple(RAW_FRAME_SCHEMA)
#: The fields of an event a column mapping can name (everything but the provenance columns).
CANONICAL_FIELDS: tuple[str, ...] = RAW_COLUMNS[:-2]

#: Columns without which no event can be built; a source lacking one of them is a dataset-level error.
REQUIRED_COLUMNS: tuple[str, ...] = ("item_id", "timestamp")

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "source_line": pl.Int64(),
    "reason": pl.String(),  # a short stable code: missing_item_id, bad_timestamp, late_event ...
    "detail": pl.String(),  # what exactly was wrong, for a person
    "raw": pl.String(),  # the row as JSON (or the raw line), capped in length so that a hostile row stays small
    "batch_id": pl.String(),
}

#: Sessionized events: one row per event in its session, in order.
SESSION_EVENT_SCHEMA: dict[str, pl.DataType] = {
    "session_id": pl.String(),
    "item_id": pl.String(),
    "timestamp": pl.Datetime("us", "UTC"),
    "event_type": pl.String(),
    "category": pl.String(),
    "price": pl.Float64(),
    "user_id": pl.String(),
    "position": pl.Int32(),  # 0-based position in the session
    "event_id": pl.String(),
}

#: Raw text kept per quarantined row (the rest is cut: a 10 MB line must not become a 10 MB quarantine row).
MAX_RAW_CHARS = 2_000


def reason_counts(quarantine: pl.DataFrame) -> dict[str, int]:
    """Quarantined rows per reason, most frequent first (for metadata, logs and error messages)."""
    counts = quarantine.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    return dict(zip(counts["reason"].to_list(), counts["len"].to_list(), strict=True))


def empty_quarantine() -> pl.DataFrame:
    return pl.DataFrame(schema=QUARANTINE_SCHEMA)


def empty_events() -> pl.DataFrame:
    return pl.DataFrame(schema=EVENT_SCHEMA)
