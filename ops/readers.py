"""Event files of any supported layout → a *raw frame* plus the rows that cannot be events (the quarantine).

A reader's job is narrow: find every row of the file, put each value under its canonical name (ids stay strings
exactly as written), turn the timestamp into a UTC instant and the price into a number, and send whatever cannot
become an event row at all to the quarantine, with its line number and the reason. Nothing is dropped silently
and no library exception escapes: a file that cannot be read at all raises a `DatasetError` that names the file
and says what to do. Event-level rules (id syntax, known event types, plausible times, duplicates) belong to
`ops.events.normalize`, the single validation path shared with the live stream; so empty ids stay null here.

Text files are read in two vectorised passes, so that ten million lines take seconds and one bad line costs one
quarantine row, not the file:

1. a *line pass*: polars reads every physical line as one string; field counts and quoting are checked with
   vectorised string functions, and a short, long or badly quoted line becomes a ``malformed_line`` quarantine
   row with its line number. One event is one physical line: a quoted field cannot span lines.
2. a *field pass*: ``pl.read_csv`` with every column as a string, over the whole file when the quoting is sound
   everywhere (the refused lines' rows are then ignored), else over the good lines alone.

A file that is not valid in its encoding (or has NUL bytes past its start) is split into lines in Python to find
the culprits: those lines are quarantined as ``bad_encoding`` (``malformed_line``) and the rest is read. Other
encodings than UTF-8 are transcoded first. A hostile 10 MB line costs a few times its size in memory, not more:
long values are cut before any copy is made of them (see `_Refused`, `_raw_text`, `_MAX_JSON_LINE_BYTES`).
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

from sessionrec.ops.errors import DatasetError
from sessionrec.ops.schema import (
    CANONICAL_FIELDS,
    MAX_RAW_CHARS,
    QUARANTINE_SCHEMA,
    RAW_FRAME_SCHEMA,
    REQUIRED_COLUMNS,
)
from sessionrec.ops.timestamps import TIMESTAMP_UNITS, TimestampUnit, parse_timestamps

FORMATS: tuple[str, ...] = (
    "csv",
    "tsv",
    "parquet",
    "jsonl",
    "yoochoose",
    "rees46",
    "trivago",
    "otto",
    "diginetica",
    "retailrocket",
)
#: Formats read through a `ColumnMapping`; the others have a fixed, documented layout.
GENERIC_FORMATS: tuple[str, ...] = ("csv", "tsv", "parquet", "jsonl")
#: A generic file needs these, plus a session id or a user id (sessions are then derived by inactivity).
REQUIRED_FIELDS = REQUIRED_COLUMNS


#: Event type of files that record one kind of interaction and have no event type column (as YOOCHOOSE clicks).
IMPLICIT_EVENT_TYPE = "click"
#: Spellings of the canonical event types in public datasets and exports (generic files; matched lower-cased).
GENERIC_EVENT_TYPES: dict[str, str] = {
    "view": "view",
    "views": "view",
    "pageview": "view",
    "click": "click",
    "clicks": "click",
    "add_to_cart": "add_to_cart",
    "addtocart": "add_to_cart",
    "add-to-cart": "add_to_cart",
    "cart": "add_to_cart",
    "carts": "add_to_cart",
    "purchase": "purchase",
    "purchases": "purchase",
    "buy": "purchase",
    "order": "purchase",
    "orders": "purchase",
    "transaction": "purchase",
    "remove_from_cart": "remove_from_cart",
}
#: Values that mean "no value" in id and category columns of exported files (pandas writes ``nan``, R ``NA``).
NULL_TOKENS: tuple[str, ...] = ("", "nan", "NaN", "NA", "N/A", "null", "NULL", "None")

_SNIFF_BYTES = 64 * 1024
_PARQUET_MAGIC = b"PAR1"
_PARQUET_SUFFIXES = (".parquet", ".pq", ".snappy")
_COMPRESSED_MAGIC: dict[bytes, str] = {
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
    b"BZh": "bzip2",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
}
#: Files a directory may hold beside its data: dataset notes (hidden and ``_`` files, as Spark's, are skipped too).
_NOTE_SUFFIXES = (".md",)
_QUOTED_FIELD = r'"(?:[^"]|"")*"'
_LINE = "__source_line__"  # the 1-based physical line (or row) of each source row, beside the source columns
_SHOWN = 80  # characters of a bad value quoted in a quarantine detail
#: JSON lines longer than this are refused unparsed (a full OTTO session of 500 events is about 30 KB).
_MAX_JSON_LINE_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column holds each canonical field of a generic file (default: the canonical name).

    A source column also matches when it differs only in case and punctuation (``SessionId`` for ``session_id``).
    A field mapped explicitly must exist in the file; a default one may be absent (it is then null).
    """

    event_id: str = "event_id"
    session_id: str = "session_id"
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    event_type: str = "event_type"
    category: str = "category"
    price: str = "price"

    @classmethod
    def parse(cls, text: str) -> ColumnMapping:
        """``"item_id=ItemId,session_id=SessionId"`` (the ``--map`` flag) → mapping; other fields keep defaults."""
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            canonical, sep, column = (s.strip() for s in part.partition("="))
            if not sep or not canonical or not column:
                raise DatasetError("bad_mapping", f"mapping entry {part!r} is not of the form field=column")
            if canonical not in CANONICAL_FIELDS:
                known = ", ".join(CANONICAL_FIELDS)
                raise DatasetError("bad_mapping", f"unknown field {canonical!r} in the mapping; fields: {known}")
            if canonical in values:
                raise DatasetError("bad_mapping", f"field {canonical!r} is mapped twice")
            values[canonical] = column
        return cls(**values)

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def explicit(self) -> frozenset[str]:
        """Fields mapped to a column other than their own name."""
        return frozenset(name for name, column in self.as_dict().items() if column != name)


@dataclass(frozen=True)
class ReadOptions:
    """How to read a file. ``timestamp_unit`` and ``event_type_map`` (extra raw → canonical event types) apply to
    generic files: native formats have a documented unit and vocabulary. ``encoding`` and ``max_field_length``
    apply to every file: a row with a longer field (characters) is quarantined, never truncated; for the mapped
    fields always, for the other columns of a text file when its line is too long for all of them to fit."""

    timestamp_unit: TimestampUnit = "auto"
    event_type_map: dict[str, str] = field(default_factory=dict)
    encoding: str = "utf-8"
    max_field_length: int = 4096

    def __post_init__(self) -> None:
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            units = ", ".join(TIMESTAMP_UNITS)
            raise DatasetError("bad_option", f"timestamp unit {self.timestamp_unit!r} unknown; use one of {units}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise DatasetError(
                "bad_option", f"encoding {self.encoding!r} unknown (e.g. utf-8, latin-1, cp1252)"
            ) from None
        if self.max_field_length < 1:
            raise DatasetError("bad_option", f"max_field_length must be positive, got {self.max_field_length}")


@dataclass(frozen=True)
class ReadResult:
    frame: pl.DataFrame  # `RAW_FRAME_SCHEMA`
    quarantine: pl.DataFrame  # `QUARANTINE_SCHEMA`, batch_id null
    format: str  # the format detected or given
    source_columns: tuple[str, ...]  # the source's columns (JSON: top-level keys), to detect schema changes


