"""Dataset-level validation with Great Expectations: the verdict of the blocking asset checks.

Row-level problems are quarantined by vectorised polars code before this module sees a batch, so GX does not
need to touch every row (and at 10M events it must not: pandas would take minutes). Each check runs two ways:

* a row suite (``events.json``, ``sessions.json``) on a seeded random sample of at most
  ``ValidationConfig.gx_sample_rows`` rows, converted to pandas: schema, types and per-row rules, with example
  values when something is off;
* an aggregate suite (``events_batch.json``, ``sessions_batch.json``) on a one-row frame of figures polars
  computed on *every* row (rates, counts of rule breaks, extremes), so a rare bad row cannot hide from the sample.

Suites are JSON files under ``expectations/`` so that a reviewer reads the rules without reading code. Thresholds
that come from the typed configuration are GX suite parameters (``{"$PARAMETER": "name"}``) whose values are
passed at run time, so the JSON never disagrees with ``config.py``. Each expectation carries a ``description``
(what must hold) and ``meta.fix`` (what a person does about it); `ValidationReport.message` prints both.

great_expectations takes ~10 s to import and its context is slow to build, so both happen on first use, once
per process.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import polars as pl

from sessionrec.config import IngestConfig, ValidationConfig
from sessionrec.ops.errors import DatasetError, SessionrecError

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations import ExpectationSuite, ValidationDefinition

SUITES_DIR = Path(__file__).parents[1] / "expectations"

#: Seed of the validation sample: the same batch always yields the same sample, hence the same verdict.
SAMPLE_SEED = 20_240_601

#: Columns of the session summary frame (one row per session) that `validate_sessions` expects.
SESSION_SUMMARY_COLUMNS: tuple[str, ...] = (
    "session_id",
    "length",
    "duration_seconds",
    "n_distinct_items",
    "starts_at",
    "ends_at",
)

_MAX_EXAMPLES = 5
_MAX_EXAMPLE_CHARS = 60


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result, flattened to strings so that it logs and serialises as is."""

    expectation: str  # GX expectation type, e.g. expect_column_values_to_be_in_set
    column: str | None  # the column (or "a,b" for a column pair); None for table-level expectations
    success: bool
    observed: str  # what GX saw: counts and example values, or the aggregate's value
    detail: str  # what must hold and how to fix it, from the suite's description and meta.fix


@dataclass(frozen=True)
class ValidationReport:
    """The verdict of one suite (or of a row suite plus its aggregate suite) on one batch."""

    suite: str
    success: bool
    outcomes: tuple[ExpectationOutcome, ...]
    rows_validated: int  # rows GX saw in the row suite (the sample), not the batch size
    sampled: bool  # True when the batch had more rows than the sample
    parameters: Mapping[str, Any] = field(default_factory=dict)  # suite parameter values of this run

    def failures(self) -> list[ExpectationOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.success]

    def message(self) -> str:
        """One line per failed expectation, for the person who has to fix the data (or a summary when all pass)."""
        failures = self.failures()
        if not failures:
            scope = f"a sample of {self.rows_validated} rows" if self.sampled else f"{self.rows_validated} rows"
            return f"{self.suite}: all {len(self.outcomes)} expectations passed on {scope}"
        return "\n".join(
            f"{self.suite}: {o.expectation}{f'[{o.column}]' if o.column else ''} failed ({o.observed}). {o.detail}"
            for o in failures
        )

    def as_metadata(self) -> dict[str, Any]:
        """A JSON-serialisable summary for Dagster metadata (and the run log)."""
        return {
            "suite": self.suite,
            "success": self.success,
            "rows_validated": self.rows_validated,
            "sampled": self.sampled,
            "evaluated": len(self.outcomes),
            "failed": len(self.failures()),
            "failures": [
                {"expectation": o.expectation, "column": o.column, "observed": o.observed, "detail": o.detail}
                for o in self.failures()
            ],
            "parameters": {key: _jsonable(value) for key, value in self.parameters.items()},
        }


def load_suite(name: str) -> dict[str, Any]:
    """The suite ``expectations/<name>.json`` as a dict (GX's ``ExpectationSuite`` JSON form)."""
    path = SUITES_DIR / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in SUITES_DIR.glob("*.json"))
        raise SessionrecError(f"no expectation suite {name!r} at {path}; available suites: {available}")
    try:
        suite = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SessionrecError(f"expectation suite {path} is not valid JSON ({exc}); fix the file") from exc
    if suite.get("name") != name or not isinstance(suite.get("expectations"), list):
        raise SessionrecError(f"{path} must hold an object with \"name\": {name!r} and a list of \"expectations\"")
    return suite


