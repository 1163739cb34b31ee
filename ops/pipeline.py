"""Events → split in one call, for the `sessionrec split` command (the Dagster graph runs the same steps as
separate assets with a lake and blocking checks in between)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from sessionrec.config import Settings
from sessionrec.ops.errors import DatasetError
from sessionrec.ops.ingest import read_batch
from sessionrec.ops.readers import ColumnMapping, ReadOptions
from sessionrec.ops.schema import reason_counts
from sessionrec.ops.sessions import sessionize
from sessionrec.ops.split import SplitResult, make_split, write_split


@dataclass(frozen=True)
class SplitOutcome:
    split: SplitResult
    paths: dict[str, Path]
    quarantine_counts: dict[str, int]
    quarantine_path: Path


def events_to_split(
    paths: Sequence[Path], *, fmt: str, mapping: str, settings: Settings, out_dir: Path, encoding: str = "utf-8"
) -> SplitOutcome:
    """Read, validate rows, sessionize, clean and split; quarantined rows go to ``out_dir/quarantine.parquet``.

    Raises the first `DatasetError` when the batch as a whole is unusable (nothing is written then).
    """
    batch = read_batch(
        paths,
        fmt=fmt,
        mapping=ColumnMapping.parse(mapping) if mapping else None,
        options=ReadOptions(max_field_length=settings.ingest.max_field_length, encoding=encoding),
        ingest=settings.ingest,
        now=datetime.now(timezone.utc),
    )
    errors = batch.dataset_errors(settings.validation)
    if errors:
        raise DatasetError(errors[0].code, "; ".join(str(e) for e in errors))
    sessions = sessionize(batch.events, settings.sessions, batch_id=batch.batch_id)
    result = make_split(sessions.events, settings.cleaning, settings.split)
    result.stats["ingest"] = {
        "rows_in": batch.rows_in,
        "events_valid": batch.events.height,
        "quarantined": batch.quarantine_counts(),
        "sessionize": sessions.stats,
    }
    written = write_split(result, out_dir)
    quarantine = pl.concat([batch.quarantine, sessions.late], how="vertical")
    quarantine_path = Path(out_dir) / "quarantine.parquet"
    quarantine.write_parquet(quarantine_path)
    return SplitOutcome(
        split=result,
        paths=written,
        quarantine_counts=reason_counts(quarantine),
        quarantine_path=quarantine_path,
    )