def detect_format(path: Path) -> str:
    """The format of ``path``, from its first bytes, header line, extension and (Parquet) schema.

    Raises `DatasetError` ``not_found``, ``empty_source``, ``unreadable`` (binary, compressed, corrupt) or
    ``unknown_format`` (a text file that no layout fits).
    """
    path = Path(path)
    head = _head(path)
    if head.startswith(_PARQUET_MAGIC):
        return _parquet_format(_parquet_schema(path))
    _refuse_binary(path, head)
    return _text_format(path, head.decode("utf-8", errors="replace").split("\n"))


def read_events(
    path: Path,
    fmt: str = "auto",
    mapping: ColumnMapping | None = None,
    options: ReadOptions = ReadOptions(),
) -> ReadResult:
    """Read one file into a raw frame and its quarantine; every data row of the file lands in exactly one.

    The raw frame has `RAW_FRAME_SCHEMA`: ids, event type and category are strings (null where absent or a
    `NULL_TOKENS` value), price Float64, timestamp ``Datetime(us, UTC)`` and never null (unparseable ones are
    quarantined as ``bad_timestamp``), ``source`` the path as given, ``source_line`` the 1-based physical line
    counting the header (Parquet: the row; OTTO: the session's line). Event types are mapped to the canonical ones
    where the format defines them; unknown ones pass through for `normalize` to judge. ``mapping`` applies to
    generic formats only.
    """
    path = Path(path)
    source = str(path)
    if fmt != "auto" and fmt not in FORMATS:
        known = ", ".join(FORMATS)
        raise DatasetError("unknown_format", f"format {fmt!r} unknown; use one of: auto, {known}", source)
    head = _head(path)
    if head.startswith(_PARQUET_MAGIC):
        schema = _parquet_schema(path)
        chosen = _parquet_format(schema) if fmt == "auto" else fmt
        if chosen not in ("parquet", "trivago"):
            raise DatasetError("unreadable", f"this is a Parquet file, not {chosen}: use --format parquet", source)
        _check_mapping(chosen, mapping, source)
        table = _read_parquet(path, schema, chosen, mapping or ColumnMapping(), options)
    else:
        if fmt in ("parquet", "trivago") or (fmt == "auto" and path.suffix.lower() in _PARQUET_SUFFIXES):
            raise DatasetError("unreadable", "not a Parquet file (no PAR1 signature): damaged or misnamed", source)
        text = _load_text(path, head, options)
        chosen = _text_format(path, text.lines.head(50).fill_null("").to_list()) if fmt == "auto" else fmt
        _check_mapping(chosen, mapping, source)
        table = _TEXT_READERS[chosen](text, mapping or ColumnMapping(), options)
    frame, quarantine = _assemble(table, options, source)
    return ReadResult(frame=frame, quarantine=quarantine, format=chosen, source_columns=table.columns)


def read_many(
    paths: Sequence[Path],
    fmt: str = "auto",
    mapping: ColumnMapping | None = None,
    options: ReadOptions = ReadOptions(),
) -> list[ReadResult]:
    """`read_events` for each path, in order; a directory stands for its data files (`expand_paths`)."""
    return [read_events(p, fmt, mapping, options) for p in expand_paths(paths)]


def expand_paths(paths: Sequence[Path]) -> list[Path]:
    """The files of ``paths``: a directory expands to the files under it, sorted, without hidden, ``_``-prefixed
    (Spark/Hadoop markers) and note (``.md``) files — the README/PROVENANCE that travel with datasets."""
    expanded: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            expanded.append(given)
            continue
        found = sorted(
            p
            for p in given.rglob("*")
            if p.is_file()
            and not any(part.startswith((".", "_")) for part in p.relative_to(given).parts)
            and p.suffix.lower() not in _NOTE_SUFFIXES
        )
        if not found:
            raise DatasetError("empty_source", "the directory holds no data file", str(given))
        expanded.extend(found)
    return expanded


# ------------------------------------------------------------------------------------------- files and detection


def _head(path: Path) -> bytes:
    """The first bytes of the file, after the checks every format shares (exists, not empty, not compressed)."""
    source = str(path)
    if not path.exists():
        raise DatasetError("not_found", "no such file; check the path", source)
    if path.is_dir():
        raise DatasetError("unreadable", "this is a directory: pass its files, or use read_many", source)
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as exc:
        raise DatasetError("unreadable", f"cannot open the file ({exc.strerror or exc})", source) from exc
    if not head:
        raise DatasetError("empty_source", "the file is empty (0 bytes)", source)
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise DatasetError("unreadable", f"the file is {kind}-compressed: decompress it first", source)
    return head


def _refuse_binary(path: Path, data: bytes) -> None:
    if b"\x00" in data:
        raise DatasetError(
            "unreadable",
            "binary content (NUL bytes), not an event file; if it is UTF-16 text, pass --encoding utf-16",
            str(path),
        )


def _parquet_format(schema: dict[str, pl.DataType]) -> str:
    return "trivago" if set(_TRIVAGO_COLUMNS) <= set(schema) else "parquet"


def _first_line(lines: Sequence[str]) -> str:
    return next((line.strip("\r\ufeff ") for line in lines if line.strip("\r\ufeff \t")), "")


def _text_format(path: Path, lines: Sequence[str]) -> str:
    """Choose among the text formats from the first non-blank line (and the extension, for generic files)."""
    first = _first_line(lines)
    if not first:
        raise DatasetError("empty_source", "the file has only blank lines", str(path))
    if first.startswith("{"):  # JSON lines: the first line that parses tells OTTO sessions from flat events
        for line in lines:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            return "otto" if isinstance(obj, dict) and {"session", "events"} <= set(obj) else "jsonl"
        return "jsonl"
    for name, layout in _HEADER_FORMATS.items():
        if set(layout.required) <= set(_split_header(first, layout.separator)):
            return name
    if _yoochoose_layout(first) is not None:
        return "yoochoose"
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab") or "\t" in first:
        return "tsv"
    if suffix == ".csv" or any(sep in first for sep in ",;|"):
        return "csv"
    raise DatasetError(
        "unknown_format",
        f"cannot tell the format: the first line {first[:_SHOWN]!r} matches no known layout; "
        f"pass --format with one of: {', '.join(FORMATS)}",
        str(path),
    )


# ------------------------------------------------------------------------------------------------ loading text


@dataclass(frozen=True)
class _Text:
    """A text file as UTF-8 bytes and as physical lines; lines with undecodable bytes are blanked and rejected."""

    path: Path
    data: bytes
    lines: pl.Series  # String, one per physical line (line n at index n-1), CR of CRLF removed
    rejected: pl.DataFrame  # quarantine rows (bad_encoding)

    @property
    def source(self) -> str:
        return str(self.path)


def _load_text(path: Path, head: bytes, options: ReadOptions) -> _Text:
    source, encoding = str(path), options.encoding
    is_utf8 = codecs.lookup(encoding).name == "utf-8"
    if is_utf8:
        _refuse_binary(path, head)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError("unreadable", f"cannot read the file ({exc.strerror or exc})", source) from exc
    if is_utf8:
        raw = raw.removeprefix(codecs.BOM_UTF8)
        data: bytes | None = raw
    else:
        try:
            data = raw.decode(encoding).encode("utf-8")
        except UnicodeDecodeError:
            data = None
        else:
            _refuse_binary(path, data[:_SNIFF_BYTES])
    # The common case costs two scans: one for NUL bytes, and polars validating UTF-8 while splitting lines.
    lines = _split_lines(data) if data is not None and b"\x00" not in data else None
    rejected = _empty_quarantine()
    if lines is None:  # some lines are not text: find them one by one, blank them, read the rest
        data, rejected = _reject_lines(raw, encoding, source)
        lines = _split_lines(data)
    if data is None or lines is None:
        raise DatasetError("unreadable", "the file cannot be split into lines of text", source)
    return _Text(path=path, data=data, lines=lines, rejected=rejected)


