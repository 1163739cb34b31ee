"""Hostile and broken files: every case ends in a quarantine row with its line and reason, or in a `DatasetError`
with a stable code and a message that names the file, never in a library traceback; and no row is lost."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionrec.ops.errors import DatasetError
from sessionrec.ops.readers import ColumnMapping, ReadOptions, ReadResult, detect_format, read_events, read_many
from sessionrec.ops.schema import MAX_RAW_CHARS

HEADER = "session_id,item_id,timestamp,price\n"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def reasons(result: ReadResult) -> list[tuple[int, str]]:
    return result.quarantine.select("source_line", "reason").rows()


def assert_nothing_lost(result: ReadResult, path: Path, header: bool = True) -> None:
    """Frame rows + quarantine rows == the non-blank data lines, each line exactly once."""
    lines = [i for i, line in enumerate(path.read_bytes().split(b"\n"), start=1) if line.strip()]
    data = lines[1:] if header else lines
    seen = pl.concat([result.frame["source_line"], result.quarantine["source_line"]]).sort().to_list()
    assert seen == data


def raises(code: str, *args, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as error:
        read_events(*args, **kwargs)
    assert error.value.code == code, str(error.value)
    assert str(args[0]) in str(error.value)  # the message names the file
    return error.value


# ------------------------------------------------------------------------------------------------- malformed lines


def test_short_long_and_badly_quoted_lines_are_quarantined_and_the_rest_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.csv",
        HEADER
        + "s1,i1,1700000000,1.5\n"  # 2
        + "s1,i2,1700000001\n"  # 3: too few fields
        + "s1,i3,1700000002,1,extra\n"  # 4: too many
        + 's1,"i4,1700000003,2\n'  # 5: unbalanced quote
        + 's1,"i,5",1700000004,"3"\n'  # 6: quoted separator: fine
        + 's1,i"6,1700000005,4\n'  # 7: quote inside an unquoted field
        + '"s1","i""7",1700000006,5\n',  # 8: escaped quote: fine
    )
    result = read_events(path)
    assert reasons(result) == [(line, "malformed_line") for line in (3, 4, 5, 7)]
    details = result.quarantine["detail"].to_list()
    assert details[0] == "expected 4 fields separated by ',', found 3"
    assert details[1] == "expected 4 fields separated by ',', found 5"
    assert "quote" in details[2] and "quote" in details[3]
    assert result.quarantine["raw"][0] == "s1,i2,1700000001"
    assert result.frame.select("item_id", "source_line").rows() == [("i1", 2), ("i,5", 6), ('i"7', 8)]
    assert_nothing_lost(result, path)


def test_truncated_last_line_without_newline(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", HEADER + "s1,i1,1700000000,1\r\ns1,i2,17000")
    result = read_events(path)
    assert reasons(result) == [(3, "malformed_line")]
    assert result.frame["session_id"].to_list() == ["s1"]


def test_a_long_first_data_line_does_not_shape_the_others(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", HEADER + "s,i1,1700000000,1,more,fields\ns,i2,1700000001,2\n")
    result = read_events(path)
    assert reasons(result) == [(2, "malformed_line")]
    assert result.frame.select("item_id", "price").rows() == [("i2", 2.0)]


def test_quoted_field_spanning_lines_is_refused_line_by_line(tmp_path: Path) -> None:
    """One event is one physical line: a newline inside quotes breaks both halves, and they say so."""
    path = write(tmp_path, "e.csv", HEADER + 's1,"i\n1",1700000000,1\ns2,i2,1700000001,2\n')
    result = read_events(path)
    assert reasons(result) == [(2, "malformed_line"), (3, "malformed_line")]
    assert result.frame["item_id"].to_list() == ["i2"]


def test_blank_lines_crlf_and_bom_keep_line_numbers(tmp_path: Path) -> None:
    content = b"\xef\xbb\xbf" + b"session_id,item_id,timestamp\r\n\r\ns,a,1\r\n   \r\ns,b,2\r\n\r\n"
    path = write(tmp_path, "e.csv", content)
    result = read_events(path)
    assert result.quarantine.is_empty()
    assert result.frame.select("item_id", "source_line").rows() == [("a", 3), ("b", 5)]
    assert result.source_columns == ("session_id", "item_id", "timestamp")


# -------------------------------------------------------------------------------------------------- dataset errors


def test_missing_columns_are_named_with_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", "session,product,time\ns,p,1\n")
    error = raises("missing_column", path)
    assert "item_id" in str(error) and "timestamp" in str(error) and "['session', 'product', 'time']" in str(error)
    assert "--map" in str(error)
    path = write(tmp_path, "nouser.csv", "item_id,timestamp\ni,1\n")
    assert "session_id or user_id" in str(raises("missing_column", path))
    mapped = raises("missing_column", path, mapping=ColumnMapping(user_id="visitor"))
    assert "user_id (column 'visitor')" in str(mapped)


def test_missing_header_is_hinted(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", "1,2,3\n4,5,6\n")
    assert "lack its header" in str(raises("missing_column", path))


def test_native_format_with_a_wrong_header(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", "event_time,event_type,user_session\n2019-10-01 00:00:00 UTC,view,x\n")
    error = raises("missing_column", path, "rees46")
    assert "product_id" in str(error) and "rees46" in str(error)
    path = write(tmp_path, "e.tsv", "a\tb\n")
    raises("missing_column", path, "yoochoose")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("zero.csv", b""),
        ("header_only.csv", HEADER.encode()),
        ("header_only_crlf.csv", b"session_id,item_id,timestamp\r\n\r\n"),
        ("blank.csv", b"\n \n\t\n"),
        ("empty.jsonl", b"\n\n"),
        ("headerless.tsv", b""),
    ],
)
def test_empty_sources(tmp_path: Path, name: str, content: bytes) -> None:
    raises("empty_source", write(tmp_path, name, content))


def test_empty_parquet_and_empty_directory(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pl.DataFrame(schema={"session_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64}).write_parquet(path)
    raises("empty_source", path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "README.md").write_text("notes")
    with pytest.raises(DatasetError) as error:
        read_many([tmp_path / "dir"])
    assert error.value.code == "empty_source"


def test_not_found_directory_and_unknown_format_name(tmp_path: Path) -> None:
    raises("not_found", tmp_path / "nope.csv")
    with pytest.raises(DatasetError) as error:
        detect_format(tmp_path / "nope.csv")
    assert error.value.code == "not_found"
    raises("unreadable", tmp_path)
    path = write(tmp_path, "e.csv", HEADER + "s,i,1,1\n")
    assert "auto, csv, tsv" in str(raises("unknown_format", path, "excel"))


def test_undecidable_text_names_the_format_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", "hello world\nsecond line\n")
    with pytest.raises(DatasetError) as error:
        detect_format(path)
    assert error.value.code == "unknown_format" and "--format" in str(error.value) and "rees46" in str(error.value)
    raises("unknown_format", path)


def test_duplicate_header_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", "item_id,item_id,timestamp,session_id\n1,2,3,4\n")
    assert "item_id" in str(raises("bad_header", path))


# --------------------------------------------------------------------------------------------------- wrong values


def test_wrong_types_go_to_the_quarantine_with_what_was_wrong(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.csv",
        HEADER
        + "s,i1,1700000000,cheap\n"  # 2: bad price
        + "s,i2,yesterday,1\n"  # 3: bad timestamp
        + "s,i3,2023-02-30 10:00:00,1\n"  # 4: impossible date
        + "s,i4,,1\n"  # 5: no timestamp
        + "s,i5,nan,inf\n"  # 6: timestamp first
        + "s,i6,1700000000,NaN\n",  # 7: NaN price is a missing price
    )
    result = read_events(path)
    assert reasons(result) == [(2, "bad_price")] + [(line, "bad_timestamp") for line in (3, 4, 5, 6)]
    details = result.quarantine["detail"].to_list()
    assert details[0] == "price 'cheap' is not a number"
    assert "cannot parse timestamp 'yesterday'" in details[1]
    assert "'2023-02-30 10:00:00' is not a valid calendar date/time" in details[2]
    assert details[3] == "missing timestamp"
    assert result.quarantine["raw"][0] == "s,i1,1700000000,cheap"
    assert result.frame.select("item_id", "price").rows() == [("i6", None)]
    assert_nothing_lost(result, path)


def test_empty_and_nan_ids_stay_null_for_normalize(tmp_path: Path) -> None:
    """Missing ids are not the reader's call: `ops.events.normalize` quarantines them (missing_item_id ...)."""
    path = write(tmp_path, "e.csv", HEADER + ",i1,1,\ns,,2,\nNaN,NA,3,\n")
    frame = read_events(path).frame
    assert frame.select("session_id", "item_id").rows() == [(None, "i1"), ("s", None), (None, None)]


