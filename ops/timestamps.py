"""Timestamps from whatever a source gives: epoch numbers in an unknown unit, ISO-8601 text, or real datetimes.

Files and the live stream both need this, and neither may stop on one bad value, so `parse_timestamps` never
raises on content: it returns the parsed instants (UTC, microseconds) with nulls where a value could not be read,
and beside them the reason, for the quarantine. It is vectorised (polars expressions; reasons are worded for the
failed values only), so ten million values take seconds.

Epoch numbers in ``auto`` mode: the unit is chosen *per value* by magnitude, so that a column mixing seconds and
milliseconds (a common result of concatenating exports) still parses. The bounds suit the present era:

* ``|v| < 1e11``  → seconds       (1e11 s is the year 5138)
* ``|v| < 1e14``  → milliseconds  (1e11 ms is 1973-03-03, 1e14 ms the year 5138)
* ``|v| < 1e17``  → microseconds  (1e14 µs is 1973-03-03)
* otherwise       → nanoseconds   (1e17 ns is 1973-03-03)

So an epoch in any unit after March 1973 is read right; earlier instants need an explicit unit. Fractions are
rounded to the microsecond; instants outside the years 0001-9999 are refused.

Text: numeric strings as above; otherwise ``YYYY-MM-DD``, ``YYYY-MM-DD[T| ]HH:MM[:SS[.fff…]]`` with an optional
zone ``Z``, ``UTC``, ``GMT``, ``+hh``, ``+hhmm`` or ``+hh:mm`` (a space before it allowed). Offsets are converted
to UTC; a naive time is taken as UTC. Fractions beyond the microsecond are truncated. Text longer than 64 bytes
is refused unread (no accepted layout is that long), which keeps a hostile 10 MB value from being copied around.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

TimestampUnit = Literal["auto", "s", "ms", "us", "iso"]
TIMESTAMP_UNITS: tuple[str, ...] = ("auto", "s", "ms", "us", "iso")
UTC_MICROS = pl.Datetime("us", "UTC")

#: Microseconds per unit of an epoch number.
_MICROS_PER: dict[str, float] = {"s": 1e6, "ms": 1e3, "us": 1.0}
_NANOS = 1e-3
#: Auto mode: (upper bound of |value|, microseconds per unit), in order; larger values are nanoseconds.
_AUTO_BOUNDS: tuple[tuple[float, float], ...] = ((1e11, 1e6), (1e14, 1e3), (1e17, 1.0))
_UNIT_NAMES = {1e6: "seconds", 1e3: "milliseconds", 1.0: "microseconds", _NANOS: "nanoseconds"}
_MIN_MICROS = -62_135_596_800 * 10**6  # 0001-01-01
_MAX_MICROS = 253_402_300_799 * 10**6  # 9999-12-31 23:59:59

_UTC_ZONES = ("", "Z", "z", "UTC", "GMT")
_OFFSET_PATTERN = r"^([+-])(\d{2})(?::?(\d{2}))?$"
#: Rewrites the shorter accepted layouts (date only, no seconds, lower-case ``t``) to ``YYYY-MM-DD HH:MM:SS…``.
_SHAPE_FIXES: tuple[tuple[str, str], ...] = (
    (r"^(\d{4}-\d{2}-\d{2})$", "${1} 00:00:00"),
    (r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2})([^:\d]|$)", "${1} ${2}:00${3}"),
    (r"^(\d{4}-\d{2}-\d{2})t", "${1} "),
)
#: The accepted text layouts as one pattern; only used to word a failure (impossible date vs. no layout at all).
_ISO_PATTERN = (
    r"^\d{4}-\d{2}-\d{2}(?:[Tt ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?)?\s*(?:Z|z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)?$"
)
_SHOWN_CHARS = 80  # how much of a bad value a reason quotes
_MAX_TEXT_BYTES = 64  # longer values are refused: ``2019-10-01T00:00:00.123456789 +05:30`` is 36 bytes


def parse_timestamps(values: pl.Series, unit: TimestampUnit = "auto") -> tuple[pl.Series, pl.Series]:
    """Parse ``values`` into ``Datetime("us", "UTC")``.

    Returns ``(timestamps, reasons)``, both as long as ``values``: ``timestamps`` is null exactly where
    ``reasons`` (String) says why: a missing value, an unparseable text, a number out of range. ``unit`` forces
    the epoch unit (``s``/``ms``/``us``) or text-only parsing (``iso``); ``auto`` accepts both (module doc).
    """
    if unit not in TIMESTAMP_UNITS:
        raise ValueError(f"unknown timestamp unit {unit!r}; choose one of {', '.join(TIMESTAMP_UNITS)}")
    dtype = values.dtype
    if isinstance(dtype, pl.Datetime):
        return _from_datetimes(values)
    if dtype == pl.Date:
        return _from_datetimes(values.cast(pl.Datetime("us")))
    if dtype.is_numeric():
        if unit == "iso":
            return _refuse_all(values, "expected ISO-8601 text (timestamp unit 'iso'), got a number")
        # Integers take an exact path (no float rounding) for second/milli/microsecond epochs.
        ints = values.cast(pl.Int64, strict=False) if dtype.is_integer() else None
        return _from_numbers(values.cast(pl.Float64), ints, unit)
    if dtype == pl.Null:
        return _refuse_all(values, "missing timestamp")
    if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
        return _from_text(values.cast(pl.String), unit)
    return _refuse_all(values, f"a value of type {dtype} is not a timestamp")


def _nulls(length: int, dtype: pl.DataType) -> pl.Series:
    return pl.repeat(None, length, dtype=dtype, eager=True)


def _explain_failures(parsed: pl.Series, context: pl.DataFrame, explain: pl.Expr) -> pl.Series:
    """Reasons beside ``parsed``: null where it parsed, else ``explain`` evaluated on the failed rows of
    ``context`` only (wording ten million good values would cost more than parsing them)."""
    failed = parsed.is_null()
    reasons = _nulls(len(parsed), pl.String)
    if failed.any():
        positions = failed.arg_true()
        reasons = reasons.scatter(positions, context[positions].select(explain).to_series())
    return reasons.alias("reason")


def _refuse_all(values: pl.Series, reason: str) -> tuple[pl.Series, pl.Series]:
    nulls = _nulls(len(values), UTC_MICROS).alias(values.name)
    explain = pl.when(pl.col("v").is_null()).then(pl.lit("missing timestamp")).otherwise(pl.lit(reason))
    return nulls, _explain_failures(nulls, pl.DataFrame({"v": values}), explain)


def _from_datetimes(values: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Real datetimes: naive ones are UTC, aware ones are converted."""
    zone = values.dtype.time_zone  # type: ignore[union-attr]
    utc = values.dt.replace_time_zone("UTC") if zone is None else values.dt.convert_time_zone("UTC")
    parsed = utc.dt.cast_time_unit("us")
    return parsed, _explain_failures(parsed, pl.DataFrame(), pl.lit("missing timestamp"))


