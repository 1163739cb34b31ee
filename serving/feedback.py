"""Append-only Parquet logs of what was served and what users did with it, for monitoring and offline comparison.

Three logs under the serving directory, one schema each:

* ``requests/``: every `/recommend` answer (request id, session, model version, variant, items, fallback, latency).
* ``feedback/``: impressions, clicks, add-to-carts and purchases tied to a request id. Each record carries the
  model version and variant when this process served that request (`RequestMemory`); otherwise monitoring joins
  it to ``requests/`` on ``request_id`` (the request may have been served by another worker or before a
  restart).
* ``shadow/``: champion and challenger rankings of the same request, when shadow mode is on.

Records are buffered and written as Parquet part files, ``<log>/date=YYYY-MM-DD/part-<time>-<pid>-<seq>.parquet``,
each written under a temporary name and renamed, so a reader never sees a half-written file and several worker
processes never write the same file. Flushes happen off the event loop (`flush` runs on a worker thread).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_TS = pa.timestamp("us", tz="UTC")

REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", _TS),
        ("session_id", pa.string()),
        ("variant", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("model_alias", pa.string()),
        ("items", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())),
        ("fallback", pa.string()),
        ("took_ms", pa.float64()),
        ("session_length", pa.int32()),
        ("api_key_id", pa.string()),
        ("context", pa.string()),  # the request's context object as JSON
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", _TS),
        ("event_type", pa.string()),
        ("item_id", pa.string()),
        ("session_id", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("variant", pa.string()),
    ]
)
SHADOW_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", _TS),
        ("session_id", pa.string()),
        ("champion_version", pa.string()),
        ("challenger_version", pa.string()),
        ("champion_items", pa.list_(pa.string())),
        ("challenger_items", pa.list_(pa.string())),
        ("champion_fallback", pa.string()),
        ("challenger_fallback", pa.string()),
        ("challenger_ms", pa.float64()),
    ]
)

#: Request ids remembered per process to stamp feedback with model version and variant.
REQUEST_MEMORY = 200_000


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class ParquetLog:
    """A directory of Parquet part files with one schema; `append` buffers, `flush` writes a part."""

    def __init__(self, directory: Path, schema: pa.Schema, flush_rows: int = 10_000, flush_seconds: float = 5.0):
        self.directory = Path(directory)
        self.schema = schema
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # appends come from the event loop, flushes from worker threads
        self._last_flush = time.monotonic()
        self._seq = itertools.count()
        self.written = 0

    def append(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._rows.append(record)

    def due(self) -> bool:
        with self._lock:
            pending = len(self._rows)
        waited = time.monotonic() - self._last_flush
        return pending >= self.flush_rows or (pending > 0 and waited >= self.flush_seconds)

    def flush(self) -> Path | None:
        """Write the buffered records as one part file; returns its path (None when nothing was buffered)."""
        with self._lock:
            rows, self._rows = self._rows, []
            self._last_flush = time.monotonic()
        if not rows:
            return None
        table = pa.Table.from_pylist(rows, schema=self.schema)
        now = datetime.now(UTC)
        name = f"part-{now:%H%M%S%f}-{os.getpid()}-{next(self._seq)}.parquet"
        part = self.directory / f"date={now:%Y-%m-%d}" / name
        part.parent.mkdir(parents=True, exist_ok=True)
        tmp = part.with_suffix(".tmp")
        try:
            pq.write_table(table, tmp)
            tmp.replace(part)
        except BaseException:
            with self._lock:  # keep the records for the next flush rather than lose them
                self._rows[:0] = rows
            tmp.unlink(missing_ok=True)
            raise
        self.written += len(rows)
        return part


class RequestMemory:
    """Recent request ids → (model name, version, variant, session id), bounded (oldest forgotten first)."""

    def __init__(self, capacity: int = REQUEST_MEMORY) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[str, str, str, str]] = OrderedDict()

    def remember(
        self, request_id: str, model_name: str, model_version: str, variant: str, session_id: str
    ) -> None:
        self._entries[request_id] = (model_name, model_version, variant, session_id)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def recall(self, request_id: str) -> tuple[str, str, str, str] | None:
        return self._entries.get(request_id)