def test_seconds_milliseconds_and_strings_in_one_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.csv",
        HEADER + "s,a,1700000000,\ns,b,1700000000500,\ns,c,2023-11-14T22:13:20.25Z,\ns,d,1700000000.75,\n",
    )
    result = read_events(path)
    assert result.quarantine.is_empty()
    base = datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    offsets = [t - base for t in result.frame["timestamp"].to_list()]
    assert offsets == [timedelta(milliseconds=ms) for ms in (0, 500, 250, 750)]


def test_unknown_event_types_pass_through(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", "session_id,item_id,timestamp,event_type\ns,i,1,Cart\ns,i,2,hover\n")
    assert read_events(path).frame["event_type"].to_list() == ["add_to_cart", "hover"]


# ----------------------------------------------------------------------------------------------------- big lines


def test_long_fields_are_quarantined_with_their_raw_text_capped(tmp_path: Path) -> None:
    huge = "x" * 10_000_000
    content = HEADER + f"s,{'y' * 5000},1700000000,1\ns,i,1700000001,1\ns,{huge},1700000000,1\n{huge}\n"
    result = read_events(write(tmp_path, "e.csv", content))
    assert reasons(result) == [(line, "field_too_long") for line in (2, 4, 5)]
    details = result.quarantine["detail"].to_list()
    assert details[0] == "item_id has 5000 characters (limit 4096)"
    # A line too long for all its fields to be within the limit is refused before its fields are parsed.
    assert details[1].startswith("the line has 10000015 bytes, so a field is over max_field_length")
    assert details[2].startswith("the line has 10000000 bytes, so a field is over max_field_length")
    assert result.quarantine["raw"].str.len_chars().to_list() == [MAX_RAW_CHARS] * 3
    assert result.frame["item_id"].to_list() == ["i"]


def test_field_length_counts_characters_not_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", HEADER + f"s,{'é' * 3000},1700000000,1\n")  # 6000 bytes, 3000 characters
    assert read_events(path).quarantine.is_empty()
    assert reasons(read_events(path, options=ReadOptions(max_field_length=2999))) == [(2, "field_too_long")]


HUGE = 10_000_000


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("line.csv", HEADER + "s,i,1700000000,1\n" + "y" * HUGE + "\n", "field_too_long"),  # no separator
        ("field.csv", HEADER + "s," + "x" * HUGE + ",1700000000,1\ns,i\n", "field_too_long malformed_line"),
        ("time.csv", HEADER + "s,i,2019-" + "1" * HUGE + ",1\n", "field_too_long"),  # via the timestamp parser
        ("line.jsonl", '{"session_id": "s", "item_id": "' + "x" * HUGE + '", "timestamp": 1}\n{"session_id": "s", '
         '"item_id": "i", "timestamp": 1}\n', "malformed_line"),
    ],
)
def test_a_10_mb_line_does_not_blow_up_memory(tmp_path: Path, name: str, content: str, reason: str) -> None:
    """Peak memory of reading a file with a 10 MB line stays within a few times the file size. Measured in a
    fresh process after a warm-up read (imports and polars' pools do not count), as the growth of VmHWM: unlike
    ru_maxrss, it starts afresh at exec instead of inheriting the peak of this test process."""
    path = write(tmp_path, name, content)
    small = write(tmp_path, "small.csv", HEADER + "s,i,1700000000,1\n")
    script = (
        "import re, sys\n"
        "from sessionrec.ops.readers import read_events\n"
        "def peak():\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024\n"
        "read_events(sys.argv[2])\n"
        "before = peak()\n"
        "result = read_events(sys.argv[1])\n"
        "print(' '.join(result.quarantine['reason']), peak() - before, sep='|')\n"
    )
    command = [sys.executable, "-c", script, str(path), str(small)]
    quarantined, grown = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split("|")
    assert quarantined == reason
    assert int(grown) < 6 * path.stat().st_size


