"""Data-path benchmark: generate → ingest → validate → sessionize → split on synthetic events.

Prints one table per size (events/s and peak RSS per stage) and writes benchmarks/results/pipeline.json.
Stages run in one process, one after the other, exactly as the Dagster assets call them (no Dagster overhead:
that is measured by the in-process run of `sessionrec run`). Peak memory per stage is sampled from
/proc/self/status every 10 ms while the stage runs (the process-wide high-water mark cannot be reset).

    .venv/bin/python benchmarks/pipeline.py --sizes 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from sessionrec.config import GeneratorConfig, load_settings
from sessionrec.integrations.gx_validation import (
    batch_aggregates,
    validate_batch_aggregates,
    validate_events,
    validate_sessions,
)
from sessionrec.ops.generate import generate_events, write_events
from sessionrec.ops.ingest import read_batch
from sessionrec.ops.lake import Lake
from sessionrec.ops.readers import ReadOptions
from sessionrec.ops.sessions import session_summary, sessionize
from sessionrec.ops.split import make_split, write_split


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Stage:
    """Times a block and samples its peak resident memory."""

    def __init__(self, name: str, events: int, results: list[dict]) -> None:
        self.name, self.events, self.results = name, events, results
        self._peak = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_mb())
            time.sleep(0.01)

    def __enter__(self) -> "Stage":
        self._peak = _rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.results.append({"stage": self.name, "seconds": round(seconds, 3),
                             "events_per_s": round(self.events / seconds) if seconds else None,
                             "peak_rss_mb": round(self._peak, 1)})


def run(n_events: int, workdir: Path) -> dict:
    settings = load_settings(home=workdir / "home")
    stages: list[dict] = []
    with Stage("generate", n_events, stages):
        frame = generate_events(GeneratorConfig(n_events=n_events, n_items=50_000, days=30, n_users=n_events // 8))
        source = write_events(frame, workdir / "events.parquet")
        del frame
    lake = Lake(settings.lake_dir)
    with Stage("ingest (read + row rules + stage)", n_events, stages):
        now = datetime.now(timezone.utc)
        batch = read_batch([source], fmt="parquet", mapping=None, options=ReadOptions(), ingest=settings.ingest,
                           now=now, seq_base=lake.next_seq())
        staged = lake.stage(batch.batch_id, batch.events, batch.quarantine)
    with Stage("validate (GX sample + aggregates)", n_events, stages):
        aggregates = batch_aggregates(batch.events, settings.ingest, now, n_input_rows=batch.rows_in,
                                      n_quarantined=batch.quarantine.height, n_duplicates=batch.duplicates)
        reports = [validate_events(batch.events, settings.ingest, settings.validation, now),
                   validate_batch_aggregates(aggregates, settings.validation)]
        assert all(r.success for r in reports), [r.message() for r in reports]
    del batch  # the Dagster assets hand on the staged file, not the frame: measure the commit the same way
    with Stage("commit to lake", n_events, stages):
        lake.commit(staged)
    with Stage("read lake", n_events, stages):
        events = lake.scan_events().collect()
    with Stage("sessionize", n_events, stages):
        result = sessionize(events, settings.sessions)
    del events
    with Stage("validate sessions (GX)", n_events, stages):
        report = validate_sessions(session_summary(result.events), settings.validation)
        assert report.success, report.message()
    with Stage("clean + split + write TSV", n_events, stages):
        split = make_split(result.events.select("session_id", "item_id", "timestamp"), settings.cleaning,
                           settings.split)
        write_split(split, workdir / "split")
    total = sum(s["seconds"] for s in stages)
    pipeline_total = total - stages[0]["seconds"]
    return {"events": n_events, "stages": stages, "total_seconds": round(total, 2),
            "pipeline_seconds_without_generate": round(pipeline_total, 2),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in stages),
            "sessions": result.stats["sessions"], "test_events": split.stats["files"]["test"]["events"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline.json")
    args = parser.parse_args()
    import great_expectations  # noqa: F401  (imported once up front: its ~10 s import is not a pipeline stage)

    runs = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="sessionrec-bench-") as tmp:
            runs.append(run(n, Path(tmp)))
        r = runs[-1]
        print(f"\n{n:,} events: total {r['total_seconds']} s (pipeline without generate "
              f"{r['pipeline_seconds_without_generate']} s), peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"{r['sessions']:,} sessions")
        print(f"{'stage':45s} {'seconds':>9s} {'events/s':>12s} {'peak RSS MB':>12s}")
        for s in r["stages"]:
            print(f"{s['stage']:45s} {s['seconds']:9.2f} {s['events_per_s']:12,d} {s['peak_rss_mb']:12.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine_cores": __import__("os").cpu_count(), "runs": runs}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
