"""The synthetic generator: schema, determinism, realistic structure (what downstream stages rely on), writing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from sessionrec.config import CANONICAL_EVENT_TYPES, GeneratorConfig
from sessionrec.ops.generate import GeneratorError, generate_events, write_events
from sessionrec.ops.schema import EVENT_SCHEMA

COLUMNS = ["event_id", "session_id", "user_id", "item_id", "timestamp", "event_type", "category", "price"]
SMALL = GeneratorConfig(n_events=20_000, n_items=1_000, n_categories=20, n_users=2_000, days=7, seed=7)
DRIFT = SMALL.model_copy(update={"drift_start_day": 4, "drift_new_items": 0.2, "drift_popularity_shift": 0.5})
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return generate_events(SMALL)


@pytest.fixture(scope="module")
def drifted() -> pl.DataFrame:
    return generate_events(DRIFT)


def _item_number() -> pl.Expr:
    """Item ids are numbered: the original catalogue is i0..i{n_items-1}, items new at the drift come after."""
    return pl.col("item_id").str.slice(1).cast(pl.Int64)


def _transitions(sessions: pl.DataFrame) -> pl.DataFrame:
    """Consecutive (item, next item) pairs inside sessions, consecutive repeats dropped (the cleaning protocol)."""
    distinct = sessions.filter(
        pl.col("item_id") != pl.col("item_id").shift(1).over("session_id").fill_null("")
    )
    return distinct.select(
        pl.col("item_id").alias("item"), pl.col("item_id").shift(-1).over("session_id").alias("next")
    ).drop_nulls()


def test_schema_row_count_ids_and_order(events: pl.DataFrame) -> None:
    assert events.columns == COLUMNS
    assert dict(events.schema) == {column: EVENT_SCHEMA[column] for column in COLUMNS}
    assert events.height == SMALL.n_events
    assert events["event_id"].n_unique() == events.height
    assert events["event_id"][123] == "e0000000123"
    assert events["timestamp"].is_sorted()
    assert events.null_count().sum_horizontal().item() == 0
    assert set(events["event_type"].unique()) == set(CANONICAL_EVENT_TYPES)
    assert events["item_id"].str.contains(r"^i\d+$").all() and events["category"].str.contains(r"^c\d+$").all()
    # Sessions are interleaved in the log, not written one after the other.
    assert (events["session_id"] != events["session_id"].shift(1)).sum() > 2 * events["session_id"].n_unique()
    # One price and one category per item.
    per_item = events.group_by("item_id").agg(pl.col("price").n_unique(), pl.col("category").n_unique())
    assert (per_item["price"] == 1).all() and (per_item["category"] == 1).all()
    assert (events["price"] > 0).all()


@pytest.mark.parametrize("n_events", [1, 7, 1_001])
def test_exact_row_count_for_any_size(n_events: int) -> None:
    assert generate_events(SMALL.model_copy(update={"n_events": n_events})).height == n_events


def test_deterministic_by_seed(events: pl.DataFrame) -> None:
    assert generate_events(SMALL).equals(events)
    other = generate_events(SMALL.model_copy(update={"seed": 8}))
    assert not other.equals(events)
    assert other["item_id"].to_list() != events["item_id"].to_list()


def test_without_session_ids_only_the_ids_go(events: pl.DataFrame) -> None:
    anonymous = generate_events(SMALL.model_copy(update={"with_session_ids": False}))
    assert anonymous["session_id"].null_count() == anonymous.height
    assert anonymous.schema["session_id"] == pl.String
    assert anonymous.drop("session_id").equals(events.drop("session_id"))


def test_timeout_sessionization_recovers_the_sessions_exactly(events: pl.DataFrame) -> None:
    timeout = timedelta(minutes=30)
    ordered = events.sort(["user_id", "timestamp"])
    derived = ordered.with_columns(
        derived=(
            (pl.col("user_id") != pl.col("user_id").shift(1)) | (pl.col("timestamp").diff() > timeout)
        ).fill_null(True).cum_sum()
    )
    pairs = derived.select("derived", "session_id").unique()
    assert pairs.height == derived["derived"].n_unique() == events["session_id"].n_unique()
    # Users really come back: many have several sessions, all separable by the timeout.
    per_user = events.group_by("user_id").agg(pl.col("session_id").n_unique().alias("sessions"))
    assert (per_user["sessions"] >= 3).sum() > 100
    gaps = events.sort("session_id", "timestamp").select(pl.col("timestamp").diff().over("session_id"))
    assert gaps.drop_nulls().max().item() < timeout


def test_realistic_lengths_gaps_and_daily_rhythm(events: pl.DataFrame) -> None:
    lengths = events.group_by("session_id").len()["len"]
    assert abs(lengths.mean() - SMALL.mean_session_length) < 0.1 * SMALL.mean_session_length
    assert lengths.median() < lengths.mean()  # skewed: many short sessions, a long tail
    assert lengths.max() > 5 * SMALL.mean_session_length and lengths.max() <= 300
    gaps = (
        events.sort("session_id", "timestamp")
        .select(pl.col("timestamp").diff().over("session_id").dt.total_seconds())
        .drop_nulls()
        .to_series()
    )
    assert 10 <= gaps.median() <= 90
    assert 0.02 < (gaps > 120).mean() < 0.3  # occasional minutes
    assert events["timestamp"].min() >= START and events["timestamp"].max() < START + timedelta(days=SMALL.days)
    starts = events.group_by("session_id").agg(pl.col("timestamp").min())["timestamp"]
    hours = starts.dt.hour()
    assert hours.is_between(18, 21).sum() > 3 * hours.is_between(2, 5).sum()  # evening peak, night trough


def test_popularity_has_a_long_tail(events: pl.DataFrame) -> None:
    counts = events["item_id"].value_counts(sort=True)["count"]
    n_items = SMALL.n_items
    assert counts.head(n_items // 10).sum() > 0.5 * events.height  # top 10 % of the catalogue: most events
    assert counts.len() > 0.8 * n_items  # ... yet most items are seen
    assert counts[0] > 50 * counts.median()


def _most_frequent_next(train: pl.DataFrame, key: str) -> pl.DataFrame:
    """Per value of ``key``: the next item seen most often after it in training (ties: smallest id)."""
    counts = train.group_by(key, "next").len().sort("len", "next", descending=[True, False])
    return counts.group_by(key).first().select(key, pl.col("next").alias(f"guess_{key}"))


def _hit_rate(test: pl.DataFrame, guesses: pl.DataFrame, key: str, default: str) -> float:
    guessed = test.join(guesses, on=key, how="left").with_columns(pl.col(f"guess_{key}").fill_null(default))
    return (guessed[f"guess_{key}"] == guessed["next"]).mean()


def test_first_order_structure_beats_popularity_on_held_out_sessions(events: pl.DataFrame) -> None:
    """Learned on the first 80 % of sessions (by start), scored on the last 20 %: accuracy of the top guess.

    Beating the category's most frequent next item too shows item-level structure, not just category
    stickiness (with follow_probability=0 the first-order model only ties with it).
    """
    starts = events.group_by("session_id").agg(pl.col("timestamp").min()).sort("timestamp", "session_id")
    cut = int(0.8 * starts.height)
    categories = events.select(pl.col("item_id").alias("item"), "category").unique()

    def transitions(ids: pl.Series) -> pl.DataFrame:
        pairs = _transitions(events.filter(pl.col("session_id").is_in(ids.implode())))
        return pairs.join(categories, on="item")

    train, test = transitions(starts["session_id"][:cut]), transitions(starts["session_id"][cut:])
    assert test.height > 2_000
    most_popular = train["next"].value_counts(sort=True)["next"][0]
    popularity = (test["next"] == most_popular).mean()
    per_category = _hit_rate(test, _most_frequent_next(train, "category"), "category", most_popular)
    first_order = _hit_rate(test, _most_frequent_next(train, "item"), "item", most_popular)
    assert first_order > 0.25
    assert first_order > 4 * popularity
    assert first_order > 1.8 * per_category


def test_purchase_funnel(events: pl.DataFrame) -> None:
    shares = events["event_type"].value_counts(normalize=True)
    share = dict(zip(shares["event_type"], shares["proportion"], strict=True))
    assert share["view"] > 0.5 and share["view"] > share["click"] > share["add_to_cart"] > share["purchase"] > 0
    ordered = events.sort("session_id", "timestamp").with_columns(
        prev_type=pl.col("event_type").shift(1).over("session_id"),
        prev_item=pl.col("item_id").shift(1).over("session_id"),
    )
    carts = ordered.filter(pl.col("event_type") == "add_to_cart")
    assert (carts["prev_type"].is_in(["view", "click"]) & (carts["prev_item"] == carts["item_id"])).all()
    purchases = ordered.filter(pl.col("event_type") == "purchase")
    assert purchases.height > 50
    assert ((purchases["prev_type"] == "add_to_cart") & (purchases["prev_item"] == purchases["item_id"])).all()


def test_drift_brings_new_items_and_moves_popularity(events: pl.DataFrame, drifted: pl.DataFrame) -> None:
    drift_at = START + timedelta(days=DRIFT.drift_start_day)
    numbered = drifted.with_columns(
        new=_item_number() >= DRIFT.n_items, after=pl.col("timestamp") >= drift_at
    )
    after = numbered.filter(pl.col("after"))
    # Sessions straddling the drift day belong to the old regime, so the share is slightly diluted.
    assert 0.12 < after["new"].mean() < 0.26
    assert numbered.filter(~pl.col("after"))["new"].sum() == 0
    assert numbered.filter(pl.col("new"))["timestamp"].min() >= drift_at
    assert events.select((_item_number() < SMALL.n_items).all()).item()

    def shift(frame: pl.DataFrame) -> float:
        """Total variation distance between the original items' shares before and after the drift day."""
        old = frame.filter(_item_number() < SMALL.n_items)
        shares = [
            part.group_by("item_id").len().with_columns(pl.col("len") / pl.col("len").sum())
            for part in (old.filter(pl.col("timestamp") < drift_at), old.filter(pl.col("timestamp") >= drift_at))
        ]
        both = shares[0].join(shares[1], on="item_id", how="full", coalesce=True)
        difference = pl.col("len").fill_null(0) - pl.col("len_right").fill_null(0)
        return 0.5 * both.select(difference.abs().sum()).item()

    assert shift(drifted) > shift(events) + 0.1


