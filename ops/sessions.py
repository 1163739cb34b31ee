"""Sessionization: typed events become ordered sessions.

Rules (each one counted in `SessionizeResult.stats`):

* **Session key.** An event with a `session_id` belongs to that session. An event with only a `user_id` is put in
  a session derived from the user's activity: a new session starts when the user was inactive for longer than
  ``timeout`` (default 30 min). Derived ids are ``<user_id>#<n>`` with ``n`` counting the user's sessions from 0.
* **Lateness.** Arrival order is `seq` (the order events were ingested: file order, then batch order). An event
  whose timestamp is behind the newest event that *arrived before it* in the same session (for derived sessions:
  the same user) by at most ``allowed_lateness`` is put in its place by time (counted as reordered); one further
  behind is quarantined with reason ``late_event`` — the same semantics a streaming watermark would have.
* **Order.** Inside a session events are ordered by (timestamp, seq): ties in time keep their arrival order, a
  property of the events themselves, so the output does not depend on the row order of the input frame.

Nothing else is removed here: exact duplicates were quarantined at ingestion, and the protocol's cleaning
(repeats, short sessions, rare items) is a separate, configurable step (ops/split.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from sessionrec.config import SessionConfig
from sessionrec.ops.schema import MAX_RAW_CHARS, QUARANTINE_SCHEMA, SESSION_EVENT_SCHEMA


@dataclass(frozen=True)
class SessionizeResult:
    events: pl.DataFrame  # SESSION_EVENT_SCHEMA, ordered by (session_id, position)
    late: pl.DataFrame  # QUARANTINE_SCHEMA rows for late events
    stats: dict[str, int]


def sessionize(events: pl.DataFrame, cfg: SessionConfig, batch_id: str = "sessionize") -> SessionizeResult:
    """Turn typed events (``EVENT_SCHEMA``) into ordered sessions; see the module docstring for the rules."""
    frame = events.with_columns(
        pl.when(pl.col("session_id").is_not_null())
        .then(pl.format("s\x1f{}", pl.col("session_id")))
        .otherwise(pl.format("u\x1f{}", pl.col("user_id")))
        .alias("_key")
    )
    # Lateness: how far each event is behind the newest event that arrived before it under the same key.
    frame = frame.sort(["_key", "seq"]).with_columns(
        (pl.col("timestamp").cum_max().shift(1).over("_key") - pl.col("timestamp"))
        .dt.total_microseconds()
        .clip(lower_bound=0)
        .fill_null(0)
        .alias("_behind_us")
    )
    allowed_us = int(cfg.allowed_lateness.total_seconds() * 1_000_000)
    is_late = pl.col("_behind_us") > allowed_us
    late_rows = frame.filter(is_late)
    n_reordered = frame.filter(~is_late & (pl.col("_behind_us") > 0)).height
    frame = frame.filter(~is_late)

    given = frame.filter(pl.col("session_id").is_not_null())
    derived = frame.filter(pl.col("session_id").is_null())
    if derived.height:
        timeout_us = int(cfg.timeout.total_seconds() * 1_000_000)
        derived = (
            derived.sort(["user_id", "timestamp", "seq"])
            .with_columns(
                (
                    (pl.col("timestamp").diff().dt.total_microseconds() > timeout_us)
                    .fill_null(True)
                    .cast(pl.Int32)
                    .cum_sum()
                    .over("user_id")
                    - 1
                ).alias("_n")
            )
            .with_columns(pl.format("{}#{}", pl.col("user_id"), pl.col("_n")).alias("session_id"))
            .drop("_n")
        )
    ordered = (
        pl.concat([given, derived], how="vertical")
        .sort(["session_id", "timestamp", "seq"])
        .with_columns((pl.int_range(pl.len(), dtype=pl.Int32).over("session_id")).alias("position"))
    )
    sessions = ordered.select(list(SESSION_EVENT_SCHEMA)).cast(SESSION_EVENT_SCHEMA)  # type: ignore[arg-type]
    late = late_rows.select(
        pl.col("source"),
        pl.col("source_line"),
        pl.lit("late_event").alias("reason"),
        pl.format(
            "arrived {} s behind the newest earlier event of its session (allowed {} s)",
            (pl.col("_behind_us") // 1_000_000),
            pl.lit(int(cfg.allowed_lateness.total_seconds())),
        ).alias("detail"),
        pl.struct(["event_id", "session_id", "user_id", "item_id", "timestamp", "event_type"])
        .struct.json_encode()
        .str.slice(0, MAX_RAW_CHARS)
        .alias("raw"),
        pl.lit(batch_id).alias("batch_id"),
    ).cast(QUARANTINE_SCHEMA)  # type: ignore[arg-type]
    n_sessions = sessions["session_id"].n_unique() if sessions.height else 0
    stats = {
        "events_in": events.height,
        "events_out": sessions.height,
        "sessions": n_sessions,
        "sessions_derived": derived["session_id"].n_unique() if derived.height else 0,
        "late_reordered": n_reordered,
        "late_quarantined": late.height,
    }
    return SessionizeResult(events=sessions, late=late, stats=stats)


def session_summary(sessions: pl.DataFrame) -> pl.DataFrame:
    """One row per session: what the session-level validation suite and the length histogram look at."""
    return sessions.group_by("session_id").agg(
        pl.len().alias("length"),
        pl.col("item_id").n_unique().alias("n_distinct_items"),
        pl.col("timestamp").min().alias("starts_at"),
        pl.col("timestamp").max().alias("ends_at"),
        ((pl.col("timestamp").max() - pl.col("timestamp").min()).dt.total_seconds()).alias("duration_seconds"),
    )


def length_histogram(summary: pl.DataFrame) -> dict[str, int]:
    """Session lengths in buckets a person can read at a glance (1, 2, 3, 4-5, 6-10, 11-20, 21-50, 51+)."""
    edges = [(1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 20), (21, 50), (51, None)]
    counts: dict[str, int] = {}
    for lo, hi in edges:
        label = str(lo) if hi == lo else (f"{lo}+" if hi is None else f"{lo}-{hi}")
        cond = pl.col("length") >= lo if hi is None else pl.col("length").is_between(lo, hi)
        counts[label] = summary.filter(cond).height
    return counts
