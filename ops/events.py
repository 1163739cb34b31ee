"""Row-level validation: a raw frame (from a file reader or, later, the event stream) becomes typed events and
quarantined rows. This is the one path every event takes, whatever its source.

Every input row ends up in exactly one of the two outputs: a bad row is never dropped, it is quarantined with a
stable reason code, a human-readable detail, its source and line, and (a capped copy of) the raw row. The rules
are vectorised polars expressions, so that they run on every row at tens of millions of rows per minute; Great
Expectations then judges the clean batch as a whole (see integrations/gx_validation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import polars as pl

from sessionrec.config import IngestConfig
from sessionrec.ops.schema import EVENT_SCHEMA, MAX_RAW_CHARS, QUARANTINE_SCHEMA, RAW_COLUMNS, reason_counts

#: Event type assumed when a source has no event type at all (a plain click log).
DEFAULT_EVENT_TYPE = "view"

_ID_COLUMNS = ("item_id", "session_id", "user_id", "event_id")


@dataclass(frozen=True)
class NormalizedBatch:
    """Typed events, quarantined rows, and counts for the run's metadata."""

    events: pl.DataFrame  # EVENT_SCHEMA
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA
    rows_in: int
    duplicates: int

    @property
    def duplicate_rate(self) -> float:
        return self.duplicates / self.rows_in if self.rows_in else 0.0

    def quarantine_counts(self) -> dict[str, int]:
        return reason_counts(self.quarantine)


def _blank(column: str) -> pl.Expr:
    return pl.col(column).is_null() | (pl.col(column).str.strip_chars() == "")


def _rules(cfg: IngestConfig, now: datetime) -> list[tuple[str, pl.Expr, pl.Expr]]:
    """(reason, failing condition, detail) in priority order: a row reports the first rule it breaks."""
    now_utc = now.astimezone(timezone.utc) if now.tzinfo else now.replace(tzinfo=timezone.utc)
    lowest = datetime.fromisoformat(cfg.min_timestamp.replace("Z", "+00:00"))
    min_ts = pl.lit(lowest).cast(pl.Datetime("us", "UTC"))
    max_ts = pl.lit(now_utc + timedelta(minutes=cfg.max_future_skew_minutes)).cast(pl.Datetime("us", "UTC"))
    known = list(cfg.known_event_types)
    rules: list[tuple[str, pl.Expr, pl.Expr]] = [
        ("missing_item_id", _blank("item_id"), pl.lit("item_id is empty")),
        (
            "missing_session_key",
            _blank("session_id") & _blank("user_id"),
            pl.lit("neither session_id nor user_id is given: the event cannot be put in a session"),
        ),
    ]
    for column in _ID_COLUMNS:
        too_long = pl.col(column).str.len_chars() > cfg.max_id_length
        rules.append(
            (
                "id_too_long",
                too_long.fill_null(False),
                pl.format(f"{column} has {{}} characters (limit {cfg.max_id_length})", pl.col(column).str.len_chars()),
            )
        )
        rules.append(
            (
                f"bad_{column}",
                ~pl.col(column).str.contains(cfg.id_pattern).fill_null(True) & ~_blank(column),
                pl.format(f"{column} {{}} does not match {cfg.id_pattern}", pl.col(column).str.slice(0, 80)),
            )
        )
    rules += [
        (
            "timestamp_too_old",
            pl.col("timestamp") < min_ts,
            pl.format(f"timestamp {{}} is before {cfg.min_timestamp}", pl.col("timestamp")),
        ),
        (
            "timestamp_in_future",
            pl.col("timestamp") > max_ts,
            pl.format(
                f"timestamp {{}} is more than {cfg.max_future_skew_minutes} min in the future", pl.col("timestamp")
            ),
        ),
        (
            "unknown_event_type",
            ~pl.col("event_type").is_in(known),
            pl.format(f"event_type {{}} is not one of {known}", pl.col("event_type").str.slice(0, 80)),
        ),
        (
            "field_too_long",
            (pl.col("category").str.len_chars() > cfg.max_field_length).fill_null(False),
            pl.lit(f"category is longer than {cfg.max_field_length} characters"),
        ),
        ("bad_price", (pl.col("price") < 0).fill_null(False), pl.format("price {} is negative", pl.col("price"))),
    ]
    return rules


def _raw_json() -> pl.Expr:
    """The row as JSON, capped: what a person needs to find and fix it, not a copy of a hostile 10 MB field."""
    fields = [pl.col(c).cast(pl.String).str.slice(0, MAX_RAW_CHARS) for c in RAW_COLUMNS if c not in ("source",)]
    return pl.struct(fields).struct.json_encode().str.slice(0, MAX_RAW_CHARS)


