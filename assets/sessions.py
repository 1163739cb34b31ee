"""Sessionization and the temporal split, over everything in the lake."""


import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl

from sessionrec.assets.ingestion import lake_events
from sessionrec.assets.metadata import count_table
from sessionrec.assets.resources import SessionrecResource
from sessionrec.ops.sessions import length_histogram, session_summary, sessionize
from sessionrec.ops.split import make_split, write_split


@dataclass(frozen=True)
class SessionsHandle:
    events_path: Path
    summary_path: Path


@dg.asset(group_name="sessions", compute_kind="polars", deps=[lake_events], description="Ordered sessions: given "
          "session ids, or derived from user ids by inactivity timeout; late events reordered or quarantined.")
def sessions(sessionrec: SessionrecResource) -> dg.Output[SessionsHandle]:
    settings = sessionrec.settings()
    lake = sessionrec.lake()
    result = sessionize(lake.scan_events().collect(), settings.sessions, batch_id="sessionize")
    out = settings.outputs_dir / "sessions"
    out.mkdir(parents=True, exist_ok=True)
    events_path, summary_path = out / "session_events.parquet", out / "session_summary.parquet"
    summary = session_summary(result.events)
    result.events.write_parquet(events_path)
    summary.write_parquet(summary_path)
    late_path = lake.quarantine_dir / "late_events.parquet"
    if result.late.height:
        late_path.parent.mkdir(parents=True, exist_ok=True)
        result.late.write_parquet(late_path)  # recomputed from the whole lake each run: replaces, never appends
    lengths = summary["length"]
    return dg.Output(
        SessionsHandle(events_path, summary_path),
        metadata={
            **{k: v for k, v in result.stats.items()},
            "session_length_histogram": count_table(length_histogram(summary), key="length", value="sessions"),
            "session_length_mean": round(float(lengths.mean() or 0), 3),
            "session_length_median": float(lengths.median() or 0),
            "session_length_max": int(lengths.max() or 0),
            "items": result.events["item_id"].n_unique(),
            "path": dg.MetadataValue.path(str(events_path)),
        },
    )


@dg.asset_check(asset=sessions, blocking=True, description="Session-level Great Expectations suite (lengths, "
                "durations, ordering) on the session summary.")
def sessions_valid(sessionrec: SessionrecResource, sessions: SessionsHandle) -> dg.AssetCheckResult:
    from sessionrec.integrations.gx_validation import validate_sessions

    settings = sessionrec.settings()
    report = validate_sessions(pl.read_parquet(sessions.summary_path), settings.validation)
    return dg.AssetCheckResult(
        passed=report.success,
        description=report.message() if not report.success else "all expectations met",
        metadata={"gx_sessions": dg.MetadataValue.json(report.as_metadata())},
    )


@dg.asset(group_name="sessions", compute_kind="polars", description="Cleaned temporal split (train, train_tr, "
          "valid, test) as `SessionId ItemId Time` TSV files, with what every cleaning step removed.")
def session_split(sessionrec: SessionrecResource, sessions: SessionsHandle) -> dg.Output[dict[str, str]]:
    settings = sessionrec.settings()
    frame = pl.read_parquet(sessions.events_path, columns=["session_id", "item_id", "timestamp"])
    result = make_split(frame, settings.cleaning, settings.split)
    paths = write_split(result, settings.outputs_dir / "split")
    files = result.stats["files"]
    return dg.Output(
        {name: str(path) for name, path in paths.items()},
        metadata={
            **{f"{name}_events": counts["events"] for name, counts in files.items()},
            **{f"{name}_sessions": counts["sessions"] for name, counts in files.items()},
            "train_items": files["train"]["items"],
            "test_predictions": result.stats["next_item_predictions"]["test"],
            "cleaning": dg.MetadataValue.md(
                "\n".join(["| step | events | sessions | items |", "| --- | ---: | ---: | ---: |"]
                          + [f"| {s['step']} | {s['events_removed']:,} | {s['sessions_removed']:,} | "
                             f"{s['items_removed']:,} |" for s in result.stats["cleaning"]])
                or "(nothing removed)"
            ),
            "stats": dg.MetadataValue.json(json.loads(json.dumps(result.stats, default=str))),
            "directory": dg.MetadataValue.path(str(paths["stats"].parent)),
        },
    )
