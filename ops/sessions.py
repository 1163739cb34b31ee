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


def _segment_start(key: str) -> pl.Expr:
    """True on the first row of each run of equal ``key`` values (the frame is sorted by key)."""
    return (pl.col(key) != pl.col(key).shift(1)).fill_null(True)


def _within_segment(value: pl.Expr, start: pl.Expr) -> pl.Expr:
    """``value`` minus its value at the start of the row's segment: a per-group offset without a group-by."""
    return value - pl.when(start).then(value).forward_fill()


def _sort_by_first_then_seq(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` sorted by (``_first``, ``seq``). While ``seq`` (and so ``_first``, the least ``seq`` of a key) is
    in [0, 2^31), the pair packs into one 64-bit integer, which sorts about 1.6x faster than two columns."""
    seq = frame["seq"]
    if frame.height and seq.min() >= 0 and seq.max() < 2**31:  # type: ignore[operator]
        return frame.sort(pl.col("_first") * 2**32 + pl.col("seq"))
    return frame.sort(["_first", "seq"])


def _hashed_key() -> pl.Expr:
    """A 64-bit hash of the session key (the session id, else the user id, salted apart so that a user id cannot
    equal a session id): grouping by an integer is several times faster than by a string. Two keys could share a
    hash; `_keys_collide` finds that exactly afterwards and the exact key is used then."""
    return (
        pl.when(pl.col("session_id").is_not_null())
        .then(pl.col("session_id").hash(seed=0))
        .otherwise(pl.col("user_id").hash(seed=1))
    )


def _exact_key() -> pl.Expr:
    return pl.coalesce(pl.col("session_id"), pl.format("\x1f{}", pl.col("user_id")))  # cannot collide


def _keys_collide(keys: pl.DataFrame, narrow: pl.DataFrame) -> bool:
    """Whether a run of equal grouping keys holds more than one real session key: ``keys`` holds the
    ``session_id`` and ``user_id`` of the rows of ``narrow`` (sorted by key, ``_start`` marking each run)."""
    same_as_previous = pl.col("session_id").eq_missing(pl.col("session_id").shift(1)) & (
        pl.col("session_id").is_not_null() | pl.col("user_id").eq_missing(pl.col("user_id").shift(1))
    )
    return bool(keys.select((~same_as_previous & ~narrow["_start"]).any()).item())


def sessionize(events: pl.DataFrame, cfg: SessionConfig, batch_id: str = "sessionize") -> SessionizeResult:
    """Turn typed events (``EVENT_SCHEMA``) into ordered sessions; see the module docstring for the rules.

    Output order: sessions by the arrival of their key's first event (deterministic, independent of the frame's
    row order), events by (timestamp, seq). The work happens on a narrow frame of integers sorted once; the wide
    event columns are gathered a single time at the end, which is what keeps this at millions of events/s.
    """
    result = _sessionize(events, cfg, batch_id, _hashed_key())
    if result is None:  # two session keys share a 64-bit hash (about one chance in 10^6 at 10^7 keys)
        result = _sessionize(events, cfg, batch_id, _exact_key())
        assert result is not None
    return result


def _sessionize(
    events: pl.DataFrame, cfg: SessionConfig, batch_id: str, key: pl.Expr
) -> SessionizeResult | None:
    """`sessionize` grouping by ``key``; None when ``key`` put two different session keys together."""
    narrow = events.select(
        pl.int_range(pl.len(), dtype=pl.UInt32 if events.height < 2**32 else pl.UInt64).alias("_row"),
        pl.col("seq"),
        pl.col("timestamp").dt.epoch("us").alias("_ts"),
        pl.col("session_id").is_null().alias("_derived"),
        key.alias("_key"),
    ).with_columns(pl.col("seq").min().over("_key").alias("_first")).drop("_key")
    # Arrival order inside each key (one sort of integers); a key's first arrival orders the keys.
    narrow = _sort_by_first_then_seq(narrow).with_columns(_segment_start("_first").alias("_start"))
    decreases = narrow.select(((pl.col("_ts") < pl.col("_ts").shift(1)) & ~pl.col("_start")).any()).item()
    if decreases:  # some event arrived behind a newer one of its key: measure by how much (rare, slower path)
        # Lateness is measured per key, so a shared hash must be found before late events are filtered out;
        # without late events the check runs on the output's own columns below, at no extra gather.
        if _keys_collide(events.select(pl.col("session_id", "user_id").gather(narrow["_row"])), narrow):
            return None
        behind = (pl.col("_ts").cum_max().shift(1).over("_first") - pl.col("_ts")).clip(lower_bound=0).fill_null(0)
    else:
        behind = pl.lit(0, dtype=pl.Int64)
    narrow = narrow.with_columns(behind.alias("_behind_us"))
    allowed_us = int(cfg.allowed_lateness.total_seconds() * 1_000_000)
    is_late = pl.col("_behind_us") > allowed_us
    late_rows = narrow.filter(is_late)
    n_reordered = narrow.filter(~is_late & (pl.col("_behind_us") > 0)).height
    narrow = narrow.filter(~is_late)
    if decreases:  # time order inside a key differs from arrival order: sort by (key, time, arrival)
        narrow = narrow.sort(["_first", "_ts", "seq"]).with_columns(_segment_start("_first").alias("_start"))
    # Derived sessions: a user's events split where the gap exceeds the timeout; numbered per user from 0.
    timeout_us = int(cfg.timeout.total_seconds() * 1_000_000)
    new_session = pl.col("_start") | (pl.col("_derived") & ((pl.col("_ts") - pl.col("_ts").shift(1)) > timeout_us))
    narrow = narrow.with_columns(new_session.fill_null(True).alias("_new"))
    narrow = narrow.with_columns(
        _within_segment(pl.int_range(pl.len(), dtype=pl.Int64), pl.col("_new")).cast(pl.Int32).alias("position")
    )
    # The one wide step. A gather from a column of many chunks (one per lake file and row group) is several
    # times slower than from a contiguous one, so each column is made contiguous first: one at a time, so that
    # the copy costs one column of memory rather than the whole frame (10M events: 0.1 GB, not 0.9 GB).
    rows = narrow["_row"]
    ordered = pl.DataFrame([events[c].rechunk().gather(rows) for c in SESSION_EVENT_SCHEMA if c != "position"])
    if not decreases and _keys_collide(ordered, narrow):
        return None
    session_id = pl.col("session_id")
    if narrow["_derived"].any():  # numbered per user from 0: the session's rank among its user's sessions
        number = narrow.select(_within_segment(pl.col("_new").cast(pl.Int64).cum_sum(), pl.col("_start")))
        session_id = (
            pl.when(narrow["_derived"])
            .then(pl.format("{}#{}", pl.col("user_id"), number.to_series()))
            .otherwise(session_id)
        )
    sessions = ordered.with_columns(narrow["position"], session_id.alias("session_id")).select(
        list(SESSION_EVENT_SCHEMA)
    ).cast(SESSION_EVENT_SCHEMA)  # type: ignore[arg-type]
    late_events = events[late_rows["_row"]].with_columns(late_rows["_behind_us"])
    late = late_events.select(
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
    n_sessions = int(narrow["_new"].sum())
    stats = {
        "events_in": events.height,
        "events_out": sessions.height,
        "sessions": n_sessions,
        "sessions_derived": int((narrow["_new"] & narrow["_derived"]).sum()),
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