def _split_lines(data: bytes) -> pl.Series | None:
    """Every physical line as one string (None when the bytes are not valid UTF-8)."""
    try:
        return pl.read_csv(
            data,
            has_header=False,
            separator="\x00",  # absent (checked before): the whole line is one field
            quote_char=None,
            schema={"line": pl.String},
            empty_string_is_null=False,
            raise_if_empty=False,
        )["line"]
    except pl.exceptions.PolarsError:
        return None


def _reject_lines(raw: bytes, encoding: str, source: str) -> tuple[bytes, pl.DataFrame]:
    """UTF-8 bytes of ``raw`` where each line that is not text in ``encoding`` (undecodable bytes, NUL bytes) is
    blanked, keeping the line numbers; and the quarantine rows for those lines. Lines are split at ``\\n`` bytes,
    which suits UTF-8 and the single-byte encodings (a UTF-16 file must decode as a whole)."""
    is_utf8 = codecs.lookup(encoding).name == "utf-8"
    parts: list[bytes] = []
    bad_lines: list[int] = []
    reasons: list[str] = []
    details: list[str] = []
    raws: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        nul = line.find(b"\x00")
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError as exc:
            reasons.append("bad_encoding")
            details.append(
                f"byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line is not valid {encoding}; "
                "if the file has another encoding, pass it with --encoding (e.g. latin-1, cp1252)"
            )
        else:
            if nul < 0:
                parts.append(line if is_utf8 else text.encode("utf-8"))
                continue
            reasons.append("malformed_line")
            details.append(f"NUL byte at byte {nul + 1} of the line: binary data in a text file")
        parts.append(b"")
        bad_lines.append(number)
        shown = line[: MAX_RAW_CHARS * 4].rstrip(b"\r").replace(b"\x00", b"\\x00")
        raws.append(shown.decode(encoding, errors="backslashreplace"))
    lines = pl.Series(bad_lines, dtype=pl.Int64)
    return b"\n".join(parts), _quarantine_rows(source, lines, pl.Series(reasons, dtype=pl.String), details, raws)


# ----------------------------------------------------------------------------------------- delimited text files


@dataclass(frozen=True)
class _Layout:
    """A delimited layout: the separator, and the columns a header must contain or a headerless file has."""

    separator: str
    required: tuple[str, ...] = ()  # header formats: names the header must contain
    columns: tuple[str, ...] | None = None  # headerless formats: the fixed column names


@dataclass(frozen=True)
class _Delimited:
    frame: pl.DataFrame  # one String column per source column, plus `_LINE` (null on refused lines)
    columns: tuple[str, ...]
    rejected: pl.DataFrame  # bad_encoding and malformed_line rows


def _split_header(line: str, separator: str) -> list[str]:
    try:
        names = next(csv.reader([line], delimiter=separator, strict=True), [])
    except csv.Error:
        names = line.split(separator)
    return [name.strip().lstrip("\ufeff") for name in names]


def _read_delimited(
    text: _Text,
    layout: _Layout,
    max_field_length: int,
    check_header: Callable[[tuple[str, ...]], object] = lambda columns: None,
) -> _Delimited:
    """The rows of a delimited file; lines with the wrong number of fields, broken quoting, or so long that one of
    their fields must exceed ``max_field_length`` are quarantined instead of parsed.

    ``check_header`` sees the header's columns before any row is parsed (it raises `missing_column`).
    """
    columns, start = _columns(text, layout, check_header)
    width, sep = len(columns), layout.separator
    # Measured on all the lines, then cut: string functions on a slice of the lines copy the long ones.
    counts, sizes = _field_counts(text.lines, sep).slice(start), text.lines.str.len_bytes().slice(start)
    # A line of more bytes than this has a field over the limit, even with 4-byte characters and quotes.
    line_limit = width * (4 * max_field_length + 3)
    wrong = (counts != width) | (sizes == 0) | (sizes > line_limit)  # an empty line is no row, whatever the width
    refused = _refused_lines(text, start, wrong, counts, sizes, width, sep, line_limit)
    if wrong.all() and refused.height == 0 and text.rejected.is_empty():
        raise DatasetError("empty_source", "no data lines" + (" after the header" if start else ""), text.source)

    frame = None
    if not (counts < 0).any() and sizes.filter(wrong).sum() <= sizes.filter(~wrong).sum():
        # Quoting is sound everywhere, so each line is one row even when it has too few or too many fields:
        # parse the file as it is. The other lines keep their rows, with no line number (see `_Table`):
        # dropping them here would make polars copy every long value again downstream. (When the refused lines
        # are the bulk of the bytes, parsing the good lines alone costs less.)
        frame = _parse_fields(text.data, start, sep, width)
        numbers = pl.int_range(start + 1, start + 1 + len(wrong), dtype=pl.Int64, eager=True).set(wrong, None)
    if frame is None or frame.height != len(wrong):  # a broken quote swallows lines: parse the good ones alone
        keep = (~wrong).arg_true()
        frame = _parse_fields(_joined(text.lines, keep + start), 0, sep, width)
        numbers = keep.cast(pl.Int64) + start + 1
    if frame is None or frame.height != len(numbers):
        parsed = "no" if frame is None else frame.height
        why = f"{parsed} rows parsed from {len(numbers)} well-formed lines; check the quoting and line ends"
        raise DatasetError("unreadable", why, text.source)
    frame.columns = list(columns)
    return _Delimited(frame.with_columns(numbers.alias(_LINE)), columns, pl.concat([text.rejected, refused]))


