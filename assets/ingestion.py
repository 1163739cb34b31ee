"""Ingestion assets: sources → staged batch (blocking validation) → committed lake partitions."""

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import polars as pl

from sessionrec.assets.metadata import count_table
from sessionrec.assets.resources import SessionrecResource
from sessionrec.config import GeneratorConfig
from sessionrec.integrations.gx_validation import batch_aggregates
from sessionrec.ops.errors import DatasetError
from sessionrec.ops.ingest import read_batch
from sessionrec.ops.lake import StagedBatch
from sessionrec.ops.readers import ColumnMapping, ReadOptions


class SourceConfig(dg.Config):
    """What to ingest in this run. No paths: the synthetic generator makes the demo data (settings.generator)."""

    paths: list[str] = []
    format: str = "auto"
    mapping: str = ""  # "item_id=product,session_id=sess" for generic files
    timestamp_unit: str = "auto"  # auto | s | ms | us | iso
    encoding: str = "utf-8"  # other encodings are transcoded; invalid bytes under utf-8 are quarantined


def synthetic_source(cfg: GeneratorConfig, directory: Path) -> Path:
    """The generated demo file, made once per generator configuration (deterministic by seed)."""
    from sessionrec.ops.generate import generate_events, write_events

    digest = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:10]
    path = directory / f"synthetic-{cfg.n_events}-seed{cfg.seed}-{digest}.parquet"
    if not path.is_file():
        write_events(generate_events(cfg), path)
    return path


@dg.asset(group_name="ingestion", compute_kind="polars", description="Sources read and row-validated; bad rows "
          "quarantined with a reason. Staged: nothing lands in the lake before the blocking check passed.")
def raw_events(context: dg.AssetExecutionContext, config: SourceConfig, sessionrec: SessionrecResource) -> dg.Output[StagedBatch]:
    settings = sessionrec.settings()
    lake = sessionrec.lake()
    paths = [Path(p) for p in config.paths] or [synthetic_source(settings.generator, settings.home / "inputs")]
    now = datetime.now(timezone.utc)
    batch = read_batch(
        paths,
        fmt=config.format,
        mapping=ColumnMapping.parse(config.mapping) if config.mapping else None,
        options=ReadOptions(
            timestamp_unit=config.timestamp_unit,  # type: ignore[arg-type]
            encoding=config.encoding,
            max_field_length=settings.ingest.max_field_length,
        ),
        ingest=settings.ingest,
        now=now,
        seq_base=lake.next_seq(),
    )
    errors = batch.dataset_errors(settings.validation)
    staged = lake.stage(
        batch.batch_id,
        batch.events,
        batch.quarantine,
        sources=tuple(str(p) for p in paths),
        errors=tuple(f"[{e.code}] {e}" for e in errors),
        aggregates=batch_aggregates(
            batch.events, settings.ingest, now, n_input_rows=batch.rows_in,
            n_quarantined=batch.quarantine.height, n_duplicates=batch.duplicates,
        ),
        staged_at=now,
    )
    context.log.info(
        f"batch {batch.batch_id}: {batch.rows_in:,} rows read, {batch.events.height:,} valid, "
        f"{batch.quarantine.height:,} quarantined {batch.quarantine_counts() or ''}"
    )
    for error in errors:
        context.log.error(str(error))
    return dg.Output(
        staged,
        metadata={
            "batch_id": batch.batch_id,
            "sources": dg.MetadataValue.json(batch.formats or [str(p) for p in paths]),
            "rows_in": batch.rows_in,
            "events_valid": batch.events.height,
            "rows_quarantined": batch.quarantine.height,
            "quarantine_by_reason": count_table(batch.quarantine_counts()),
            "duplicate_rate": round(batch.duplicate_rate, 6),
            "dataset_errors": dg.MetadataValue.md("\n".join(f"- {e}" for e in errors) or "(none)"),
            "staging_dir": dg.MetadataValue.path(str(staged.directory)),
        },
    )


@dg.asset_check(asset=raw_events, blocking=True, description="Dataset-level validation (Great Expectations "
                "suites events + events_batch): a failure stops everything downstream; nothing is committed.")
def raw_events_valid(sessionrec: SessionrecResource, raw_events: StagedBatch) -> dg.AssetCheckResult:
    from sessionrec.integrations.gx_validation import validate_batch_aggregates, validate_events

    settings = sessionrec.settings()
    metadata: dict[str, object] = {}
    problems = list(raw_events.errors)
    if not problems:
        events = raw_events.read_events()
        for report in (
            validate_events(events, settings.ingest, settings.validation, raw_events.staged_at),
            validate_batch_aggregates(raw_events.aggregates, settings.validation),
        ):
            metadata[f"gx_{report.suite}"] = dg.MetadataValue.json(report.as_metadata())
            if not report.success:
                problems.append(report.message())
    return dg.AssetCheckResult(
        passed=not problems,
        description="\n".join(problems) if problems else "all expectations met",
        metadata=metadata,
    )


@dg.asset(group_name="ingestion", compute_kind="parquet", description="The event lake: day-partitioned Parquet, "
          "append-only; re-ingesting the same events adds nothing (dedupe on event_id).")
def lake_events(sessionrec: SessionrecResource, raw_events: StagedBatch) -> dg.Output[str]:
    lake = sessionrec.lake()
    if raw_events.errors:  # only reachable when the blocking check was bypassed on purpose
        raise DatasetError("invalid_batch", "; ".join(raw_events.errors))
    result = lake.commit(raw_events)
    total = lake.scan_events().select(pl.len()).collect().item()
    return dg.Output(
        str(lake.root),
        metadata={
            "batch_id": result.batch_id,
            "events_new": result.new_events,
            "events_already_present": result.already_present,
            "rows_quarantined": result.quarantined,
            "partitions_written": dg.MetadataValue.json(list(result.partitions)),
            "lake_events_total": total,
            "lake_partitions": len(lake.partitions()),
            "lake": dg.MetadataValue.path(str(lake.root)),
        },
    )