def test_progress_reports_every_event() -> None:
    calls: list[tuple[int, int]] = []
    generate_events(
        SMALL.model_copy(update={"n_events": 5_000}), progress=lambda done, total: calls.append((done, total))
    )
    assert len(calls) > 5 and calls[-1] == (5_000, 5_000)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:], strict=False))


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"follow_probability": 0.8, "repeat_probability": 0.2, "category_switch_probability": 0.1}, "exceeds 1"),
        ({"n_items": 10, "n_categories": 11}, "every category needs an item"),
        ({"start": "yesterday"}, "ISO-8601"),
        ({"mean_session_length": 200.0}, "too long"),
        ({"n_users": 1, "days": 1}, "raise n_users to at least"),
    ],
)
def test_impossible_configurations_are_refused(update: dict[str, object], message: str) -> None:
    with pytest.raises(GeneratorError, match=message):
        generate_events(SMALL.model_copy(update=update))


def _read(path: Path) -> pl.DataFrame:
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    schema = {column: EVENT_SCHEMA[column] for column in COLUMNS} | {"timestamp": pl.String}
    if path.suffix == ".jsonl":
        frame = pl.read_ndjson(path, schema=schema)
    else:
        frame = pl.read_csv(path, separator="\t" if path.suffix == ".tsv" else ",", schema=schema)
    text = frame["timestamp"]
    assert text.str.contains(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$").all()
    return frame.with_columns(pl.col("timestamp").str.to_datetime(time_unit="us", time_zone="UTC"))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("with_session_ids", [True, False])
def test_write_read_round_trip(tmp_path: Path, suffix: str, with_session_ids: bool) -> None:
    frame = generate_events(SMALL.model_copy(update={"n_events": 2_000, "with_session_ids": with_session_ids}))
    path = write_events(frame, tmp_path / "nested" / "dir" / f"events{suffix}")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]
    assert _read(path).equals(frame)


def test_unknown_extension_is_a_clear_value_error(tmp_path: Path, events: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"unknown extension '\.xlsx'.*\.parquet"):
        write_events(events, tmp_path / "events.xlsx")
    assert not any(tmp_path.iterdir())