def suite_parameter_names(suite: Mapping[str, Any]) -> set[str]:
    """Names of the ``$PARAMETER`` values an expectation suite needs at run time."""
    return {
        value["$PARAMETER"]
        for expectation in suite["expectations"]
        for value in expectation.get("kwargs", {}).values()
        if isinstance(value, dict) and "$PARAMETER" in value
    }


def build_suite(suite: Mapping[str, Any]) -> ExpectationSuite:
    """A GX suite from its JSON form; an invalid expectation is an error (GX itself only logs and drops it)."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    expectations = []
    for position, config in enumerate(suite["expectations"]):
        try:
            expectations.append(ExpectationConfiguration(**config).to_domain_obj())
        except Exception as exc:  # GX raises several unrelated types for a bad configuration
            raise SessionrecError(
                f"expectations/{suite['name']}.json: expectation #{position} ({config.get('type')}) is not a "
                f"valid GX 1.x expectation: {exc}"
            ) from exc
    return gx.ExpectationSuite(
        name=suite["name"], expectations=expectations, meta=suite.get("meta"), notes=suite.get("notes")
    )


# --------------------------------------------------------------------------------------------------- aggregates


def batch_aggregates(
    events: pl.DataFrame,
    ingest: IngestConfig,
    now: datetime,
    *,
    n_input_rows: int,
    n_quarantined: int,
    n_duplicates: int,
) -> dict[str, float | None]:
    """Figures of a whole clean batch, computed by polars on every row, for `validate_batch_aggregates`.

    ``n_input_rows`` counts the rows read (clean + quarantined); ``n_quarantined`` the rows moved to the
    quarantine, ``n_duplicates`` those of them that were duplicate events. Rates are shares of the input.
    """
    _require_columns(events, ("item_id", "timestamp", "event_type"), "events")
    if min(n_input_rows, n_quarantined, n_duplicates) < 0 or n_input_rows < events.height + n_quarantined:
        raise ValueError(
            f"inconsistent batch counts: {n_input_rows} input rows < {events.height} clean + {n_quarantined} "
            "quarantined (or a negative count)"
        )
    low, high = time_window(ingest, now)
    row = _aggregate(
        events,
        "events",
        pl.col("item_id").null_count().alias("null_items"),
        (~pl.col("event_type").is_in(list(ingest.known_event_types))).sum().alias("n_event_types_unknown"),
        (~pl.col("timestamp").is_between(low, high)).sum().alias("n_outside_time_window"),
        pl.col("timestamp").min().dt.epoch("s").alias("min_timestamp"),
        pl.col("timestamp").max().dt.epoch("s").alias("max_timestamp"),
    )
    denominator = max(n_input_rows, 1)
    return {
        "row_count": events.height,
        "duplicate_rate": n_duplicates / denominator,
        "quarantine_rate": n_quarantined / denominator,
        "null_item_rate": row["null_items"] / max(events.height, 1),
        "n_event_types_unknown": row["n_event_types_unknown"],
        "n_outside_time_window": row["n_outside_time_window"],
        "min_timestamp": row["min_timestamp"],
        "max_timestamp": row["max_timestamp"],
    }


def session_aggregates(summary: pl.DataFrame) -> dict[str, float | None]:
    """Figures of the whole session summary (one row per session), computed by polars on every row."""
    _require_columns(summary, SESSION_SUMMARY_COLUMNS, "session summary")
    return _aggregate(
        summary,
        "session summary",
        pl.len().alias("n_sessions"),
        pl.col("session_id").null_count().alias("n_null_session_ids"),
        (pl.len() - pl.col("session_id").n_unique()).alias("n_duplicate_session_ids"),
        pl.col("length").min().alias("min_length"),
        pl.col("length").max().alias("max_length"),
        pl.col("duration_seconds").min().alias("min_duration_seconds"),
        pl.col("duration_seconds").max().alias("max_duration_seconds"),
        (pl.col("ends_at") < pl.col("starts_at")).sum().alias("n_ends_before_starts"),
    )


def _aggregate(frame: pl.DataFrame, what: str, *figures: pl.Expr) -> dict[str, Any]:
    """One row of figures over the whole frame; a column of the wrong type is a dataset error, not a traceback."""
    try:
        return frame.select(*figures).row(0, named=True)
    except pl.exceptions.PolarsError as exc:
        raise DatasetError(
            "bad_column_types",
            f"cannot compute the {what} figures ({type(exc).__name__}: {exc}); "
            f"columns have types {dict(frame.schema)}: produce them with the types the pipeline's schemas define",
        ) from exc


def time_window(ingest: IngestConfig, now: datetime) -> tuple[datetime, datetime]:
    """The plausible event time range: from ``ingest.min_timestamp`` to ``now`` plus the allowed clock skew."""
    if now.tzinfo is None:
        raise SessionrecError("validation needs a timezone-aware 'now' (UTC), got a naive datetime")
    low = datetime.fromisoformat(ingest.min_timestamp)
    if low.tzinfo is None:
        raise SessionrecError(f"ingest.min_timestamp {ingest.min_timestamp!r} needs a timezone (end it with Z)")
    return low, now + timedelta(minutes=ingest.max_future_skew_minutes)


# --------------------------------------------------------------------------------------------------- validation


def validate_events(
    events: pl.DataFrame, ingest: IngestConfig, validation: ValidationConfig, now: datetime
) -> ValidationReport:
    """The row suite ``events`` on a seeded sample of the clean batch."""
    low, high = time_window(ingest, now)
    parameters = {
        "known_event_types": list(ingest.known_event_types),
        "id_pattern": ingest.id_pattern,
        "max_id_length": ingest.max_id_length,
        "min_timestamp": low.isoformat(),
        "max_timestamp": high.isoformat(),
    }
    sample, sampled = _sample(events, validation.gx_sample_rows)
    outcomes, success = _run("events", _to_pandas(sample), parameters)
    return ValidationReport("events", success, outcomes, sample.height, sampled, parameters)


def validate_batch_aggregates(
    aggregates: Mapping[str, float | None], validation: ValidationConfig
) -> ValidationReport:
    """The aggregate suite ``events_batch`` on the figures of a whole batch (see `batch_aggregates`)."""
    parameters = {
        "max_duplicate_rate": validation.max_duplicate_rate,
        "max_quarantine_rate": validation.max_quarantine_rate,
    }
    outcomes, success = _run("events_batch", _one_row(aggregates), parameters, values=aggregates)
    return ValidationReport("events_batch", success, outcomes, 1, False, parameters)


def validate_sessions(summary: pl.DataFrame, validation: ValidationConfig) -> ValidationReport:
    """The session suites: ``sessions`` on a seeded sample of the summary, ``sessions_batch`` on all-row figures.

    When the summary lacks columns the row suite reports them and the aggregates are not computed.
    """
    parameters = {
        "max_session_length_check": validation.max_session_length_check,
        "max_session_seconds": validation.max_session_hours * 3600,
    }
    sample, sampled = _sample(summary, validation.gx_sample_rows)
    outcomes, success = _run("sessions", _to_pandas(sample), parameters)
    if set(SESSION_SUMMARY_COLUMNS) <= set(summary.columns):
        aggregates = session_aggregates(summary)
        batch, batch_success = _run("sessions_batch", _one_row(aggregates), parameters, values=aggregates)
        outcomes, success = outcomes + batch, success and batch_success
    return ValidationReport("sessions", success, outcomes, sample.height, sampled, parameters)


# ------------------------------------------------------------------------------------------------------ helpers


def _sample(frame: pl.DataFrame, max_rows: int) -> tuple[pl.DataFrame, bool]:
    """At most ``max_rows`` rows, drawn with a fixed seed (the whole frame when it is small enough)."""
    if frame.height <= max_rows:
        return frame, False
    return frame.sample(n=max_rows, seed=SAMPLE_SEED), True


def _to_pandas(frame: pl.DataFrame) -> pd.DataFrame:
    """Strings become pandas' Arrow-backed ``string`` dtype, not Python objects.

    GX then checks a string column's type from its dtype instead of calling isinstance on every value, and
    null/regex checks run in Arrow: validating the sample takes about half the time.
    """
    import pandas as pd
    import pyarrow as pa

    strings = {kind: pd.StringDtype("pyarrow") for kind in (pa.string(), pa.large_string(), pa.string_view())}
    return frame.to_arrow().to_pandas(types_mapper=strings.get)


def _one_row(values: Mapping[str, float | None]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([{key: (math.nan if value is None else value) for key, value in values.items()}])


def _require_columns(frame: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DatasetError(
            "missing_columns",
            f"the {what} frame lacks columns {missing} (it has {frame.columns}); produce them before validation",
        )


@cache
def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.data_sources.add_pandas("sessionrec")
    return context


@cache
def _definition(name: str) -> tuple[ValidationDefinition, dict[str, Any]]:
    """The validation definition of one suite (built once per process) and the suite's JSON."""
    import great_expectations as gx

    context = _context()
    suite_json = load_suite(name)
    suite = context.suites.add(build_suite(suite_json))
    asset = context.data_sources.get("sessionrec").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe(name)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    return definition, suite_json


