"""Readers on the real datasets (counts from each PROVENANCE.md), the native layouts without a shared file
(DIGINETICA, RetailRocket, raw YOOCHOOSE clicks) as small fixtures in their public layout, generic files through
a column mapping, and `parse_timestamps`."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from sessionrec.ops.errors import DatasetError
from sessionrec.ops.readers import (
    RAW_FRAME_SCHEMA,
    ColumnMapping,
    ReadOptions,
    ReadResult,
    detect_format,
    expand_paths,
    read_events,
    read_many,
)
from sessionrec.ops.schema import QUARANTINE_SCHEMA
from sessionrec.ops.timestamps import parse_timestamps


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def epoch(seconds: float) -> datetime:
    """An epoch in seconds as the reader must give it: rounded to the microsecond."""
    return datetime.fromtimestamp(0, timezone.utc) + timedelta(microseconds=round(seconds * 1e6))


def assert_contract(result: ReadResult, source: Path) -> None:
    assert result.frame.schema == pl.Schema(RAW_FRAME_SCHEMA)
    assert result.quarantine.schema == pl.Schema(QUARANTINE_SCHEMA)
    assert result.frame["timestamp"].null_count() == 0
    assert result.frame["source"].unique().to_list() in ([str(source)], [])
    assert result.quarantine["batch_id"].null_count() == result.quarantine.height


def data_lines(path: Path, header: bool) -> int:
    """Non-blank physical lines of a text file, minus the header."""
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    return len(lines) - int(header)


# ------------------------------------------------------------------------------------------------ real datasets


YOOCHOOSE = {
    # file: (rows, sessions, items, first epoch, last epoch, header lines) — PROVENANCE.md
    "session-rec/yoochoose-clicks-100k_train_full.txt": (70_278, 17_794, 2_933, 1396314141.719, 1396831392.56, 1),
    "session-rec/yoochoose-clicks-100k_test.txt": (13_568, 3_416, 1_771, 1396831793.197, 1396918201.534, 1),
    "pyGRU4REC/train.tsv": (58_233, 12_372, 6_359, 1411844425.298, 1411930707.66, 0),
    "pyGRU4REC/test.tsv": (71_222, 15_324, 6_751, 1411929440.695, 1412017199.43, 0),
}


@pytest.mark.parametrize("name", sorted(YOOCHOOSE))
def test_yoochoose_slices(shared_data: Path, name: str) -> None:
    rows, sessions, items, first, last, header = YOOCHOOSE[name]
    path = shared_data / "yoochoose" / name
    assert detect_format(path) == "yoochoose"
    result = read_events(path)
    assert_contract(result, path)
    frame = result.frame
    assert (result.format, frame.height, result.quarantine.height) == ("yoochoose", rows, 0)
    assert result.source_columns == ("SessionId", "ItemId", "Time")
    assert frame["session_id"].n_unique() == sessions
    assert frame["item_id"].n_unique() == items
    assert frame["timestamp"].min() == epoch(first) and frame["timestamp"].max() == epoch(last)
    assert frame["event_type"].unique().to_list() == ["click"]
    assert frame["item_id"].str.contains(r"^\d{9}$").all()  # ids as written, 9 digits, never numbers
    assert frame["source_line"].to_list() == list(range(1 + header, rows + 1 + header))
    absent = frame.select("event_id", "user_id", "category", "price")
    assert absent.null_count().sum_horizontal().item() == 4 * rows


def test_yoochoose_first_click_is_the_raw_files_first_line(shared_data: Path) -> None:
    """PROVENANCE: session 1's first click, item 214536502, at 1396860669.277 (the session-rec test slice)."""
    path = shared_data / "yoochoose/session-rec/yoochoose-clicks-100k_test.txt"
    first = read_events(path).frame.row(0, named=True)
    assert (first["session_id"], first["item_id"], first["source_line"]) == ("1", "214536502", 2)
    assert first["timestamp"] == utc(2014, 4, 7, 8, 51, 9, 277_000)