def _columns(
    text: _Text, layout: _Layout, check_header: Callable[[tuple[str, ...]], object]
) -> tuple[tuple[str, ...], int]:
    """The columns of a delimited file, and the index of its first data line."""
    if layout.columns is not None:
        return layout.columns, 0
    encoding_rejects = set(text.rejected["source_line"].to_list())
    header = _header_index(text.lines, encoding_rejects, text.source)
    found = _split_header(text.lines[header], layout.separator)
    names = [name or f"column_{i + 1}" for i, name in enumerate(found)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError("bad_header", f"the header repeats the column(s) {repeated}: rename them", text.source)
    check_header(tuple(names))
    return tuple(names), header + 1


def _refused_lines(
    text: _Text,
    start: int,
    wrong: pl.Series,
    counts: pl.Series,
    sizes: pl.Series,
    width: int,
    sep: str,
    line_limit: int,
) -> pl.DataFrame:
    """Quarantine rows for the ``wrong`` lines (counted from ``start``) that hold something: blank lines are no
    data, and lines blanked for bad encoding are quarantined already."""
    if not wrong.any():
        return _empty_quarantine()
    blank = (text.lines.str.strip_chars().str.len_bytes() == 0).slice(start)
    positions = (wrong & ~blank).arg_true()
    found, size = pl.lit(counts.gather(positions)), pl.lit(sizes.gather(positions))
    worded = pl.select(
        pl.when(size > line_limit)
        .then(pl.struct(reason=pl.lit("field_too_long"), detail=pl.format(
            f"the line has {{}} bytes, so a field is over max_field_length "
            f"({line_limit} bytes for {width} fields)",
            size,
        )))
        .when(found < 0)
        .then(pl.struct(
            reason=pl.lit("malformed_line"),
            detail=pl.lit("unbalanced or misplaced double quote (a quoted field cannot span lines)"),
        ))
        .otherwise(pl.struct(
            reason=pl.lit("malformed_line"),
            detail=pl.format(f"expected {width} fields separated by {sep!r}, found {{}}", found),
        ))
        .struct.unnest()
    )
    raws = _raw_text(text.lines, positions + start)
    lines = positions.cast(pl.Int64) + start + 1
    return _quarantine_rows(text.source, lines, worded["reason"], worded["detail"], raws)


def _parse_fields(data: bytes, skip: int, separator: str, width: int) -> pl.DataFrame | None:
    """Every line after the first ``skip`` as ``width`` string columns (short lines padded, long ones cut); None
    when polars cannot parse them."""
    try:
        return pl.read_csv(
            data,
            has_header=False,
            skip_lines=skip,
            separator=separator,
            quote_char='"',
            schema={f"c{i}": pl.String for i in range(width)},
            truncate_ragged_lines=True,
            missing_columns="insert",
            extra_columns="ignore",
            raise_if_empty=False,
        )
    except pl.exceptions.PolarsError:
        return None


def _header_index(lines: pl.Series, encoding_rejects: set[int], source: str) -> int:
    """The header is the first non-blank line; one that does not decode is fatal (the columns are unknown)."""
    for index, line in enumerate(lines):
        if index + 1 in encoding_rejects:
            why = "the header line is not valid text in this encoding: pass the right --encoding"
            raise DatasetError("unreadable", why, source)
        if line and line.strip():
            return index
    raise DatasetError("empty_source", "the file has only blank lines", source)


def _field_counts(lines: pl.Series, separator: str) -> pl.Series:
    """Fields per line (separators outside quotes, plus one); -1 where the quoting is broken."""
    counts = lines.str.count_matches(separator, literal=True).cast(pl.Int64) + 1
    quoted = lines.str.contains('"', literal=True)
    if quoted.any():
        positions = quoted.arg_true()
        subset = pl.lit(lines).gather(positions)  # one expression: gathering eagerly would copy long lines
        sep = re.escape(separator)
        one_field = f'(?:{_QUOTED_FIELD}|[^"{sep}]*)'
        well_formed = subset.str.contains(f"^{one_field}(?:{sep}{one_field})*$")
        outside = subset.str.replace_all(_QUOTED_FIELD, "").str.count_matches(separator, literal=True)
        fixed = pl.select(pl.when(well_formed).then(outside.cast(pl.Int64) + 1).otherwise(-1)).to_series()
        counts = counts.scatter(positions, fixed)
    return counts


# ---------------------------------------------------------------------------------------------------- JSON lines


def _json_text(value: Any) -> str | None:
    """A JSON value as the text a CSV export would hold (integral floats without ``.0``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class _JsonLines:
    """The lines of a JSON-lines file to parse, and the quarantine so far."""

    positions: pl.Series  # 0-based, non-blank lines of at most `_MAX_JSON_LINE_BYTES`
    rejected: pl.DataFrame  # the text's rejects plus the overlong lines
    all_content: bool  # no line was refused: the file can be parsed as it is


def _json_lines(text: _Text) -> _JsonLines:
    """Overlong lines are refused unparsed, because a JSON parser copies a huge value many times over."""
    lines = text.lines
    content = lines.str.strip_chars().str.len_bytes() > 0
    if not content.any() and text.rejected.is_empty():
        raise DatasetError("empty_source", "no data lines", text.source)
    lengths = lines.str.len_bytes()
    positions = (lengths > _MAX_JSON_LINE_BYTES).arg_true()
    worded = f"a JSON line of {{}} bytes; the limit is {_MAX_JSON_LINE_BYTES}"
    detail = pl.select(pl.format(worded, lengths.gather(positions))).to_series()
    refused = _quarantine_rows(text.source, positions + 1, "malformed_line", detail, _raw_text(lines, positions))
    keep = content.scatter(positions, False) if len(positions) else content
    return _JsonLines(keep.arg_true(), pl.concat([text.rejected, refused]), all_content=len(positions) == 0)


def _fast_ndjson(
    text: _Text, json_lines: _JsonLines, schema: dict[str, pl.DataType] | None = None
) -> pl.DataFrame | None:
    """The lines through polars at once, with `_LINE`; None when some line needs the careful path."""
    content = json_lines.positions
    payload = text.data if json_lines.all_content else _joined(text.lines, content)
    try:  # polars skips blank lines, so rows and content lines pair up (checked below)
        frame = pl.read_ndjson(payload, schema=schema, infer_schema_length=None)
    except (pl.exceptions.PolarsError, ValueError):
        return None
    if frame.height != len(content):
        return None
    return frame.with_columns(pl.Series(_LINE, content.cast(pl.Int64) + 1))


def _json_objects(text: _Text, json_lines: _JsonLines) -> tuple[list[tuple[int, dict[str, Any]]], pl.DataFrame]:
    """The careful path: each line through `json.loads`; lines that are no JSON object are quarantined (the
    returned quarantine includes ``json_lines.rejected``)."""
    objects: list[tuple[int, dict[str, Any]]] = []
    bad_lines: list[int] = []
    details: list[str] = []
    for position in json_lines.positions.to_list():
        try:
            obj = json.loads(text.lines[position])
        except json.JSONDecodeError as exc:
            why = f"invalid JSON: {exc.msg} at column {exc.colno}"
        else:
            if isinstance(obj, dict):
                objects.append((position + 1, obj))
                continue
            why = f"a JSON {type(obj).__name__}, not an object"
        bad_lines.append(position + 1)
        details.append(why)
    lines = pl.Series(bad_lines, dtype=pl.Int64)
    malformed = _quarantine_rows(text.source, lines, "malformed_line", details, _raw_text(text.lines, lines - 1))
    return objects, pl.concat([json_lines.rejected, malformed])


def _read_jsonl(text: _Text, mapping: ColumnMapping, options: ReadOptions) -> _Table:
    """Generic JSON lines: one event object per line, keys by ``mapping``."""
    json_lines = _json_lines(text)
    frame, rejected = _fast_ndjson(text, json_lines), json_lines.rejected
    if frame is None:
        objects, rejected = _json_objects(text, json_lines)
        if not objects:  # without one object there are no keys to map
            first = rejected.row(0, named=True)
            why = f"no line is a JSON object (line {first['source_line']}: {first['detail']})"
            raise DatasetError("unreadable", why, text.source)
        keys = list(dict.fromkeys(key for _, obj in objects for key in obj))
        frame = pl.DataFrame(
            {key: [_json_text(obj.get(key)) for _, obj in objects] for key in keys}
            | {_LINE: [line for line, _ in objects]},
            schema={key: pl.String for key in keys} | {_LINE: pl.Int64},
        )
    columns = tuple(c for c in frame.columns if c != _LINE)
    resolved = _resolve_mapping(columns, mapping, text.source)
    table_fields = _generic_fields(resolved, frame.schema, options, text.source)
    return _Table(frame, columns, table_fields, rejected, text.lines)


_OTTO_SCHEMA: dict[str, pl.DataType] = {
    "session": pl.Int64(),
    "events": pl.List(pl.Struct({"aid": pl.Int64(), "ts": pl.Int64(), "type": pl.String()})),
}
_OTTO_TYPES = {"clicks": "click", "carts": "add_to_cart", "orders": "purchase"}
_OTTO_SHAPE = (
    'expected {"session": <id>, "events": [{"aid": <id>, "ts": <ms>, "type": <type>}, ...]} with 1 event or more'
)


def _read_otto(text: _Text, mapping: ColumnMapping, options: ReadOptions) -> _Table:
    """OTTO sessions, one JSON line each, flattened to one row per event (``source_line`` = the session's line)."""
    json_lines = _json_lines(text)
    sessions, rejected = _fast_ndjson(text, json_lines, _OTTO_SCHEMA), json_lines.rejected
    if sessions is not None and sessions["session"].null_count() == 0:  # no session id: the careful path says so
        has_events = pl.col("events").list.len().fill_null(0) > 0
        bad_lines = sessions.filter(~has_events)[_LINE]
        rows = sessions.filter(has_events).explode("events").unnest("events")
        rows = rows.select("session", "aid", "ts", "type", _LINE)
    else:
        objects, rejected = _json_objects(text, json_lines)
        flat: dict[str, list[Any]] = {"session": [], "aid": [], "ts": [], "type": [], _LINE: []}
        misshapen: list[int] = []
        for line, obj in objects:
            events = obj.get("events")
            listed = isinstance(events, list) and bool(events) and all(isinstance(e, dict) for e in events)
            if "session" not in obj or not listed:
                misshapen.append(line)
                continue
            for event in events:
                flat["session"].append(_json_text(obj["session"]))
                for key in ("aid", "ts", "type"):
                    flat[key].append(_json_text(event.get(key)))
                flat[_LINE].append(line)
        bad_lines = pl.Series(misshapen, dtype=pl.Int64)
        rows = pl.DataFrame(flat, schema={key: pl.String for key in flat} | {_LINE: pl.Int64})
    raw = _raw_text(text.lines, bad_lines - 1)
    malformed = _quarantine_rows(text.source, bad_lines, "malformed_line", _OTTO_SHAPE, raw)
    otto_fields = _Fields(
        item_id=_text_col("aid", rows.schema),
        timestamp=pl.col("ts"),
        unit="ms",
        session_id=_text_col("session", rows.schema),
        event_type=pl.col("type").replace(_OTTO_TYPES),
    )
    # No `lines`: the raw text of a refused event is the event as JSON, not its whole session.
    return _Table(rows, ("session", "events"), otto_fields, pl.concat([rejected, malformed]))


# -------------------------------------------------------------------------------------------------------- Parquet


_TRIVAGO_COLUMNS = ("user_id", "session_id", "timestamp", "step", "action_type", "reference")
_TRIVAGO_ITEM_ACTIONS: dict[str, str] = {
    "interaction item image": "view",
    "interaction item info": "view",
    "interaction item rating": "view",
    "interaction item deals": "view",
    "search for item": "view",
    "clickout item": "click",
}


def _parquet_schema(path: Path) -> dict[str, pl.DataType]:
    try:
        return dict(pl.read_parquet_schema(path))
    except Exception as exc:  # polars/pyarrow raise various types for a damaged footer
        why = f"corrupt or truncated Parquet file ({type(exc).__name__}: {exc}); re-export it"
        raise DatasetError("unreadable", why, str(path)) from exc


def _read_parquet(
    path: Path, schema: dict[str, pl.DataType], fmt: str, mapping: ColumnMapping, options: ReadOptions
) -> _Table:
    """Parquet rows (``source_line`` = the 1-based row); only the columns needed are read."""
    source, columns = str(path), tuple(schema)
    if fmt == "trivago":
        missing = [c for c in _TRIVAGO_COLUMNS if c not in schema]
        if missing:
            raise _missing_columns(missing, columns, source, "this is not a complete trivago file")
        wanted, table_fields = list(_TRIVAGO_COLUMNS), _trivago_fields()
    else:
        resolved = _resolve_mapping(columns, mapping, source)
        wanted = list(dict.fromkeys(c for c in resolved.values() if c is not None))
        table_fields = _generic_fields(resolved, schema, options, source)
    try:
        frame = pl.read_parquet(path, columns=wanted)
    except Exception as exc:  # corrupt pages surface only when the data is read
        why = f"corrupt Parquet data ({type(exc).__name__}: {exc}); re-export it"
        raise DatasetError("unreadable", why, source) from exc
    if frame.height == 0:
        raise DatasetError("empty_source", "the Parquet file has no rows", source)
    frame = frame.with_columns(pl.int_range(1, frame.height + 1, dtype=pl.Int64).alias(_LINE))
    return _Table(frame, columns, table_fields, _empty_quarantine())


# ---------------------------------------------------------------------------------------- source columns → fields


@dataclass(frozen=True)
class _Rule:
    """A format's own reason to quarantine a row: ``when`` selects the rows, ``detail`` words each one."""

    reason: str
    when: pl.Expr
    detail: pl.Expr


_NULL = pl.lit(None, dtype=pl.String)
#: Column types no canonical field can come from (a Parquet file may have them).
_UNUSABLE_TYPES = (pl.Binary, pl.Duration, pl.Time, pl.Object)
_TEXT_FIELDS = ("event_id", "session_id", "user_id", "item_id", "event_type", "category")


@dataclass(frozen=True)
class _Fields:
    """Expressions over a source's columns giving each canonical field, and how to read the time."""

    item_id: pl.Expr
    timestamp: pl.Expr  # given to `parse_timestamps` with `unit`
    unit: TimestampUnit
    session_id: pl.Expr = _NULL
    user_id: pl.Expr = _NULL
    event_id: pl.Expr = _NULL
    event_type: pl.Expr = pl.lit(IMPLICIT_EVENT_TYPE)
    category: pl.Expr = _NULL
    price: pl.Expr = _NULL  # text or number, parsed in `_assemble`
    rules: tuple[_Rule, ...] = ()


@dataclass(frozen=True)
class _Table:
    """A source split into rows, with how to map them: what `_assemble` needs."""

    frame: pl.DataFrame  # the source's columns (any dtype) plus `_LINE`; rows without a line are in `rejected`
    columns: tuple[str, ...]
    fields: _Fields
    rejected: pl.DataFrame  # rows refused before mapping (bad_encoding, malformed_line)
    lines: pl.Series | None = None  # physical lines: the raw text of refused rows (else the row as JSON)


def _id(name: str) -> pl.Expr:
    """A text id column with the `NULL_TOKENS` as null."""
    column = pl.col(name)
    return pl.when(column.is_in(NULL_TOKENS)).then(None).otherwise(column)


def _text_col(name: str, schema: dict[str, pl.DataType] | pl.Schema) -> pl.Expr:
    """A column of any type as id text: numbers without a spurious ``.0``; NaN and `NULL_TOKENS` as null."""
    dtype, column = schema[name], pl.col(name)
    if dtype == pl.String:
        return _id(name)
    if dtype.is_decimal():
        return column.cast(pl.String).str.replace(r"\.0+$", "")
    if dtype.is_float():
        integral = column.is_finite() & (column == column.round(0))
        return (
            pl.when(integral)
            .then(column.cast(pl.Int64, strict=False).cast(pl.String))
            .when(column.is_finite())
            .then(column.cast(pl.String))
        )
    if dtype.is_nested():  # not an id: shown as compact JSON, and `normalize` refuses it
        if isinstance(dtype, pl.Struct):
            return column.struct.json_encode()
        return pl.struct(column.alias("_")).struct.json_encode().str.slice(len('{"_":')).str.strip_suffix("}")
    return column.cast(pl.String, strict=False)


def _check_mapping(fmt: str, mapping: ColumnMapping | None, source: str) -> None:
    if mapping is not None and mapping.explicit() and fmt not in GENERIC_FORMATS:
        raise DatasetError(
            "bad_mapping",
            f"a column mapping applies to generic files ({', '.join(GENERIC_FORMATS)}) and this file is {fmt}: "
            "drop the mapping, or pass --format csv/tsv/parquet/jsonl to read it as a generic file",
            source,
        )


def _loose(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _resolve_mapping(columns: Sequence[str], mapping: ColumnMapping, source: str) -> dict[str, str | None]:
    """Canonical field → source column (None where absent); a missing required or explicit field raises."""
    by_loose: dict[str, list[str]] = {}
    for column in columns:
        by_loose.setdefault(_loose(column), []).append(column)
    resolved: dict[str, str | None] = {}
    for canonical, wanted in mapping.as_dict().items():
        candidates = [wanted] if wanted in columns else by_loose.get(_loose(wanted), [])
        resolved[canonical] = candidates[0] if len(candidates) == 1 else None
    missing = [name for name in REQUIRED_FIELDS if resolved[name] is None]
    if resolved["session_id"] is None and resolved["user_id"] is None:
        missing.append("session_id or user_id")
    missing += [name for name in sorted(mapping.explicit()) if resolved[name] is None and name not in missing]
    if missing:
        wanted = mapping.as_dict()
        named = [f"{m} (column {wanted[m]!r})" if wanted.get(m, m) != m else m for m in missing]
        hint = "map the file's columns with --map, e.g. --map item_id=ItemId,session_id=SessionId,timestamp=Time"
        raise _missing_columns(named, columns, source, hint)
    return resolved


def _missing_columns(missing: Sequence[str], columns: Sequence[str], source: str, hint: str) -> DatasetError:
    if columns and all(re.fullmatch(r"[-+0-9.eE]+", c) for c in columns):
        hint += "; the first line looks like data: does the file lack its header line?"
    return DatasetError(
        "missing_column", f"missing {', '.join(missing)}; the file has the columns {list(columns)}; {hint}", source
    )


def _generic_fields(
    resolved: dict[str, str | None], schema: dict[str, pl.DataType] | pl.Schema, options: ReadOptions, source: str
) -> _Fields:
    for canonical, column in resolved.items():
        dtype = schema[column] if column is not None else pl.Null()
        if isinstance(dtype, _UNUSABLE_TYPES):
            why = f"column {column!r} has the type {dtype}, which holds no {canonical}"
            raise DatasetError("unreadable", why + ": export it as text or numbers", source)

    def text(name: str) -> pl.Expr:
        column = resolved[name]
        return _text_col(column, schema) if column is not None else _NULL

    def value(name: str) -> pl.Expr:
        """Numbers, text and datetimes as they are (parsed later); anything else as text, refused row by row."""
        column = resolved[name]
        if column is None:
            return _NULL
        dtype = schema[column]
        if dtype.is_numeric() or dtype.is_temporal() or dtype in (pl.String, pl.Null):
            return pl.col(column)
        return _text_col(column, schema)

    event_type = pl.lit(IMPLICIT_EVENT_TYPE)
    if resolved["event_type"] is not None:
        extra = {raw.strip().lower(): canonical for raw, canonical in options.event_type_map.items()}
        given = pl.col(resolved["event_type"]).cast(pl.String)
        vocabulary = GENERIC_EVENT_TYPES | extra
        known = given.str.strip_chars().str.to_lowercase().replace_strict(vocabulary, default=None)
        event_type = pl.coalesce(known, given)
    return _Fields(
        item_id=text("item_id"),
        timestamp=value("timestamp"),
        unit=options.timestamp_unit,
        session_id=text("session_id"),
        user_id=text("user_id"),
        event_id=text("event_id"),
        event_type=event_type,
        category=text("category"),
        price=value("price"),
    )


def _rees46_fields() -> _Fields:
    """REES46: ``category_id`` is a 19-digit id (kept as text); the readable ``category_code`` wins if present."""
    return _Fields(
        item_id=_id("product_id"),
        timestamp=pl.col("event_time"),
        unit="iso",
        session_id=_id("user_session"),
        user_id=_id("user_id"),
        event_type=pl.col("event_type").replace({"cart": "add_to_cart"}),
        category=pl.coalesce(_id("category_code"), _id("category_id")),
        price=pl.col("price"),
    )


def _diginetica_fields() -> _Fields:
    """DIGINETICA ``train-item-views``: ``eventdate`` (a day) + ``timeframe`` (milliseconds) → epoch ms."""
    day = pl.col("eventdate").str.strip_chars().str.to_date("%Y-%m-%d", strict=False)
    offset = pl.col("timeframe").str.strip_chars().cast(pl.Int64, strict=False)
    bad_time = _Rule(
        "bad_timestamp",
        day.is_null() | offset.is_null(),
        pl.format(
            "eventdate '{}' + timeframe '{}' is no time: expected YYYY-MM-DD and integer milliseconds",
            pl.col("eventdate").fill_null("").str.slice(0, _SHOWN),
            pl.col("timeframe").fill_null("").str.slice(0, _SHOWN),
        ),
    )
    return _Fields(
        item_id=_id("itemId"),
        timestamp=day.cast(pl.Datetime("ms")).cast(pl.Int64) + offset,
        unit="ms",
        session_id=_id("sessionId"),
        user_id=_id("userId"),
        event_type=pl.lit("view"),
        rules=(bad_time,),
    )


def _retailrocket_fields() -> _Fields:
    """RetailRocket ``events.csv``: visitors, no sessions (they are derived by inactivity downstream)."""
    return _Fields(
        item_id=_id("itemid"),
        timestamp=pl.col("timestamp"),
        unit="ms",
        user_id=_id("visitorid"),
        event_type=pl.col("event").replace({"addtocart": "add_to_cart", "transaction": "purchase"}),
    )


def _trivago_fields() -> _Fields:
    """trivago: only item-level actions carry an item id in ``reference``; the others are quarantined, counted."""
    action, reference = pl.col("action_type"), pl.col("reference")
    return _Fields(
        item_id=reference,
        timestamp=pl.col("timestamp"),
        unit="s",
        session_id=_id("session_id"),
        user_id=_id("user_id"),
        event_type=action.replace(_TRIVAGO_ITEM_ACTIONS),
        rules=(
            _Rule(
                "not_an_item_event",
                ~action.is_in(list(_TRIVAGO_ITEM_ACTIONS)),
                pl.format(
                    "action '{}' does not refer to an item (reference '{}')",
                    action.fill_null(""),
                    reference.fill_null("").str.slice(0, _SHOWN),
                ),
            ),
            _Rule(
                "missing_item_id",
                ~reference.str.contains(r"^\d+$"),
                pl.format(
                    "item action '{}' has reference '{}' instead of an item id",
                    action,
                    reference.fill_null("").str.slice(0, _SHOWN),
                ),
            ),
        ),
    )


# ------------------------------------------------------------------------------------------------ text formats


def _native_reader(layout: _Layout, build: Callable[[], _Fields], name: str):
    """The reader of a native delimited format with a header: check the header, then map with ``build``."""

    def read(text: _Text, mapping: ColumnMapping, options: ReadOptions) -> _Table:
        def check_header(columns: tuple[str, ...]) -> None:
            missing = [c for c in layout.required if c not in columns]
            if missing:
                raise _missing_columns(missing, columns, text.source, f"this is not a complete {name} file")

        delimited = _read_delimited(text, layout, options.max_field_length, check_header)
        return _Table(delimited.frame, delimited.columns, build(), delimited.rejected, text.lines)

    return read


def _generic_reader(separator: str | None):
    """The reader of a generic delimited file (``None``: the separator is sniffed from the header)."""

    def read(text: _Text, mapping: ColumnMapping, options: ReadOptions) -> _Table:
        sep = separator or _sniff_separator(text)
        check_header = partial(_resolve_mapping, mapping=mapping, source=text.source)
        delimited = _read_delimited(text, _Layout(sep), options.max_field_length, check_header)
        resolved = _resolve_mapping(delimited.columns, mapping, text.source)
        table_fields = _generic_fields(resolved, delimited.frame.schema, options, text.source)
        return _Table(delimited.frame, delimited.columns, table_fields, delimited.rejected, text.lines)

    return read


def _sniff_separator(text: _Text) -> str:
    header = _first_line(text.lines.head(50).fill_null("").to_list())
    counts = {sep: header.count(sep) for sep in (",", ";", "|", "\t")}
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else ","


_YOOCHOOSE_SPLIT = _Layout("\t", columns=("SessionId", "ItemId", "Time"))
_YOOCHOOSE_CLICKS = _Layout(",", columns=("SessionId", "Timestamp", "ItemId", "Category"))
_YOOCHOOSE_SPLIT_ROW = re.compile(r"\d+\t\d+\t\d+(?:\.\d*)?")
_YOOCHOOSE_CLICKS_ROW = re.compile(r"\d+,\d{4}-\d{2}-\d{2}T[^,]*,\d+,[^,]*")


def _yoochoose_layout(first: str) -> tuple[_Layout, bool] | None:
    """(layout, has a header) from the first line: a session-rec/GRU4Rec split (``SessionId ItemId Time``, tab,
    header optional) or the raw ``yoochoose-clicks.dat`` (``SessionId,Timestamp,ItemId,Category``, no header)."""
    if first.split("\t")[:3] == list(_YOOCHOOSE_SPLIT.columns or ()):
        return _YOOCHOOSE_SPLIT, True
    if _YOOCHOOSE_SPLIT_ROW.fullmatch(first):
        return _YOOCHOOSE_SPLIT, False
    if _YOOCHOOSE_CLICKS_ROW.fullmatch(first):
        return _YOOCHOOSE_CLICKS, False
    return None


def _read_yoochoose(text: _Text, mapping: ColumnMapping, options: ReadOptions) -> _Table:
    first = _first_line(text.lines.head(50).fill_null("").to_list())
    found = _yoochoose_layout(first)
    if found is None:
        raise DatasetError(
            "missing_column",
            f"not a YOOCHOOSE file: the first line {first[:_SHOWN]!r} is neither SessionId<TAB>ItemId<TAB>Time "
            "(header optional) nor SessionId,Timestamp,ItemId,Category (yoochoose-clicks.dat)",
            text.source,
        )
    layout, has_header = found
    read_as = _Layout(layout.separator) if has_header else layout  # the header names the same columns
    delimited = _read_delimited(text, read_as, options.max_field_length)
    if layout is _YOOCHOOSE_CLICKS:
        # In yoochoose-clicks.dat "0" means "no category" (the challenge's README); "S" is a special offer.
        yoochoose_fields = _Fields(
            item_id=_id("ItemId"),
            timestamp=pl.col("Timestamp"),
            unit="iso",
            session_id=_id("SessionId"),
            category=pl.when(pl.col("Category") == "0").then(None).otherwise(_id("Category")),
        )
    else:  # Time: epoch seconds with a fraction (shifted by the preprocessing's local offset, see PROVENANCE)
        yoochoose_fields = _Fields(
            item_id=_id("ItemId"), timestamp=pl.col("Time"), unit="s", session_id=_id("SessionId")
        )
    return _Table(delimited.frame, delimited.columns, yoochoose_fields, delimited.rejected, text.lines)


_HEADER_FORMATS: dict[str, _Layout] = {
    "rees46": _Layout(",", required=("event_time", "event_type", "product_id", "user_session")),
    "diginetica": _Layout(";", required=("sessionId", "userId", "itemId", "timeframe", "eventdate")),
    "retailrocket": _Layout(",", required=("timestamp", "visitorid", "event", "itemid")),
}

_TEXT_READERS: dict[str, Callable[[_Text, ColumnMapping, ReadOptions], _Table]] = {
    "csv": _generic_reader(None),
    "tsv": _generic_reader("\t"),
    "jsonl": _read_jsonl,
    "otto": _read_otto,
    "yoochoose": _read_yoochoose,
    "rees46": _native_reader(_HEADER_FORMATS["rees46"], _rees46_fields, "rees46"),
    "diginetica": _native_reader(_HEADER_FORMATS["diginetica"], _diginetica_fields, "diginetica"),
    "retailrocket": _native_reader(_HEADER_FORMATS["retailrocket"], _retailrocket_fields, "retailrocket"),
}


# ---------------------------------------------------------------------------------- rows → raw frame + quarantine


def _assemble(table: _Table, options: ReadOptions, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Map a source's rows to the raw frame; rows that cannot be events go to the quarantine with a reason.

    Reasons, first match wins: ``field_too_long``, the format's rules (e.g. ``not_an_item_event``),
    ``bad_timestamp``, ``bad_price``. Details are worded for the refused rows only, which keeps big files fast.
    """
    spec = table.fields
    staged = table.frame.select(
        pl.col(_LINE),
        *(getattr(spec, name).alias(name) for name in _TEXT_FIELDS),
        spec.timestamp.alias("_timestamp"),
        spec.price.alias("_price"),
    )
    timestamps, timestamp_reasons = parse_timestamps(staged["_timestamp"], spec.unit)
    prices, bad_prices = _parse_prices(staged["_price"])
    limit = options.max_field_length
    checked = [c for c in (*_TEXT_FIELDS, "_timestamp", "_price") if staged.schema[c] == pl.String]
    too_long = _too_long(staged, checked, limit)

    # (reason, refused mask, wording of the refused rows from their capped values), in order of precedence.
    checks: list[tuple[str, pl.Series, Callable[[_Refused], pl.Series]]] = [
        ("field_too_long", too_long, lambda rows: rows.staged.select(_length_detail(checked, limit)).to_series())
    ]
    for rule in spec.rules:
        mask = table.frame.select(rule.when.fill_null(True)).to_series()
        checks.append((rule.reason, mask, lambda rows, rule=rule: rows.source.select(rule.detail).to_series()))
    checks += [
        ("bad_timestamp", timestamps.is_null(), lambda rows: timestamp_reasons.gather(rows.positions)),
        ("bad_price", bad_prices, lambda rows: rows.staged.select(_price_detail()).to_series()),
    ]
    rows_to_read = staged[_LINE].is_not_null()  # the others were refused before (`_Table.frame`)
    refused = pl.repeat(False, staged.height, eager=True)
    for _, mask, _ in checks:
        refused = refused | mask
    refused = refused & rows_to_read
    good = ~refused & rows_to_read
    keep = (lambda column: column) if good.all() else (lambda column: column.filter(good))  # a filter copies
    frame = pl.DataFrame(
        {
            **{name: keep(staged[name]) for name in _TEXT_FIELDS},
            "price": keep(prices),
            "timestamp": keep(timestamps),
            "source": pl.repeat(source, int(good.sum()), dtype=pl.String, eager=True),
            "source_line": keep(staged[_LINE]),
        },
        schema=RAW_FRAME_SCHEMA,
    )
    if not refused.any():
        return frame, table.rejected.sort("source_line", maintain_order=True)

    rows = _Refused.of(table, staged, refused.arg_true(), with_lengths=bool(too_long.any()))
    reasons = pl.repeat(None, len(rows.positions), dtype=pl.String, eager=True)
    details = pl.repeat(None, len(rows.positions), dtype=pl.String, eager=True)
    for name, mask, explain in reversed(checks):  # earlier checks overwrite later ones: the first match wins
        hit = mask.gather(rows.positions)
        if hit.any():
            reasons = pl.select(pl.when(hit).then(pl.lit(name)).otherwise(reasons)).to_series()
            details = pl.select(pl.when(hit).then(explain(rows)).otherwise(details)).to_series()
    lines = rows.staged[_LINE]
    if table.lines is not None:
        raws = _raw_text(table.lines, lines - 1)
    else:
        raws = rows.source.select(pl.struct(pl.exclude(_LINE)).struct.json_encode()).to_series()
    refused_rows = _quarantine_rows(source, lines, reasons, details, raws)
    return frame, pl.concat([table.rejected, refused_rows]).sort("source_line", maintain_order=True)


@dataclass(frozen=True)
class _Refused:
    """The refused rows of a table, their string values capped at `MAX_RAW_CHARS`.

    Capping comes first and on whole columns, where polars only narrows its string views; gathering a 10 MB
    value and then applying any string function to it would copy it several times over.
    """

    positions: pl.Series
    staged: pl.DataFrame  # the canonical fields (+ ``_len<field>`` character counts when asked)
    source: pl.DataFrame  # the source columns

    @classmethod
    def of(cls, table: _Table, staged: pl.DataFrame, positions: pl.Series, with_lengths: bool) -> _Refused:
        capped = pl.col(pl.String).str.slice(0, MAX_RAW_CHARS)
        texts = [c for c in staged.columns if staged.schema[c] == pl.String]
        lengths = [pl.col(c).str.len_chars().alias(f"_len{c}") for c in texts]
        return cls(
            positions=positions,
            staged=staged.with_columns(*(lengths if with_lengths else ()), capped)[positions],
            source=table.frame.with_columns(capped)[positions],
        )


def _length_detail(columns: Sequence[str], limit: int) -> pl.Expr:
    """Which field is too long, from the ``_len<field>`` counts of `_Refused`."""
    worded = [
        pl.when(pl.col(f"_len{c}") > limit).then(
            pl.format(f"{c.lstrip('_')} has {{}} characters (limit {limit})", pl.col(f"_len{c}"))
        )
        for c in columns
    ]
    return pl.coalesce(worded)


def _price_detail() -> pl.Expr:
    return pl.format("price '{}' is not a number", pl.col("_price").cast(pl.String).str.slice(0, _SHOWN))


def _too_long(staged: pl.DataFrame, columns: Sequence[str], limit: int) -> pl.Series:
    """Rows with a field over ``limit`` characters (bytes first, which is cheap; characters where needed)."""
    if not columns:
        return pl.repeat(False, staged.height, eager=True)
    by_bytes = staged.select(
        pl.any_horizontal(pl.col(c).str.len_bytes() > limit for c in columns).fill_null(False)
    ).to_series()
    if not by_bytes.any():
        return by_bytes
    by_chars = pl.any_horizontal(pl.col(c).str.len_chars() > limit for c in columns).fill_null(False)
    return staged.select(by_chars).to_series()


def _parse_prices(values: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(Float64 prices, refused mask): NaN, empty and `NULL_TOKENS` are missing; other non-numbers are refused."""
    if values.null_count() == len(values):  # no price column: the common case of session datasets
        return values.cast(pl.Float64).alias("price"), pl.repeat(False, len(values), eager=True)
    if values.dtype.is_numeric():
        numbers = values.cast(pl.Float64)
        refused = numbers.is_infinite().fill_null(False)
    else:
        text = values.cast(pl.String).str.strip_chars()
        numbers = text.cast(pl.Float64, strict=False)
        present = text.is_not_null() & ~text.is_in(NULL_TOKENS)
        refused = (present & (numbers.is_null() | numbers.is_infinite())).fill_null(False)
    prices = pl.select(pl.when(pl.lit(numbers).is_finite()).then(pl.lit(numbers))).to_series()
    return prices.alias("price"), refused


def _joined(lines: pl.Series, positions: pl.Series) -> bytes:
    """The lines at ``positions`` as one UTF-8 text, to parse again (gathered and joined in one expression)."""
    return pl.select(pl.lit(lines).gather(positions).str.join("\n").cast(pl.Binary)).item()


def _raw_text(lines: pl.Series, positions: pl.Series) -> pl.Series:
    """The lines at ``positions`` capped at `MAX_RAW_CHARS`: capped first (polars narrows its string views), then
    gathered, because gathering a 10 MB line before a string function copies it several times over."""
    if len(positions) == 0:
        return pl.Series(dtype=pl.String)
    return lines.str.slice(0, MAX_RAW_CHARS).gather(positions)


def _empty_quarantine() -> pl.DataFrame:
    return pl.DataFrame(schema=QUARANTINE_SCHEMA)


def _quarantine_rows(
    source: str,
    lines: pl.Series,
    reason: str | pl.Series,
    detail: str | pl.Series | list[str],
    raw: pl.Series | list[str],
) -> pl.DataFrame:
    """Rows in `QUARANTINE_SCHEMA`; detail and raw capped at `MAX_RAW_CHARS` (batch_id is set by the caller)."""
    n = len(lines)
    if n == 0:
        return _empty_quarantine()

    def column(value: str | pl.Series | list[str]) -> pl.Series:
        if isinstance(value, str):
            return pl.repeat(value, n, dtype=pl.String, eager=True)
        return pl.Series(value, dtype=pl.String)

    return pl.DataFrame(
        {
            "source": pl.repeat(source, n, dtype=pl.String, eager=True),
            "source_line": lines.cast(pl.Int64),
            "reason": column(reason),
            "detail": column(detail).str.slice(0, MAX_RAW_CHARS),
            "raw": column(raw).str.slice(0, MAX_RAW_CHARS),
            "batch_id": pl.repeat(None, n, dtype=pl.String, eager=True),
        },
        schema=QUARANTINE_SCHEMA,
    )