def _run(
    name: str,
    frame: pd.DataFrame,
    parameters: Mapping[str, Any],
    values: Mapping[str, Any] | None = None,
) -> tuple[tuple[ExpectationOutcome, ...], bool]:
    """Run suite ``name`` on ``frame``; ``values`` (one-row frames) lets outcomes show each figure's value."""
    definition, suite_json = _definition(name)
    missing = suite_parameter_names(suite_json) - set(parameters)
    if missing:
        raise SessionrecError(
            f"expectations/{name}.json uses parameters {sorted(missing)} that no setting provides; "
            f"this run provides {sorted(parameters)}"
        )
    result = definition.run(
        batch_parameters={"dataframe": frame}, expectation_parameters=dict(parameters), result_format="SUMMARY"
    )
    position = {expectation.id: i for i, expectation in enumerate(definition.suite.expectations)}
    ordered = sorted(result.results, key=lambda r: position.get(r.expectation_config.id, len(position)))
    return tuple(_outcome(r, values) for r in ordered), bool(result.success)


def _outcome(result: Any, values: Mapping[str, Any] | None) -> ExpectationOutcome:
    config = result.expectation_config
    kwargs = config.kwargs
    pair = f"{kwargs['column_A']},{kwargs['column_B']}" if "column_A" in kwargs else None
    column = kwargs.get("column") or pair
    fix = (config.meta or {}).get("fix")
    detail = " ".join(part for part in (config.description, f"Fix: {fix}" if fix else None) if part)
    return ExpectationOutcome(
        expectation=config.type,
        column=column,
        success=bool(result.success),
        observed=_observed(result, kwargs, values),
        detail=detail,
    )


