"""One ingestion batch: read sources, apply the row rules, and say whether the batch as a whole is usable.

Used by the Dagster assets and by the `sessionrec split` command alike. Dataset-level problems (a missing column,
an empty file, a schema change between files, too many duplicates) are collected as `DatasetError`s rather than
raised, so that the blocking asset check can report all of them at once with what to fix; row-level problems
become quarantine rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import polars as pl

from sessionrec.config import IngestConfig, ValidationConfig
from sessionrec.ops.errors import DatasetError
from sessionrec.ops.events import NormalizedBatch, normalize
from sessionrec.ops.readers import ColumnMapping, ReadOptions, ReadResult, expand_paths, read_events
from sessionrec.ops.schema import QUARANTINE_SCHEMA, RAW_COLUMNS, empty_events, reason_counts


@dataclass(frozen=True)
class IngestBatch:
    batch_id: str
    events: pl.DataFrame
    quarantine: pl.DataFrame
    rows_in: int  # rows read, good or bad
    duplicates: int
    formats: dict[str, str]  # source -> format used
    errors: tuple[DatasetError, ...] = field(default_factory=tuple)

    @property
    def quarantine_rate(self) -> float:
        return self.quarantine.height / self.rows_in if self.rows_in else 0.0

    @property
    def duplicate_rate(self) -> float:
        return self.duplicates / self.rows_in if self.rows_in else 0.0

    def quarantine_counts(self) -> dict[str, int]:
        return reason_counts(self.quarantine)

    def dataset_errors(self, validation: ValidationConfig) -> list[DatasetError]:
        """The reader's errors plus the batch-level thresholds: each one stops the run."""
        errors = list(self.errors)
        if not self.errors and self.events.is_empty():
            errors.append(
                DatasetError("empty_batch", "no usable event in this batch: check the quarantine for the reasons")
            )
        if self.duplicate_rate > validation.max_duplicate_rate:
            errors.append(
                DatasetError(
                    "duplicate_rate",
                    f"{self.duplicate_rate:.1%} of the rows are duplicates (limit "
                    f"{validation.max_duplicate_rate:.0%}): the source was probably exported twice; de-duplicate it "
                    "or raise validation.max_duplicate_rate",
                )
            )
        if self.quarantine_rate > validation.max_quarantine_rate:
            errors.append(
                DatasetError(
                    "quarantine_rate",
                    f"{self.quarantine_rate:.1%} of the rows were quarantined (limit "
                    f"{validation.max_quarantine_rate:.0%}): most likely a wrong --format or column mapping; "
                    f"reasons: {self.quarantine_counts()}",
                )
            )
        return errors


def batch_id_for(files: Sequence[Path]) -> str:
    """A batch is identified by its sources' paths, sizes and modification times: the same files → the same id."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat() if path.exists() else None
        digest.update(f"{path.resolve()}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()[:16]


def _schema_changes(results: list[tuple[Path, ReadResult]]) -> list[DatasetError]:
    errors = []
    if results:
        first_path, first = results[0]
        for path, result in results[1:]:
            if (result.format, result.source_columns) != (first.format, first.source_columns):
                added = sorted(set(result.source_columns) - set(first.source_columns))
                removed = sorted(set(first.source_columns) - set(result.source_columns))
                errors.append(
                    DatasetError(
                        "schema_change",
                        f"columns differ from {first_path.name} ({first.format}): added {added}, missing {removed}."
                        " Ingest files with different layouts in separate runs (or map them to the same columns).",
                        source=str(path),
                    )
                )
    return errors


def read_batch(
    paths: Sequence[Path],
    *,
    fmt: str,
    mapping: ColumnMapping | None,
    options: ReadOptions,
    ingest: IngestConfig,
    now: datetime,
    seq_base: int = 0,
) -> IngestBatch:
    """Read and normalize all sources of one batch; errors of whole files are collected, not raised."""
    files = expand_paths(paths)
    batch_id = batch_id_for(files)
    errors: list[DatasetError] = []
    if not files:
        errors.append(DatasetError("not_found", f"no input file found in {[str(p) for p in paths]}"))
    results: list[tuple[Path, ReadResult]] = []
    for path in files:
        try:
            results.append((path, read_events(path, fmt, mapping, options)))
        except DatasetError as exc:
            errors.append(exc)
    errors += _schema_changes(results)
    raw = pl.concat([r.frame.select(RAW_COLUMNS) for _, r in results], how="vertical") if results else None
    reader_quarantine = [r.quarantine for _, r in results]
    formats = {str(path): r.format for path, r in results}
    del results  # the raw frame alone holds the rows now; it is freed as soon as `normalize` is done with it
    normalized = (
        normalize(raw, ingest, now=now, batch_id=batch_id, seq_base=seq_base)
        if raw is not None
        else NormalizedBatch(empty_events(), pl.DataFrame(schema=QUARANTINE_SCHEMA), 0, 0)
    )
    del raw
    quarantine = pl.concat(
        [q.with_columns(pl.lit(batch_id).alias("batch_id")).cast(QUARANTINE_SCHEMA) for q in reader_quarantine]  # type: ignore[arg-type]
        + [normalized.quarantine],
        how="vertical",
    )
    return IngestBatch(
        batch_id=batch_id,
        events=normalized.events,
        quarantine=quarantine,
        rows_in=normalized.rows_in + sum(q.height for q in reader_quarantine),
        duplicates=normalized.duplicates,
        formats=formats,
        errors=tuple(errors),
    )
