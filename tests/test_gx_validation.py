"""Great Expectations suites: clean data passes, each kind of dataset-level problem fails with a useful message.

great_expectations is imported once for the whole test session (the module imports it lazily, ~10 s).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from sessionrec.config import CANONICAL_EVENT_TYPES, IngestConfig, ValidationConfig
from sessionrec.integrations import gx_validation as gxv
from sessionrec.ops.errors import DatasetError, SessionrecError
from sessionrec.ops.schema import EVENT_SCHEMA

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)
START = datetime(2026, 2, 1, tzinfo=timezone.utc)
INGEST = IngestConfig()
VALIDATION = ValidationConfig()


def make_events(n: int, events_per_session: int = 5) -> pl.DataFrame:
    """A clean batch of ``n`` events in EVENT_SCHEMA: sessions of consecutive events a second apart."""
    i = pl.int_range(0, n)
    return pl.select(
        event_id="e" + i.cast(pl.String),
        session_id="s" + (i // events_per_session).cast(pl.String),
        user_id="u" + (i // (4 * events_per_session)).cast(pl.String),
        item_id="item_" + (i * 7919 % 997).cast(pl.String),
        timestamp=pl.lit(START) + pl.duration(seconds=i),
        event_type=pl.lit(pl.Series(CANONICAL_EVENT_TYPES)).gather(i % len(CANONICAL_EVENT_TYPES)),
        category="c" + (i % 13).cast(pl.String),
        price=pl.when(i % 10 == 0).then(None).otherwise((i % 50) + 0.99),
        source=pl.lit("events.csv"),
        source_line=i + 2,
        seq=i,
    ).select(pl.col(name).cast(dtype) for name, dtype in EVENT_SCHEMA.items())


def summarize(events: pl.DataFrame) -> pl.DataFrame:
    """The session summary the sessionization step produces: one row per session."""
    return (
        events.group_by("session_id")
        .agg(
            length=pl.len(),
            n_distinct_items=pl.col("item_id").n_unique(),
            starts_at=pl.col("timestamp").min(),
            ends_at=pl.col("timestamp").max(),
        )
        .with_columns(duration_seconds=(pl.col("ends_at") - pl.col("starts_at")).dt.total_seconds())
        .sort("session_id")
    )


def aggregates(events: pl.DataFrame, *, n_quarantined: int = 0, n_duplicates: int = 0) -> dict:
    return gxv.batch_aggregates(
        events,
        INGEST,
        NOW,
        n_input_rows=events.height + n_quarantined,
        n_quarantined=n_quarantined,
        n_duplicates=n_duplicates,
    )


def failed(report: gxv.ValidationReport) -> set[tuple[str, str | None]]:
    return {(o.expectation, o.column) for o in report.failures()}


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return make_events(5_000)


# ------------------------------------------------------------------------------------------------ clean data


def test_clean_batch_passes_every_suite(events: pl.DataFrame) -> None:
    reports = [
        gxv.validate_events(events, INGEST, VALIDATION, NOW),
        gxv.validate_batch_aggregates(aggregates(events, n_quarantined=40, n_duplicates=10), VALIDATION),
        gxv.validate_sessions(summarize(events), VALIDATION),
    ]
    for report in reports:
        assert report.success, report.message()
        assert report.failures() == []
        assert "passed" in report.message()
        json.dumps(report.as_metadata())  # serialisable as Dagster metadata
    events_report, batch_report, sessions_report = reports
    assert events_report.rows_validated == events.height and not events_report.sampled
    assert len(events_report.outcomes) == len(gxv.load_suite("events")["expectations"])
    # the session report holds the sample suite and the all-row aggregate suite
    assert len(sessions_report.outcomes) == sum(
        len(gxv.load_suite(name)["expectations"]) for name in ("sessions", "sessions_batch")
    )
    assert batch_report.as_metadata()["parameters"]["max_duplicate_rate"] == VALIDATION.max_duplicate_rate


# ------------------------------------------------------------------------------------------- event failures


def test_unknown_event_type_is_named(events: pl.DataFrame) -> None:
    bad = events.with_columns(
        event_type=pl.when(pl.col("seq") % 100 == 3).then(pl.lit("teleport")).otherwise(pl.col("event_type"))
    )
    report = gxv.validate_events(bad, INGEST, VALIDATION, NOW)
    assert not report.success
    assert failed(report) == {("expect_column_values_to_be_in_set", "event_type")}
    assert "'teleport'" in report.message() and "extra_event_types" in report.message()
    assert aggregates(bad)["n_event_types_unknown"] == 50
    batch = gxv.validate_batch_aggregates(aggregates(bad), VALIDATION)
    assert failed(batch) == {("expect_column_values_to_be_between", "n_event_types_unknown")}


def test_extra_event_types_come_from_config(events: pl.DataFrame) -> None:
    bad = events.with_columns(event_type=pl.lit("teleport"))
    widened = IngestConfig(extra_event_types=("teleport",))
    assert gxv.validate_events(bad, widened, VALIDATION, NOW).success


def test_bad_item_id_format_is_named(events: pl.DataFrame) -> None:
    bad = events.with_columns(
        item_id=pl.when(pl.col("seq") == 17).then(pl.lit("item 17\t")).otherwise(pl.col("item_id"))
    )
    report = gxv.validate_events(bad, INGEST, VALIDATION, NOW)
    assert failed(report) == {("expect_column_values_to_match_regex", "item_id")}
    assert "1 of 5000 rows" in report.message() and "id_pattern" in report.message()


def test_future_timestamps_fail_both_suites(events: pl.DataFrame) -> None:
    future = NOW + timedelta(minutes=INGEST.max_future_skew_minutes + 5)
    bad = events.with_columns(
        timestamp=pl.when(pl.col("seq") < 3).then(pl.lit(future)).otherwise(pl.col("timestamp"))
    )
    report = gxv.validate_events(bad, INGEST, VALIDATION, NOW)
    assert failed(report) == {("expect_column_values_to_be_between", "timestamp")}
    assert "3 of 5000 rows" in report.message() and "time zone" in report.message()
    batch = gxv.validate_batch_aggregates(aggregates(bad), VALIDATION)
    assert failed(batch) == {("expect_column_values_to_be_between", "n_outside_time_window")}
    # within the allowed skew the same events are fine
    assert gxv.validate_events(bad, INGEST, VALIDATION, NOW + timedelta(hours=1)).success


def test_missing_identity_and_column_are_reported(events: pl.DataFrame) -> None:
    bad = events.with_columns(
        session_id=pl.when(pl.col("seq") < 10).then(None).otherwise(pl.col("session_id")),
        user_id=pl.when(pl.col("seq") < 4).then(None).otherwise(pl.col("user_id")),
    ).drop("category")
    report = gxv.validate_events(bad, INGEST, VALIDATION, NOW)
    assert failed(report) == {
        ("expect_column_values_to_not_be_null", "user_id"),  # only where session_id is null as well
        ("expect_table_columns_to_match_set", None),
    }
    assert "missing columns ['category']" in report.message()


def test_duplicate_rate_threshold_comes_from_config(events: pl.DataFrame) -> None:
    figures = aggregates(events, n_quarantined=1_500, n_duplicates=1_300)  # 20 % of 6500 input rows
    assert figures["duplicate_rate"] == pytest.approx(0.2)
    strict = gxv.validate_batch_aggregates(figures, ValidationConfig(max_duplicate_rate=0.1))
    assert failed(strict) == {("expect_column_values_to_be_between", "duplicate_rate")}
    assert "value 0.2" in strict.message() and "max_value=0.1" in strict.message()
    assert "max_duplicate_rate" in strict.message()
    assert gxv.validate_batch_aggregates(figures, ValidationConfig(max_duplicate_rate=0.25)).success


def test_quarantine_rate_threshold(events: pl.DataFrame) -> None:
    figures = aggregates(events, n_quarantined=events.height * 2)  # two thirds quarantined
    report = gxv.validate_batch_aggregates(figures, VALIDATION)
    assert failed(report) == {("expect_column_values_to_be_between", "quarantine_rate")}
    assert "quarantine reasons" in report.message()


def test_empty_batch_fails_with_a_message() -> None:
    empty = make_events(0)
    report = gxv.validate_events(empty, INGEST, VALIDATION, NOW)
    assert failed(report) == {("expect_table_row_count_to_be_between", None)}
    assert report.rows_validated == 0
    batch = gxv.validate_batch_aggregates(aggregates(empty, n_quarantined=12), VALIDATION)
    assert ("expect_column_values_to_be_between", "row_count") in failed(batch)
    assert "every row was quarantined" in batch.message()


def test_naive_now_and_bad_counts_are_refused(events: pl.DataFrame) -> None:
    with pytest.raises(SessionrecError, match="timezone-aware"):
        gxv.validate_events(events, INGEST, VALIDATION, NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="inconsistent batch counts"):
        gxv.batch_aggregates(events, INGEST, NOW, n_input_rows=10, n_quarantined=0, n_duplicates=0)
    with pytest.raises(DatasetError, match="lacks columns"):
        gxv.batch_aggregates(events.drop("event_type"), INGEST, NOW, n_input_rows=events.height,
                             n_quarantined=0, n_duplicates=0)


# ----------------------------------------------------------------------------------------- session failures


def test_negative_session_duration_is_named(events: pl.DataFrame) -> None:
    summary = summarize(events)
    bad = summary.with_columns(
        starts_at=pl.when(pl.int_range(pl.len()) == 7).then(pl.col("ends_at") + pl.duration(minutes=5))
        .otherwise(pl.col("starts_at")),
        duration_seconds=pl.when(pl.int_range(pl.len()) == 7).then(-300).otherwise(pl.col("duration_seconds")),
    )
    report = gxv.validate_sessions(bad, VALIDATION)
    assert failed(report) == {
        ("expect_column_values_to_be_between", "duration_seconds"),
        ("expect_column_pair_values_a_to_be_greater_than_b", "ends_at,starts_at"),
        ("expect_column_values_to_be_between", "min_duration_seconds"),
        ("expect_column_values_to_be_between", "n_ends_before_starts"),
    }
    assert "-300" in report.message() and "out of order" in report.message()


def test_overlong_session_is_caught_even_outside_the_sample() -> None:
    summary = summarize(make_events(6_000, events_per_session=3))  # 2000 sessions
    limits = ValidationConfig(gx_sample_rows=1_000, max_session_length_check=50)
    last = pl.col("session_id") == "s1999"
    bad = summary.with_columns(length=pl.when(last).then(51).otherwise(pl.col("length")))
    report = gxv.validate_sessions(bad, limits)
    assert report.sampled and report.rows_validated == 1_000
    # the aggregate suite sees every session, whether or not the sample drew this one
    assert ("expect_column_values_to_be_between", "max_length") in failed(report)
    assert "value 51" in report.message() and "timeout_minutes" in report.message()
    assert gxv.validate_sessions(bad, limits.model_copy(update={"max_session_length_check": 51})).success


def test_overlong_session_duration_and_missing_columns(events: pl.DataFrame) -> None:
    summary = summarize(events)
    too_long = summary.with_columns(duration_seconds=pl.col("duration_seconds") + 3600 * 24 * 31)
    report = gxv.validate_sessions(too_long, VALIDATION)
    assert {c for _, c in failed(report)} == {"duration_seconds", "max_duration_seconds"}
    broken = gxv.validate_sessions(summary.drop("ends_at"), VALIDATION)
    assert ("expect_table_columns_to_match_set", None) in failed(broken)
    assert "missing columns ['ends_at']" in broken.message()
    with pytest.raises(DatasetError, match="cannot compute the session summary figures") as error:
        gxv.validate_sessions(summary.with_columns(starts_at=pl.col("starts_at").cast(pl.String)), VALIDATION)
    assert error.value.code == "bad_column_types"


# ----------------------------------------------------------------------------------------------- sampling


def test_sample_is_bounded_deterministic_and_spread_over_the_batch() -> None:
    big = make_events(300_000)
    # unknown types only in the last third: a head() "sample" would never see them
    bad = big.with_columns(
        event_type=pl.when((pl.col("seq") >= 200_000) & (pl.col("seq") % 50 == 0))
        .then(pl.lit("teleport"))
        .otherwise(pl.col("event_type"))
    )
    limits = ValidationConfig(gx_sample_rows=20_000)
    first = gxv.validate_events(bad, INGEST, limits, NOW)
    second = gxv.validate_events(bad, INGEST, limits, NOW)
    assert first.sampled and first.rows_validated == 20_000
    assert first.outcomes == second.outcomes
    (outcome,) = first.failures()
    unexpected = int(outcome.observed.split(" of ")[0])
    assert 90 <= unexpected <= 180  # 2000 bad rows of 300000: a 20000-row sample holds about 133


# ------------------------------------------------------------------------------------------------- suites


@pytest.mark.parametrize("name", ["events", "events_batch", "sessions", "sessions_batch"])
def test_suites_are_valid_and_parameterised(name: str) -> None:
    raw = gxv.load_suite(name)
    suite = gxv.build_suite(raw)
    assert len(suite.expectations) == len(raw["expectations"])
    for expectation in raw["expectations"]:
        assert expectation.get("description") and expectation["meta"].get("fix"), expectation
    assert gxv.suite_parameter_names(raw) <= {
        "known_event_types", "id_pattern", "max_id_length", "min_timestamp", "max_timestamp",
        "max_duplicate_rate", "max_quarantine_rate", "max_session_length_check", "max_session_seconds",
    }


def test_events_suite_covers_the_event_schema() -> None:
    (columns,) = [
        e["kwargs"]["column_set"]
        for e in gxv.load_suite("events")["expectations"]
        if e["type"] == "expect_table_columns_to_match_set"
    ]
    assert set(columns) == set(EVENT_SCHEMA)
    (summary_columns,) = [
        e["kwargs"]["column_set"]
        for e in gxv.load_suite("sessions")["expectations"]
        if e["type"] == "expect_table_columns_to_match_set"
    ]
    assert tuple(summary_columns) == gxv.SESSION_SUMMARY_COLUMNS


def test_config_thresholds_are_parameters_not_literals() -> None:
    """No value of IngestConfig/ValidationConfig is baked into the JSON: they must change with the config."""
    text = "".join(path.read_text() for path in gxv.SUITES_DIR.glob("*.json"))
    for literal in (INGEST.id_pattern, INGEST.min_timestamp, str(VALIDATION.max_duplicate_rate),
                    str(VALIDATION.max_session_length_check)):
        assert json.dumps(literal)[1:-1] not in text


def test_unknown_or_invalid_suite_is_a_clear_error(tmp_path, monkeypatch) -> None:
    with pytest.raises(SessionrecError, match="available suites"):
        gxv.load_suite("nope")
    typo = {"type": "expect_column_values_to_be_betwen", "kwargs": {}}
    (tmp_path / "broken.json").write_text(json.dumps({"name": "broken", "expectations": [typo]}))
    monkeypatch.setattr(gxv, "SUITES_DIR", tmp_path)
    with pytest.raises(SessionrecError, match="#0 .*not a valid GX"):
        gxv.build_suite(gxv.load_suite("broken"))
