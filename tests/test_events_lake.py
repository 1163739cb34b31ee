"""Row rules (ops/events.py) and the lake's staging/commit (ops/lake.py): nothing lost, nothing duplicated."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from sessionrec.config import IngestConfig
from sessionrec.ops.events import normalize
from sessionrec.ops.lake import Lake
from sessionrec.ops.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA

NOW = datetime(2026, 1, 15, tzinfo=timezone.utc)
T0 = datetime(2026, 1, 10, 12, tzinfo=timezone.utc)


def raw(rows: list[dict]) -> pl.DataFrame:
    base = {"event_id": None, "session_id": "s1", "user_id": None, "item_id": "i1", "timestamp": T0,
            "event_type": "view", "category": None, "price": None, "source": "test.csv"}
    records = [{**base, **row, "source_line": i + 2} for i, row in enumerate(rows)]
    return pl.DataFrame(records, schema_overrides={"price": pl.Float64, "event_id": pl.String,
                                                   "user_id": pl.String, "category": pl.String,
                                                   "timestamp": pl.Datetime("us", "UTC")})


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"item_id": None}, "missing_item_id"),
        ({"item_id": "   "}, "missing_item_id"),
        ({"session_id": None, "user_id": None}, "missing_session_key"),
        ({"item_id": "x" * 300}, "id_too_long"),
        ({"item_id": "bad id"}, "bad_item_id"),
        ({"session_id": "a\x00b"}, "bad_session_id"),
        ({"timestamp": datetime(1980, 1, 1, tzinfo=timezone.utc)}, "timestamp_too_old"),
        ({"timestamp": NOW + timedelta(days=2)}, "timestamp_in_future"),
        ({"event_type": "teleport"}, "unknown_event_type"),
        ({"category": "c" * 5000}, "field_too_long"),
        ({"price": -3.0}, "bad_price"),
    ],
)
def test_each_rule_quarantines_with_its_reason(row: dict, reason: str) -> None:
    batch = normalize(raw([{}, row]), IngestConfig(), now=NOW, batch_id="b")
    assert batch.events.height == 1
    assert batch.quarantine["reason"].to_list() == [reason]
    assert batch.quarantine["source_line"].to_list() == [3]
    assert batch.quarantine["detail"][0]


def test_nothing_lost_and_schemas_hold() -> None:
    rows = [{}, {"item_id": None}, {"item_id": "i2"}, {}, {"event_type": "purchase", "item_id": "i3"}]
    batch = normalize(raw(rows), IngestConfig(), now=NOW, batch_id="b")
    assert batch.events.height + batch.quarantine.height == len(rows)
    assert dict(batch.events.schema) == EVENT_SCHEMA
    assert dict(batch.quarantine.schema) == QUARANTINE_SCHEMA
    assert batch.quarantine_counts() == {"duplicate_event": 1, "missing_item_id": 1}
    assert batch.duplicate_rate == pytest.approx(1 / 5)


def test_content_hash_is_stable_and_given_ids_are_kept() -> None:
    first = normalize(raw([{}, {"item_id": "i2", "event_id": "given-1"}]), IngestConfig(), now=NOW, batch_id="a")
    again = normalize(raw([{}, {"item_id": "i2", "event_id": "given-1"}]), IngestConfig(), now=NOW, batch_id="b")
    assert first.events["event_id"].to_list() == again.events["event_id"].to_list()
    assert first.events["event_id"][1] == "given-1"


def test_hostile_raw_row_is_capped_in_quarantine() -> None:
    batch = normalize(raw([{"item_id": "x" * 5_000_000}]), IngestConfig(), now=NOW, batch_id="b")
    assert batch.quarantine["reason"][0] == "id_too_long"
    assert len(batch.quarantine["raw"][0]) <= 2_000


def test_lake_commit_is_idempotent_and_staging_protects_the_lake(tmp_path) -> None:
    lake = Lake(tmp_path / "lake")
    rows = [{"item_id": f"i{k}", "timestamp": T0 + timedelta(days=k % 3)} for k in range(30)] + [{"item_id": None}]
    batch = normalize(raw(rows), IngestConfig(), now=NOW, batch_id="b1")
    staged = lake.stage("b1", batch.events, batch.quarantine, sources=("test.csv",))
    assert lake.scan_events().collect().height == 0  # staged is not landed
    first = lake.commit(staged)
    assert (first.new_events, first.quarantined, len(first.partitions)) == (30, 1, 3)
    again = lake.commit(lake.stage("b1", batch.events, batch.quarantine))
    assert (again.new_events, again.already_present, again.batch_already_committed) == (0, 30, True)
    assert lake.scan_events().collect().height == 30
    assert lake.scan_quarantine().collect().height == 1  # the same batch is not quarantined twice
    # A different batch overlapping the first lands only its new events.
    more = normalize(raw(rows[:10] + [{"item_id": "new"}]), IngestConfig(), now=NOW, batch_id="b2")
    result = lake.commit(lake.stage("b2", more.events, more.quarantine))
    assert (result.new_events, result.already_present) == (1, 10)
    assert lake.scan_events().collect()["event_id"].is_unique().all()
    assert lake.next_seq() > 0