# ------------------------------------------------------------------------------------------------------ encodings


def test_invalid_utf8_lines_are_quarantined_and_latin1_reads_them(tmp_path: Path) -> None:
    content = (HEADER + "s,café,1700000000,1\ns,ok,1700000001,1\n").encode("latin-1")
    path = write(tmp_path, "latin.csv", content)
    result = read_events(path)
    assert reasons(result) == [(2, "bad_encoding")]
    assert "byte 0xe9" in result.quarantine["detail"][0] and "--encoding" in result.quarantine["detail"][0]
    assert result.quarantine["raw"][0] == "s,caf\\xe9,1700000000,1"
    assert result.frame["item_id"].to_list() == ["ok"]
    assert_nothing_lost(result, path)
    fixed = read_events(path, options=ReadOptions(encoding="latin-1"))
    assert fixed.quarantine.is_empty() and fixed.frame["item_id"].to_list() == ["café", "ok"]


def test_utf16_is_read_when_declared(tmp_path: Path) -> None:
    path = write(tmp_path, "wide.csv", (HEADER + "s,ü,1700000000,1\n").encode("utf-16"))
    assert "utf-16" in str(raises("unreadable", path))
    assert read_events(path, options=ReadOptions(encoding="utf-16")).frame["item_id"].to_list() == ["ü"]