def _from_numbers(floats: pl.Series, ints: pl.Series | None, unit: TimestampUnit) -> tuple[pl.Series, pl.Series]:
    """Epoch numbers to instants: the unit per value in auto mode, range-checked."""
    magnitude = pl.col("f").abs()
    if unit == "auto":
        factor = pl.when(magnitude < _AUTO_BOUNDS[0][0]).then(pl.lit(_AUTO_BOUNDS[0][1]))
        for bound, per in _AUTO_BOUNDS[1:]:
            factor = factor.when(magnitude < bound).then(pl.lit(per))
        factor = factor.otherwise(pl.lit(_NANOS))
    else:
        factor = pl.lit(_MICROS_PER[unit])
    frame = pl.DataFrame({"f": floats}).with_columns(factor.alias("k"))
    approx = pl.col("f") * pl.col("k")
    micros = approx.round(0).cast(pl.Int64)
    if ints is not None:
        frame = frame.with_columns(ints.alias("i"))
        micros = pl.when(pl.col("k") >= 1).then(pl.col("i") * pl.col("k").cast(pl.Int64)).otherwise(micros)
    in_range = pl.col("f").is_finite() & approx.is_between(_MIN_MICROS, _MAX_MICROS)
    parsed = frame.select(pl.when(in_range).then(micros).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
    shown = pl.col("f").cast(pl.String)
    explain = (
        pl.when(pl.col("f").is_null())
        .then(pl.lit("missing timestamp"))
        .when(~pl.col("f").is_finite())
        .then(pl.format("timestamp {} is not a finite number", shown))
        .otherwise(
            pl.format(
                "epoch {} read as {} is outside the years 0001-9999",
                shown,
                pl.col("k").replace_strict(_UNIT_NAMES, return_dtype=pl.String),
            )
        )
    )
    result = parsed.to_series().alias(floats.name)
    return result, _explain_failures(result, frame, explain)


def _from_text(values: pl.Series, unit: TimestampUnit) -> tuple[pl.Series, pl.Series]:
    too_long = values.str.len_bytes() > _MAX_TEXT_BYTES
    if too_long.any():
        # No timestamp is that long: cut it first (an ellipsis keeps it unparseable and shows the cut), so that
        # a hostile 10 MB value is never copied by the string functions below.
        positions = too_long.arg_true()
        values = values.clone().scatter(positions, values.str.slice(0, _MAX_TEXT_BYTES).gather(positions) + "…")
    text = values.str.strip_chars()
    if unit == "iso":
        return _from_strings(text, unit)
    numeric = text.cast(pl.Float64, strict=False)
    is_text = text.is_not_null() & numeric.is_null()
    if not is_text.any():
        return _from_numbers(numeric, None, unit)
    if (is_text | text.is_null()).all():  # the usual case for a column of date strings: no split, no scatter
        return _from_strings(text, unit)
    # A mixed column: numbers and strings are parsed apart and put back in place.
    parsed, reasons = _from_numbers(numeric, None, unit)
    positions = is_text.arg_true()
    text_parsed, text_reasons = _from_strings(text.gather(positions), unit)
    return parsed.scatter(positions, text_parsed), reasons.scatter(positions, text_reasons)


def _from_strings(text: pl.Series, unit: TimestampUnit) -> tuple[pl.Series, pl.Series]:
    """Non-numeric text: ISO-8601 in ``auto``/``iso`` mode, an error where an epoch unit was asked for."""
    context = pl.DataFrame({"text": text})
    shown = pl.col("text").str.slice(0, _SHOWN_CHARS)
    if unit in ("auto", "iso"):
        parsed = _from_iso(text)
        explain = (
            pl.when(pl.col("text").is_null())
            .then(pl.lit("missing timestamp"))
            .when(pl.col("text") == "")
            .then(pl.lit("empty timestamp"))
            .when(pl.col("text").str.contains(_ISO_PATTERN))
            .then(pl.format("timestamp '{}' is not a valid calendar date/time", shown))
            .otherwise(pl.format("cannot parse timestamp '{}': expected an epoch number or ISO-8601", shown))
        )
    else:
        parsed = _nulls(len(text), UTC_MICROS)
        explain = (
            pl.when(pl.col("text").is_null())
            .then(pl.lit("missing timestamp"))
            .otherwise(pl.format("timestamp '{}' is not an epoch number in {}", shown, pl.lit(unit)))
        )
    parsed = parsed.alias(text.name)
    return parsed, _explain_failures(parsed, context, explain)


def _from_iso(text: pl.Series) -> pl.Series:
    """ISO-8601-like text to instants (null where it does not parse).

    The full layout ``YYYY-MM-DD[T ]HH:MM:SS`` + fraction + zone is parsed by position, several times faster than
    a regex or a strptime with ``%.f%z``; the rows it misses are rewritten by `_SHAPE_FIXES` and parsed again.
    """
    parsed = _parse_full_layout(text)
    failed = parsed.is_null() & text.is_not_null()
    if failed.any():
        positions = failed.arg_true()
        fixed = text.gather(positions)
        for pattern, replacement in _SHAPE_FIXES:
            fixed = fixed.str.replace(pattern, replacement)
        parsed = parsed.scatter(positions, _parse_full_layout(fixed))
    return parsed


def _parse_full_layout(text: pl.Series) -> pl.Series:
    """``YYYY-MM-DD[T ]HH:MM:SS[.f{1,9}][zone]`` to UTC instants; anything else is null."""
    frame = pl.DataFrame({"x": text}).with_columns(
        pl.col("x")
        .str.slice(0, 19)
        .str.replace("T", " ", literal=True)
        .str.to_datetime("%Y-%m-%d %H:%M:%S", time_unit="us", strict=False, cache=False)
        .alias("naive"),
        pl.col("x").str.slice(19).alias("tail"),
    )
    fraction = pl.col("tail").str.extract(r"^[.,](\d{1,9})", 1)
    has_fraction = pl.col("tail").str.starts_with(".") | pl.col("tail").str.starts_with(",")
    if frame.select(has_fraction.any()).item():
        frame = frame.with_columns(
            fraction.str.pad_end(6, "0").str.slice(0, 6).cast(pl.Int64).fill_null(0).alias("micros"),
            pl.when(fraction.is_null())
            .then(pl.col("tail"))
            .otherwise(pl.col("tail").str.slice(fraction.str.len_bytes() + 1))
            .str.strip_chars()
            .alias("zone"),
        )
    else:
        frame = frame.with_columns(
            pl.lit(0, pl.Int64).alias("micros"), pl.col("tail").str.strip_chars().alias("zone")
        )
    offset_minutes = pl.when(pl.col("zone").is_in(_UTC_ZONES)).then(pl.lit(0, pl.Int64))
    if not frame.select(pl.col("zone").is_in(_UTC_ZONES).all()).item():
        offset = pl.col("zone").str.extract_groups(_OFFSET_PATTERN)
        sign = pl.when(offset.struct.field("1") == "-").then(-1).otherwise(1)
        hours, minutes = offset.struct.field("2").cast(pl.Int64), offset.struct.field("3").cast(pl.Int64)
        minutes = hours * 60 + minutes.fill_null(0)
        offset_minutes = offset_minutes.otherwise(sign * minutes)
    instant = pl.col("naive") + pl.duration(microseconds=pl.col("micros")) - pl.duration(minutes=offset_minutes)
    return frame.select(instant.dt.replace_time_zone("UTC")).to_series().alias(text.name)