def _observed(result: Any, kwargs: Mapping[str, Any], values: Mapping[str, Any] | None) -> str:
    """What GX saw, in words: an exception, a value, or counts of unexpected rows with examples."""
    errors = _unique(
        str(info.get("exception_message"))
        for info in _exception_infos(result.exception_info)
        if info.get("raised_exception")
    )
    if errors:
        return "could not be evaluated: " + "; ".join(errors)
    payload = result.result or {}
    bounds = ", ".join(
        f"{key}={_short(kwargs[key])}" for key in ("min_value", "max_value") if kwargs.get(key) is not None
    )
    if values is not None and kwargs.get("column") in values:
        value = values[kwargs["column"]]
        return f"value {_short(value)}" + (f"; bounds {bounds}" if bounds else "")
    if "unexpected_count" in payload:
        text = f"{payload['unexpected_count']} of {payload.get('element_count', 0)} rows unexpected"
        examples = _unique(_short(e) for e in payload.get("partial_unexpected_list") or [])
        if examples:
            text += ", e.g. " + ", ".join(examples[:_MAX_EXAMPLES])
        return text + (f"; bounds {bounds}" if bounds else "")
    mismatched = (payload.get("details") or {}).get("mismatched")
    if mismatched:
        return "; ".join(f"{kind} columns {cols}" for kind, cols in mismatched.items())
    if "observed_value" in payload:
        return f"observed {_short(payload['observed_value'])}" + (f"; bounds {bounds}" if bounds else "")
    return "no observation"


def _exception_infos(info: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """GX reports one exception dict, or a dict of them keyed by metric, depending on where it failed."""
    if not info:
        return []
    if "raised_exception" in info:
        return [info]
    return [value for value in info.values() if isinstance(value, Mapping)]


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_EXAMPLE_CHARS else text[: _MAX_EXAMPLE_CHARS - 1] + "…"


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)
