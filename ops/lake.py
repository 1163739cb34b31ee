"""The local event lake: Parquet partitioned by day, append-only, idempotent.

Layout under the lake root::

    events/date=YYYY-MM-DD/part-<batch_id>.parquet   typed events (ops.schema.EVENT_SCHEMA)
    quarantine/<batch_id>.parquet                    quarantined rows of each batch, with reasons
    staging/<batch_id>/{events,quarantine}.parquet   a validated-but-not-yet-committed batch
    manifest.json                                    committed batches and the arrival counter (seq)

A batch is first *staged*; only after the blocking validation check passed is it *committed*: so a batch that
fails validation never touches what has landed, and nothing landed is ever rewritten. Commit skips events whose
`event_id` is already in their day partition, which makes re-ingesting a file or a partition a no-op. Every file
is written to a temporary name and renamed, so a crash leaves either the old or the new state. (Single writer:
the production profile serialises ingestion runs per lake through Dagster's run queue.)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from sessionrec.ops.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA


@dataclass(frozen=True)
class StagedBatch:
    batch_id: str
    directory: Path
    rows: int
    quarantined: int
    sources: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()  # dataset-level problems found while reading: the batch must not be committed
    aggregates: dict[str, float | None] = field(default_factory=dict)  # batch statistics for validation
    staged_at: datetime | None = None  # the "now" of the row rules, so that validation uses the same window

    @property
    def events_dir(self) -> Path:
        """One file per day (``<YYYY-MM-DD>.parquet``): a day new to the lake is committed by a rename."""
        return self.directory / "events"

    def day_files(self) -> list[Path]:
        return sorted(self.events_dir.glob("*.parquet"))

    def read_events(self) -> pl.DataFrame:
        files = self.day_files()
        return pl.read_parquet(files) if files else pl.DataFrame(schema=EVENT_SCHEMA)

    @property
    def quarantine_path(self) -> Path:
        return self.directory / "quarantine.parquet"


@dataclass(frozen=True)
class CommitResult:
    batch_id: str
    new_events: int
    already_present: int
    quarantined: int
    partitions: tuple[str, ...] = field(default_factory=tuple)
    batch_already_committed: bool = False


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp, compression="zstd", statistics=True)
    os.replace(tmp, path)


class Lake:
    """Access to one lake root; all paths are derived here."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.events_dir = self.root / "events"
        self.quarantine_dir = self.root / "quarantine"
        self.staging_dir = self.root / "staging"
        self.manifest_path = self.root / "manifest.json"

    # -- manifest ---------------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"batches": {}, "next_seq": 0}
        return json.loads(self.manifest_path.read_text())

    def _save_manifest(self, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, self.manifest_path)

    def next_seq(self) -> int:
        """Arrival counter: the first `seq` the next batch gets (see ops.events.normalize)."""
        return int(self.manifest()["next_seq"])

    # -- staging and commit -----------------------------------------------------------------------------------
    def stage(
        self,
        batch_id: str,
        events: pl.DataFrame,
        quarantine: pl.DataFrame,
        *,
        sources: tuple[str, ...] = (),
        errors: tuple[str, ...] = (),
        aggregates: dict[str, float | None] | None = None,
        staged_at: datetime | None = None,
    ) -> StagedBatch:
        directory = self.staging_dir / batch_id
        shutil.rmtree(directory, ignore_errors=True)  # a re-staged batch replaces its earlier staging
        # One day at a time (a gather of that day's rows, in arrival order), so that staging never holds a second
        # copy of the whole batch: at 10M events, partitioning all days at once cost another 1 GB.
        days = events.select(
            pl.col("timestamp").dt.date().alias("day"), pl.int_range(pl.len(), dtype=pl.UInt32).alias("row")
        ).group_by("day", maintain_order=True).agg("row")
        columns = events.select(list(EVENT_SCHEMA))
        for day, rows in zip(days["day"].to_list(), days["row"], strict=True):  # rows: a UInt32 Series per day
            _write_atomic(columns[rows], directory / "events" / f"{day}.parquet")
        _write_atomic(quarantine.select(list(QUARANTINE_SCHEMA)), directory / "quarantine.parquet")
        return StagedBatch(
            batch_id, directory, events.height, quarantine.height, sources, errors, dict(aggregates or {}),
            staged_at,
        )

    def commit(self, staged: StagedBatch) -> CommitResult:
        """Move a staged batch into the lake; events already present (same event_id and day) are skipped."""
        manifest = self.manifest()
        batch_seen = staged.batch_id in manifest["batches"]
        new_total, partitions = 0, []
        for staged_day in staged.day_files():
            directory = self.events_dir / f"date={staged_day.stem}"
            target = directory / f"part-{staged.batch_id}.parquet"
            existing = list(directory.glob("*.parquet"))
            if not existing:  # a day new to the lake: nothing to de-duplicate against, move the file
                directory.mkdir(parents=True, exist_ok=True)
                added = pl.scan_parquet(staged_day).select(pl.len()).collect().item()
                os.replace(staged_day, target)
            else:
                seen = pl.scan_parquet(existing).select("event_id").collect()
                part = pl.read_parquet(staged_day).join(seen, on="event_id", how="anti")
                added = part.height
                if added:
                    _write_atomic(part, target)
            if added:
                new_total += added
                partitions.append(staged_day.stem)
        quarantined = 0
        if not batch_seen:
            quarantine = pl.read_parquet(staged.quarantine_path)
            quarantined = quarantine.height
            if quarantined:
                _write_atomic(quarantine, self.quarantine_dir / f"{staged.batch_id}.parquet")
            manifest["next_seq"] = int(manifest["next_seq"]) + staged.rows + staged.quarantined
        history = manifest["batches"].setdefault(staged.batch_id, {"sources": list(staged.sources), "commits": []})
        history["commits"].append(
            {"at": datetime.now(timezone.utc).isoformat(), "events_new": new_total, "quarantined": quarantined}
        )
        self._save_manifest(manifest)
        shutil.rmtree(staged.directory, ignore_errors=True)
        return CommitResult(
            batch_id=staged.batch_id,
            new_events=new_total,
            already_present=staged.rows - new_total,
            quarantined=quarantined,
            partitions=tuple(partitions),
            batch_already_committed=batch_seen,
        )

    # -- reading ----------------------------------------------------------------------------------------------
    def scan_events(self) -> pl.LazyFrame:
        files = sorted(self.events_dir.glob("date=*/*.parquet"))
        if not files:
            return pl.LazyFrame(schema=EVENT_SCHEMA)
        return pl.scan_parquet(files, hive_partitioning=False).select(list(EVENT_SCHEMA))

    def scan_quarantine(self) -> pl.LazyFrame:
        files = sorted(self.quarantine_dir.glob("*.parquet"))
        if not files:
            return pl.LazyFrame(schema=QUARANTINE_SCHEMA)
        return pl.scan_parquet(files).select(list(QUARANTINE_SCHEMA))

    def partitions(self) -> list[str]:
        return sorted(p.name.removeprefix("date=") for p in self.events_dir.glob("date=*") if p.is_dir())