def test_a_header_in_the_wrong_encoding_is_fatal(tmp_path: Path) -> None:
    raises("unreadable", write(tmp_path, "e.csv", "séssion_id,item_id,timestamp\ns,i,1\n".encode("latin-1")))


def test_bad_options_are_refused() -> None:
    for kwargs in ({"encoding": "klingon"}, {"timestamp_unit": "minutes"}, {"max_field_length": 0}):
        with pytest.raises(DatasetError) as error:
            ReadOptions(**kwargs)  # type: ignore[arg-type]
        assert error.value.code == "bad_option"


# ---------------------------------------------------------------------------------------- binary and corrupt files


def test_binary_and_compressed_files_are_unreadable(tmp_path: Path) -> None:
    garbage = write(tmp_path, "events.csv", bytes(range(256)) * 64)
    raises("unreadable", garbage)
    with pytest.raises(DatasetError) as error:
        detect_format(garbage)
    assert error.value.code == "unreadable"
    zipped = write(tmp_path, "events.csv.gz", gzip.compress((HEADER + "s,i,1,1\n").encode()))
    assert "decompress" in str(raises("unreadable", zipped))


def test_nul_bytes_past_the_head_quarantine_their_line(tmp_path: Path) -> None:
    """NUL bytes at the start make a file binary; further on, they only spoil their own line."""
    content = HEADER + "s,i,1700000000,1\n" * 20_000 + "s,\x00x,1700000000,1\ns,j,1700000000,1\n"
    path = write(tmp_path, "e.csv", content)
    result = read_events(path)
    assert reasons(result) == [(20_002, "malformed_line")]
    assert result.quarantine.row(0, named=True)["raw"] == "s,\\x00x,1700000000,1"
    assert result.frame.height == 20_001
    assert_nothing_lost(result, path)


