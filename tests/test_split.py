"""Cleaning and temporal split (ops/split.py), on hand-made cases and on the real YOOCHOOSE slice."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import polars as pl

from sessionrec.config import CleaningConfig, SplitConfig
from sessionrec.ops.sessiondata import read_split_tsv
from sessionrec.ops.split import clean, make_split, write_split

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def frame(sessions: dict[str, tuple[float, list[str]]]) -> pl.DataFrame:
    """session -> (start day offset, items), one event a minute."""
    rows = [(sid, item, T0 + timedelta(days=day, minutes=k))
            for sid, (day, items) in sessions.items() for k, item in enumerate(items)]
    return pl.DataFrame(rows, schema={"session_id": pl.String, "item_id": pl.String,
                                      "timestamp": pl.Datetime("us", "UTC")}, orient="row")


def test_cleaning_steps_and_their_counts() -> None:
    data = frame({"a": (0, ["x", "x", "y"]), "b": (0, ["x"]), "c": (0, ["y", "rare"]), "d": (0, list("xyxyxy"))})
    cleaned, steps = clean(data, CleaningConfig(min_item_support=2, max_session_length=4))
    assert cleaned.group_by("session_id", maintain_order=True).agg("item_id").sort("session_id").rows() == [
        ("a", ["x", "y"]), ("d", ["x", "y", "x", "y"])]
    names = [s["step"] for s in steps]
    assert names[0] == "drop_consecutive_repeats" and steps[0]["events_removed"] == 1
    assert any(n.startswith("cap_session_length_4") for n in names)
    # the rare item's removal made session c too short: the iteration caught it
    assert sum(s["sessions_removed"] for s in steps) == 2


def test_keeping_repeats_is_an_option() -> None:
    cleaned, _ = clean(frame({"a": (0, ["x", "x", "y"])}), CleaningConfig(drop_consecutive_repeats=False,
                                                                            min_item_support=1))
    assert cleaned.height == 3


def test_temporal_split_removes_unknown_items_and_short_test_sessions() -> None:
    data = frame({
        "old1": (0, ["a", "b", "c"]), "old2": (1, ["a", "b"]), "mid": (2.5, ["b", "c"]),
        "new1": (3.5, ["a", "new", "b"]), "new2": (3.6, ["new", "c"]),
    })
    result = make_split(data, CleaningConfig(min_item_support=1), SplitConfig(test_days=1, valid_days=1))
    assert set(result.test["session_id"]) == {"new1"}
    assert result.test["item_id"].to_list() == ["a", "b"]
    assert result.stats["test_split"]["unknown_item_events_removed"] == 2
    assert result.stats["test_split"]["short_sessions_removed"] == 1
    assert set(result.valid["session_id"]) == {"mid"}
    assert set(result.train_tr["session_id"]) == {"old1", "old2"}
    assert set(result.train["session_id"]) == {"old1", "old2", "mid"}
    # no test session leaks into training
    assert not set(result.test["session_id"]) & set(result.train["session_id"])


def test_real_yoochoose_split_round_trips_through_tsv(shared_data, tmp_path) -> None:
    slice_dir = shared_data / "yoochoose" / "session-rec"
    parts = [read_split_tsv(slice_dir / f) for f in ("yoochoose-clicks-100k_train_full.txt",
                                                    "yoochoose-clicks-100k_test.txt")]
    events = pl.concat(parts).select(
        pl.col("SessionId").alias("session_id"), pl.col("ItemId").alias("item_id"),
        pl.from_epoch((pl.col("Time") * 1e6).cast(pl.Int64), time_unit="us").dt.replace_time_zone("UTC")
        .alias("timestamp"))
    result = make_split(events, CleaningConfig(drop_consecutive_repeats=False), SplitConfig(test_days=1))
    paths = write_split(result, tmp_path)
    test = read_split_tsv(paths["test"])
    assert test.columns == ["SessionId", "ItemId", "Time"]
    assert test.height == result.test.height
    # The last day is the test set: close to the public slice's own test file (3,416 sessions, 13,568 events).
    assert 3_300 <= test["SessionId"].n_unique() <= 3_416
    assert set(test["ItemId"]) <= set(read_split_tsv(paths["train"])["ItemId"])
    stats = json.loads(paths["stats"].read_text())
    assert stats["files"]["test"]["events"] == test.height
    assert stats["next_item_predictions"]["test"] == test.height - test["SessionId"].n_unique()