def test_rees46_head_of_october(shared_data: Path) -> None:
    path = shared_data / "rees46" / "2019-Oct.csv"
    assert detect_format(path) == "rees46"
    result = read_events(path)
    assert_contract(result, path)
    frame, quarantine = result.frame, result.quarantine
    assert (result.format, frame.height) == ("rees46", 17_434)
    # The truncated last line (8 fields, no user_session) is quarantined, not dropped, not a session-less event.
    assert quarantine.select("source_line", "reason").rows() == [(17_436, "malformed_line")]
    assert "expected 9 fields" in quarantine["detail"][0] and "found 8" in quarantine["detail"][0]
    assert quarantine["raw"][0].startswith("2019-10-01 02:50:00 UTC,view,10900305,")
    assert frame.height + quarantine.height == data_lines(path, header=True)
    counts = dict(frame["event_type"].value_counts().iter_rows())
    assert counts == {"view": 17_055, "add_to_cart": 165, "purchase": 214}
    assert frame["session_id"].n_unique() == 5_066
    assert frame["item_id"].n_unique() == 6_493
    assert frame["user_id"].n_unique() == 4_504
    assert frame["session_id"].null_count() == 0
    assert frame["timestamp"].min() == utc(2019, 10, 1) and frame["timestamp"].max() == utc(2019, 10, 1, 2, 50)
    assert (frame["price"].min(), frame["price"].max(), int((frame["price"] == 0).sum())) == (0.0, 2574.07, 19)
    # category = category_code when present (115 codes) else the 19-digit category_id, kept as text.
    no_code = frame.filter(~pl.col("category").str.contains(r"[a-z]"))
    assert no_code.height == 5_746 and no_code["category"].str.contains(r"^\d{19}$").all()
    assert frame.filter(pl.col("category").str.contains(r"[a-z]"))["category"].n_unique() == 115
    assert frame.row(0, named=True) | {"source": None} == {
        "event_id": None,
        "session_id": "72d76fde-8bb3-4e00-8c23-a032dfed738c",
        "user_id": "541312140",
        "item_id": "44600062",
        "event_type": "view",
        "category": "2103807459595387724",
        "price": 35.79,
        "timestamp": utc(2019, 10, 1),
        "source": None,
        "source_line": 2,
    }


def test_trivago_item_events_and_counted_non_item_actions(shared_data: Path) -> None:
    path = shared_data / "trivago" / "trivago_val_100k.parquet.snappy"
    assert detect_format(path) == "trivago"
    result = read_events(path)
    assert_contract(result, path)
    frame, quarantine = result.frame, result.quarantine
    assert frame.height + quarantine.height == 100_003
    reasons = dict(quarantine["reason"].value_counts().iter_rows())
    # filter selection 5,303 + search for destination 3,060 + change of sort order 2,948 + search for poi 1,080
    assert reasons == {"not_an_item_event": 12_391, "missing_item_id": 4}
    assert quarantine.filter(pl.col("reason") == "missing_item_id")["detail"].str.contains("'unknown'").all()
    types = dict(frame["event_type"].value_counts().iter_rows())
    assert types == {"view": 68_538 + 1_829 + 1_445 + 1_159 + 1_044 - 4, "click": 13_597}
    assert frame["item_id"].n_unique() == 13_949
    assert frame["item_id"].str.contains(r"^\d+$").all()
    assert frame["timestamp"].min() >= utc(2018, 11, 7, 0, 2, 19)
    assert frame["timestamp"].max() <= utc(2018, 11, 8, 23, 59, 42)
    # source_line is the Parquet row, so file order (step order inside a session) is kept.
    lines = pl.concat([frame["source_line"], quarantine["source_line"]]).sort()
    assert lines.to_list() == list(range(1, 100_004))
    assert result.source_columns[:6] == ("user_id", "session_id", "timestamp", "step", "action_type", "reference")


def test_otto_sessions_are_flattened(shared_data: Path) -> None:
    path = shared_data / "otto" / "train.jsonl"
    assert detect_format(path) == "otto"
    result = read_events(path)
    assert_contract(result, path)
    frame = result.frame
    assert (result.format, frame.height, result.quarantine.height) == ("otto", 862, 0)
    types = dict(frame["event_type"].value_counts().iter_rows())
    assert types == {"click": 800, "add_to_cart": 52, "purchase": 10}
    assert frame["session_id"].n_unique() == 20 and frame["item_id"].n_unique() == 510
    assert frame["timestamp"].min() == utc(2022, 7, 31, 22, 0, 0, 25_000)
    assert frame["timestamp"].max() == utc(2022, 8, 28, 21, 59, 57, 885_000)
    assert sorted(frame["source_line"].unique().to_list()) == list(range(1, 21))  # the line of each session
    assert frame.group_by("source_line").agg(pl.col("session_id").n_unique())["session_id"].max() == 1