def content_hash() -> pl.Expr:
    """Event id derived from the content (session, user, item, time, type) when the source gives none.

    Two 64-bit hashes with fixed seeds (128 bits): re-ingesting the same events yields the same ids, which is what
    makes ingestion idempotent; exact duplicate rows collapse onto one id and are quarantined as duplicates. The
    hash is stable for the pinned polars version (requirements.lock).
    """
    cols = [pl.col("session_id"), pl.col("user_id"), pl.col("item_id"), pl.col("timestamp"), pl.col("event_type")]
    first = pl.struct(cols).hash(seed=17)
    second = pl.struct(cols).hash(seed=101)
    return pl.format("h{}-{}", first.cast(pl.String), second.cast(pl.String))


def _repeated(ids: pl.Series) -> pl.Series:
    """True for every id already seen earlier in the series (exact).

    A 64-bit hash narrows the search to ids whose hash repeats (cheap integer work on every row); the exact
    string comparison runs on those candidates only.
    """
    repeated = pl.repeat(False, len(ids), dtype=pl.Boolean, eager=True)
    candidates = ids.hash(seed=7).is_duplicated()
    if candidates.any():
        repeated = repeated.scatter(candidates.arg_true(), ~ids.filter(candidates).is_first_distinct())
    return repeated


def normalize(
    raw: pl.DataFrame,
    cfg: IngestConfig,
    *,
    now: datetime,
    batch_id: str,
    seq_base: int = 0,
) -> NormalizedBatch:
    """Apply the row rules to a raw frame (``RAW_COLUMNS``, timestamps already parsed by the reader).

    ``seq_base`` numbers the batch's rows in arrival order after everything ingested before (see ops/lake.py), so
    that sessionization can order ties and measure lateness the same way for files and for the stream.
    """
    missing = [c for c in RAW_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"raw frame lacks columns {missing}: readers must emit all of {list(RAW_COLUMNS)}")
    frame = raw.with_columns(
        pl.col(c).cast(pl.String).str.strip_chars().replace("", None)
        for c in ("event_id", "session_id", "user_id", "item_id", "category")
    ).with_columns(
        pl.col("event_type").cast(pl.String).str.strip_chars().str.to_lowercase().fill_null(DEFAULT_EVENT_TYPE),
        pl.col("price").cast(pl.Float64, strict=False),
        pl.col("timestamp").cast(pl.Datetime("us", "UTC")),
        pl.col("source_line").cast(pl.Int64),
        (pl.int_range(pl.len(), dtype=pl.Int64) + seq_base).alias("seq"),
    )
    rules = _rules(cfg, now)
    # Each rule's mask is its own column (polars evaluates them in parallel); the reason is a cheap code on every
    # row, the first rule broken; the human-readable detail is built for the rejected rows only.
    masks = [f"_m{position}" for position in range(len(rules))]
    frame = frame.with_columns(failing.fill_null(False).alias(m) for m, (_, failing, _) in zip(masks, rules))
    reason = pl.lit(None, dtype=pl.Int16)
    for position in reversed(range(len(rules))):
        reason = pl.when(pl.col(masks[position])).then(pl.lit(position, dtype=pl.Int16)).otherwise(reason)
    frame = frame.with_columns(reason.alias("_rule")).drop(masks)
    if frame["event_id"].null_count():
        frame = frame.with_columns(pl.coalesce(pl.col("event_id"), content_hash()).alias("event_id"))
    detail = pl.lit(None, dtype=pl.String)
    for position, (_, _, why) in enumerate(rules):
        detail = pl.when(pl.col("_rule") == position).then(why).otherwise(detail)
    rejected = frame.filter(pl.col("_rule").is_not_null()).with_columns(
        pl.col("_rule").replace_strict(list(range(len(rules))), [code for code, _, _ in rules]).alias("_reason"),
        detail.alias("_detail"),
    )
    # A filter copies every column; on a clean batch (the usual case) there is nothing to filter out.
    good = frame.filter(pl.col("_rule").is_null()) if rejected.height else frame
    dup = _repeated(good["event_id"])
    duplicates = good.filter(dup).with_columns(
        pl.lit("duplicate_event").alias("_reason"),
        pl.format("event_id {} already seen earlier in this batch", pl.col("event_id")).alias("_detail"),
    )
    events = (good.filter(~dup) if duplicates.height else good).select(list(EVENT_SCHEMA))
    del frame, good
    bad = pl.concat([rejected, duplicates], how="vertical")
    quarantine = bad.select(
        pl.col("source"),
        pl.col("source_line"),
        pl.col("_reason").alias("reason"),
        pl.col("_detail").alias("detail"),
        _raw_json().alias("raw"),
        pl.lit(batch_id).alias("batch_id"),
    )
    return NormalizedBatch(
        events=events.cast(EVENT_SCHEMA),  # type: ignore[arg-type]
        quarantine=quarantine.cast(QUARANTINE_SCHEMA),  # type: ignore[arg-type]
        rows_in=raw.height,
        duplicates=duplicates.height,
    )