def test_corrupt_parquet_is_unreadable(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    rows = {"session_id": ["s"] * 1000, "item_id": [str(i) for i in range(1000)], "timestamp": range(1000)}
    pl.DataFrame(rows).write_parquet(good)
    data = good.read_bytes()
    truncated = write(tmp_path, "truncated.parquet", data[: len(data) // 2])
    assert "re-export" in str(raises("unreadable", truncated))
    garbled = write(tmp_path, "garbled.parquet", data[:8] + bytes(len(data) - 16) + data[-8:])
    raises("unreadable", garbled)
    misnamed = write(tmp_path, "text.parquet", HEADER + "s,i,1,1\n")
    assert "PAR1" in str(raises("unreadable", misnamed))
    raises("unreadable", write(tmp_path, "e.csv", HEADER + "s,i,1,1\n"), "trivago")


def test_parquet_columns_of_odd_types(tmp_path: Path) -> None:
    """A column type that cannot hold the field stops the file; odd values of a usable type are refused by row."""
    binary = tmp_path / "binary.parquet"
    pl.DataFrame({"session_id": [b"s"], "item_id": [b"\xff"], "timestamp": [1]}).write_parquet(binary)
    assert "Binary" in str(raises("unreadable", binary))
    nested = tmp_path / "nested.parquet"
    pl.DataFrame({"session_id": ["s", "s"], "item_id": ["i", "j"], "timestamp": [[1], None]}).write_parquet(nested)
    result = read_events(nested)
    assert reasons(result) == [(1, "bad_timestamp"), (2, "bad_timestamp")]
    assert result.quarantine["raw"][0] == '{"session_id":"s","item_id":"i","timestamp":[1]}'


# ------------------------------------------------------------------------------------------------------ JSON lines


def test_jsonl_malformed_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.jsonl",
        '{"session_id": "s", "item_id": 1, "timestamp": 1700000000}\n'
        '{"session_id": "s", "item_id": 2, "timestamp": \n'
        "[1, 2]\n"
        "\n"
        '{"session_id": "s", "item_id": 3.0, "timestamp": "2023-11-14T22:13:21Z", "price": "free"}\n'
        '{"session_id": "s", "item_id": {"nested": 1}, "timestamp": 1700000002}\n',
    )
    result = read_events(path)
    assert reasons(result) == [(2, "malformed_line"), (3, "malformed_line"), (5, "bad_price")]
    assert result.quarantine["detail"][0].startswith("invalid JSON")
    assert result.quarantine["detail"][1] == "a JSON list, not an object"
    assert result.frame.select("item_id", "source_line").rows() == [("1", 1), ('{"nested":1}', 6)]
    assert_nothing_lost(result, path, header=False)


def test_otto_malformed_and_empty_sessions(tmp_path: Path) -> None:
    events = [{"aid": 5, "ts": 1659304800025, "type": "clicks"}, {"aid": 6, "ts": 1659304800026, "type": "orders"}]
    good = {"session": 1, "events": events}
    path = write(
        tmp_path,
        "otto.jsonl",
        '{"session": 2, "events": [{"aid": 7, "ts": 16593\n'  # cut: and first, so detection must look further
        + json.dumps(good)
        + "\n"
        + '{"session": 3, "events": []}\n'
        + '{"session": 4, "events": [{"aid": 8, "ts": "later", "type": "carts"}]}\n',
    )
    assert detect_format(path) == "otto"
    result = read_events(path)
    assert reasons(result) == [(1, "malformed_line"), (3, "malformed_line"), (4, "bad_timestamp")]
    assert json.loads(result.quarantine["raw"][2]) == {"session": "4", "aid": "8", "ts": "later", "type": "carts"}
    assert result.frame.select("session_id", "item_id", "event_type", "source_line").rows() == [
        ("1", "5", "click", 2),
        ("1", "6", "purchase", 2),
    ]


# ----------------------------------------------------------------------------------------------- nothing is lost


LINES = st.one_of(
    st.builds(
        lambda s, i, t: f"{s},{i},{t},1.5",
        st.sampled_from(["s1", "s2", ""]),
        st.text("abc123", max_size=4),
        st.sampled_from(["1700000000", "1700000000123", "2023-11-14 22:13:20", "x", ""]),
    ),
    st.text(alphabet=st.sampled_from(list('ab,;"\t\r 1')), max_size=12),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.lists(LINES, min_size=1, max_size=12))
def test_every_line_ends_in_the_frame_or_the_quarantine(tmp_path: Path, body: list[str]) -> None:
    path = write(tmp_path, "fuzz.csv", HEADER + "\n".join(body) + "\n")
    try:
        result = read_events(path, "csv")
    except DatasetError as error:
        assert error.code == "empty_source"  # only blank lines after the header
        assert not any(line.strip() for line in body)
        return
    assert_nothing_lost(result, path)
    assert set(result.quarantine["reason"]) <= {"malformed_line", "bad_timestamp", "bad_price"}