def test_read_many_expands_directories_and_skips_notes(shared_data: Path) -> None:
    files = expand_paths([shared_data / "yoochoose"])
    assert [f.name for f in files] == [
        "test.tsv",
        "train.tsv",
        "yoochoose-clicks-100k_test.txt",
        "yoochoose-clicks-100k_train_full.txt",
    ]
    results = read_many([shared_data / "yoochoose"])
    assert sum(r.frame.height for r in results) == 213_301  # "all four" in PROVENANCE.md


# --------------------------------------------------------------------------- native layouts without a shared file

#: The public ``train-item-views.csv`` layout (CIKM Cup 2016); the values are made up.
DIGINETICA = (
    "sessionId;userId;itemId;timeframe;eventdate\n"
    "1;NA;81766;526309;2016-05-09\n"
    "1;;31331;1031018;2016-05-09\n"
    "2;4812;32118;243569;2016-05-10\n"
)


def test_diginetica_item_views(tmp_path: Path) -> None:
    path = tmp_path / "train-item-views.csv"
    path.write_text(DIGINETICA)
    assert detect_format(path) == "diginetica"
    result = read_events(path)
    assert_contract(result, path)
    frame = result.frame
    assert frame["session_id"].to_list() == ["1", "1", "2"]
    assert frame["user_id"].to_list() == [None, None, "4812"]  # "NA" and empty are no user
    assert frame["item_id"].to_list() == ["81766", "31331", "32118"]
    assert frame["timestamp"].to_list() == [
        utc(2016, 5, 9, 0, 8, 46, 309_000),  # eventdate midnight + 526,309 ms
        utc(2016, 5, 9, 0, 17, 11, 18_000),
        utc(2016, 5, 10, 0, 4, 3, 569_000),
    ]
    assert frame["event_type"].unique().to_list() == ["view"]
    assert frame["source_line"].to_list() == [2, 3, 4]


def test_diginetica_bad_time_is_quarantined_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "train-item-views.csv"
    path.write_text(DIGINETICA + "3;NA;1;soon;2016-05-10\n3;NA;2;10;2016-13-01\n")
    result = read_events(path)
    assert result.frame.height == 3
    assert result.quarantine.select("source_line", "reason").rows() == [(5, "bad_timestamp"), (6, "bad_timestamp")]
    assert "timeframe 'soon'" in result.quarantine["detail"][0]


def test_retailrocket_events(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433224214164,992329,addtocart,248676,\n"
        "1433224214165,992329,transaction,248676,4000\n"
    )
    assert detect_format(path) == "retailrocket"
    result = read_events(path)
    assert_contract(result, path)
    frame = result.frame
    assert frame["event_type"].to_list() == ["view", "add_to_cart", "purchase"]
    assert frame["user_id"].to_list() == ["257597", "992329", "992329"]
    assert frame["session_id"].null_count() == 3  # visitors only: sessions are derived downstream
    assert frame["timestamp"][0] == utc(2015, 6, 2, 5, 2, 12, 117_000)


def test_raw_yoochoose_clicks_layout(tmp_path: Path) -> None:
    path = tmp_path / "yoochoose-clicks.dat"
    path.write_text(
        "1,2014-04-07T10:51:09.277Z,214536502,0\n"
        "1,2014-04-07T10:54:09.868Z,214536500,S\n"
        "2,2014-04-07T13:56:37.614Z,214662742,3\n"
    )
    assert detect_format(path) == "yoochoose"
    frame = read_events(path).frame
    assert frame["category"].to_list() == [None, "S", "3"]  # "0" = no category in the challenge's README
    assert frame["timestamp"][0] == utc(2014, 4, 7, 10, 51, 9, 277_000)
    assert frame["source_line"].to_list() == [1, 2, 3]


# -------------------------------------------------------------------------------------------------- generic files


def test_generic_csv_with_mapping_and_event_type_map(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text(
        "Visit,Who,Product,When,Action,Cost\n"
        "s1,u1,p1,2024-01-01T10:00:00+02:00,PageView,9.5\n"
        "s1,u1,p2,1704096000,Basket,\n"
        "s2,,p3,1704096000123,BUY,3\n"
        "s2,u2,p3,1704096000123456,wishlist,NA\n"
    )
    mapping = ColumnMapping.parse(
        "session_id=Visit, user_id=Who,item_id=Product,timestamp=When,event_type=Action,price=Cost"
    )
    result = read_events(path, mapping=mapping, options=ReadOptions(event_type_map={"basket": "add_to_cart"}))
    assert result.format == "csv" and result.quarantine.is_empty()
    frame = result.frame
    # PageView and BUY are known spellings, Basket is mapped by the option, wishlist passes through unknown
    assert frame["event_type"].to_list() == ["view", "add_to_cart", "purchase", "wishlist"]
    assert frame["timestamp"].to_list() == [
        utc(2024, 1, 1, 8),
        utc(2024, 1, 1, 8),
        utc(2024, 1, 1, 8, 0, 0, 123_000),
        utc(2024, 1, 1, 8, 0, 0, 123_456),
    ]
    assert frame["price"].to_list() == [9.5, None, 3.0, None]
    assert frame["user_id"].to_list() == ["u1", "u1", None, "u2"]


def test_generic_columns_match_loosely_and_semicolons_are_sniffed(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("SessionId;ItemId;TimeStamp\n7;42;2024-01-01 00:00:00\n")
    frame = read_events(path).frame
    assert frame.select("session_id", "item_id", "event_type").row(0) == ("7", "42", "click")


def test_generic_tsv_and_jsonl_and_parquet_agree(tmp_path: Path) -> None:
    rows = {"session_id": ["a", "b"], "item_id": [214536502, 7], "timestamp": [1396860669.277, 1396860670.5]}
    frame = pl.DataFrame(rows)
    frame.write_csv(tmp_path / "e.tsv", separator="\t")
    frame.write_ndjson(tmp_path / "e.jsonl")
    frame.write_parquet(tmp_path / "e.parquet")
    results = read_many([tmp_path])
    assert [r.format for r in results] == ["jsonl", "parquet", "tsv"]
    for result in results:
        assert result.frame.select("session_id", "item_id", "timestamp").rows() == [
            ("a", "214536502", utc(2014, 4, 7, 8, 51, 9, 277_000)),
            ("b", "7", utc(2014, 4, 7, 8, 51, 10, 500_000)),
        ]
    assert [r.frame["source_line"].to_list() for r in results] == [[1, 2], [1, 2], [2, 3]]


def test_parquet_keeps_datetime_and_float_ids(tmp_path: Path) -> None:
    path = tmp_path / "typed.parquet"
    pl.DataFrame(
        {
            "user_id": [1.0, None, float("nan")],
            "item_id": [214536502.0, 3.0, 4.0],
            "timestamp": pl.Series([utc(2024, 1, 1), utc(2024, 1, 2), utc(2024, 1, 3)]).dt.convert_time_zone(
                "Europe/Paris"
            ),
        }
    ).write_parquet(path)
    frame = read_events(path).frame
    assert frame["item_id"].to_list() == ["214536502", "3", "4"]
    assert frame["user_id"].to_list() == ["1", None, None]
    assert frame["timestamp"].to_list() == [utc(2024, 1, 1), utc(2024, 1, 2), utc(2024, 1, 3)]


def test_timestamp_unit_option_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("session_id,item_id,timestamp\ns,i,1000\n")
    assert read_events(path).frame["timestamp"][0] == utc(1970, 1, 1, 0, 16, 40)  # auto: seconds
    in_ms = read_events(path, options=ReadOptions(timestamp_unit="ms"))
    assert in_ms.frame["timestamp"][0] == utc(1970, 1, 1, 0, 0, 1)


def test_mapping_errors_are_clear() -> None:
    with pytest.raises(DatasetError, match="unknown field 'items'") as error:
        ColumnMapping.parse("items=Product")
    assert error.value.code == "bad_mapping"
    with pytest.raises(DatasetError, match="not of the form"):
        ColumnMapping.parse("item_id")
    assert ColumnMapping.parse("item_id=ItemId").explicit() == {"item_id"}


def test_mapping_on_a_native_format_is_refused(shared_data: Path) -> None:
    with pytest.raises(DatasetError, match="--format csv") as error:
        read_events(shared_data / "rees46" / "2019-Oct.csv", mapping=ColumnMapping(item_id="product_id"))
    assert error.value.code == "bad_mapping"


# ------------------------------------------------------------------------------------------------- timestamps


def test_parse_timestamps_units_by_magnitude_and_text_layouts() -> None:
    values = pl.Series(
        [
            "1396860669.277",  # seconds with a fraction
            "1659304800025",  # milliseconds
            "1659304800025123",  # microseconds
            "1659304800025123456",  # nanoseconds
            "2019-10-01 00:00:00 UTC",
            "2014-04-07T10:51:09.277Z",
            "2014-04-07T12:51:09.277+02:00",
            "2014-04-07 10:51:09,5-0130",
            "2014-04-07t10:51",
            "2016-05-09",
        ]
    )
    parsed, reasons = parse_timestamps(values)
    assert reasons.null_count() == len(values)
    assert parsed.to_list() == [
        utc(2014, 4, 7, 8, 51, 9, 277_000),
        utc(2022, 7, 31, 22, 0, 0, 25_000),
        utc(2022, 7, 31, 22, 0, 0, 25_123),
        utc(2022, 7, 31, 22, 0, 0, 25_123),
        utc(2019, 10, 1),
        utc(2014, 4, 7, 10, 51, 9, 277_000),
        utc(2014, 4, 7, 10, 51, 9, 277_000),
        utc(2014, 4, 7, 12, 21, 9, 500_000),
        utc(2014, 4, 7, 10, 51),
        utc(2016, 5, 9),
    ]


def test_parse_timestamps_reasons() -> None:
    values = pl.Series(["soon", "", None, "nan", "2019-02-30", "1e30", "2019-10-01T00:00:00+0x"])
    parsed, reasons = parse_timestamps(values)
    assert parsed.null_count() == len(values)
    assert reasons.to_list() == [
        "cannot parse timestamp 'soon': expected an epoch number or ISO-8601",
        "empty timestamp",
        "missing timestamp",
        "timestamp NaN is not a finite number",
        "timestamp '2019-02-30' is not a valid calendar date/time",
        "epoch 1e+30 read as nanoseconds is outside the years 0001-9999",
        "cannot parse timestamp '2019-10-01T00:00:00+0x': expected an epoch number or ISO-8601",
    ]


def test_parse_timestamps_explicit_units_and_dtypes() -> None:
    ints = pl.Series([1_659_304_800_025, 5])
    assert parse_timestamps(ints, "ms")[0].to_list() == [
        utc(2022, 7, 31, 22, 0, 0, 25_000),
        utc(1970, 1, 1, 0, 0, 0, 5_000),
    ]
    parsed, reasons = parse_timestamps(pl.Series(["1659304800", "2022-07-31"]), "s")
    assert parsed[0] == utc(2022, 7, 31, 22) and parsed[1] is None
    assert reasons[1] == "timestamp '2022-07-31' is not an epoch number in s"
    parsed, reasons = parse_timestamps(pl.Series(["1659304800", "2022-07-31"]), "iso")
    assert parsed[0] is None and parsed[1] == utc(2022, 7, 31)
    assert parse_timestamps(ints, "iso")[1][0] == "expected ISO-8601 text (timestamp unit 'iso'), got a number"
    assert parse_timestamps(pl.Series([10**15]), "s")[1][0].startswith("epoch 1000000000000000.0 read as seconds")
    assert parse_timestamps(pl.Series([[1]]))[1][0] == "a value of type List(Int64) is not a timestamp"
    naive = pl.Series([datetime(2024, 1, 1, 12)])
    assert parse_timestamps(naive)[0][0] == utc(2024, 1, 1, 12)
    with pytest.raises(ValueError, match="unknown timestamp unit"):
        parse_timestamps(naive, "minutes")  # type: ignore[arg-type]
