"""The standard next-item protocol: cleaning and a temporal train/validation/test split.

Cleaning (each step configurable, each step's removals counted in the stats):
  1. consecutive repeats of the same item inside a session are dropped (option),
  2. very long sessions keep their *last* ``max_session_length`` events,
  3. repeated until nothing changes: sessions shorter than ``min_session_length`` and items with fewer than
     ``min_item_support`` occurrences are removed (removing one can push the other under its bar).

Split (as GRU4Rec and session-rec do it): a session belongs to the test set when it *ends* in the last
``test_days`` days of the data. Test events on items the training part never saw are removed, and test sessions
left shorter than 2 are dropped. The same split inside the training part gives the validation set: ``train_tr``
(train minus validation) is what models learn from during tuning/early stopping, ``valid`` what they are tuned on,
and ``train`` (everything before the test days) what the final model learns from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from sessionrec.config import CleaningConfig, SplitConfig

SPLIT_FILES = ("train", "train_tr", "valid", "test")


@dataclass(frozen=True)
class SplitResult:
    train: pl.DataFrame  # session_id, item_id, timestamp (sorted by session, then time)
    train_tr: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    stats: dict = field(default_factory=dict)

    def parts(self) -> dict[str, pl.DataFrame]:
        return {"train": self.train, "train_tr": self.train_tr, "valid": self.valid, "test": self.test}


def _counts(frame: pl.DataFrame) -> dict[str, int]:
    """Events, sessions and items; on the integer codes of `clean` when present (much faster than strings)."""
    session, item = ("_s", "_i") if "_s" in frame.columns else ("session_id", "item_id")
    return {
        "events": frame.height,
        "sessions": frame[session].n_unique() if frame.height else 0,
        "items": frame[item].n_unique() if frame.height else 0,
    }


class _StepLog:
    """What each cleaning step removed; counts each frame once (the counts are the costly part at 10M events)."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self.steps: list[dict] = []
        self._last = _counts(frame)

    def record(self, name: str, after: pl.DataFrame) -> pl.DataFrame:
        if after.height != self._last["events"]:  # a step that removed no event removed nothing
            current = _counts(after)
            self.steps.append({"step": name, **{f"{k}_removed": self._last[k] - current[k] for k in current}})
            self._last = current
        return after


def _drop_short_sessions(frame: pl.DataFrame, min_length: int) -> pl.DataFrame:
    key = "_s" if "_s" in frame.columns else "session_id"
    return frame.filter(pl.len().over(key) >= min_length)


def clean(sessions: pl.DataFrame, cfg: CleaningConfig) -> tuple[pl.DataFrame, list[dict]]:
    """Apply the protocol's cleaning to ordered sessions (``session_id, item_id, timestamp`` at least)."""
    cleaned, steps = _clean_coded(sessions, cfg)
    return cleaned.drop("_s", "_i"), steps


def _with_codes(frame: pl.DataFrame) -> pl.DataFrame:
    """Add integer codes ``_s`` (session) and ``_i`` (item) and order by (session, time).

    Sessionized input keeps each session contiguous (ops/sessions.py): then the session code is a running count of
    session changes and the order is kept as it is — no string sort. Other input is sorted by session id first.
    Item codes are categorical codes: only compared for equality, never ordered.
    """
    starts = (pl.col("session_id") != pl.col("session_id").shift(1)).fill_null(True)
    n_runs = frame.select(starts.sum()).item() if frame.height else 0
    if n_runs != frame["session_id"].n_unique():
        frame = frame.sort(["session_id", "timestamp"], maintain_order=True)
    coded = frame.with_columns(
        starts.cast(pl.Int64).cum_sum().alias("_s"),
        pl.col("item_id").cast(pl.Categorical).to_physical().cast(pl.Int64).alias("_i"),
    )
    return coded.sort(["_s", "timestamp"], maintain_order=True) if not _time_ordered(coded) else coded


def _time_ordered(frame: pl.DataFrame) -> bool:
    """Whether timestamps never decrease inside a session (true for sessionized data)."""
    same = pl.col("_s") == pl.col("_s").shift(1)
    return not frame.select((same & (pl.col("timestamp") < pl.col("timestamp").shift(1))).any()).item()


def _clean_coded(sessions: pl.DataFrame, cfg: CleaningConfig) -> tuple[pl.DataFrame, list[dict]]:
    """`clean`, keeping the integer codes ``_s``/``_i`` for the split that follows. Steps that removed nothing
    are left out of the log."""
    frame = _with_codes(sessions.select("session_id", "item_id", "timestamp"))
    log = _StepLog(frame)
    if cfg.drop_consecutive_repeats:
        frame = log.record("drop_consecutive_repeats", frame.filter(
            ((pl.col("_i") != pl.col("_i").shift(1)) | (pl.col("_s") != pl.col("_s").shift(1))).fill_null(True)
        ))
    frame = log.record(f"cap_session_length_{cfg.max_session_length}",
                       frame.filter(pl.int_range(pl.len()).reverse().over("_s") < cfg.max_session_length))
    for iteration in range(100):
        before = frame.height
        frame = log.record(f"drop_sessions_shorter_than_{cfg.min_session_length}#{iteration}",
                           _drop_short_sessions(frame, cfg.min_session_length))
        frame = log.record(f"drop_items_with_support_below_{cfg.min_item_support}#{iteration}",
                           frame.filter(pl.len().over("_i") >= cfg.min_item_support))
        if frame.height == before:
            break
    return frame, log.steps


def _temporal(frame: pl.DataFrame, days: float) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Split off the sessions that end in the last ``days`` days; filter them to items seen before."""
    if frame.is_empty():
        return frame, frame, {"cutoff": None, "unknown_item_events_removed": 0, "short_sessions_removed": 0}
    session_end = pl.col("timestamp").max().over("_s")
    cutoff_value = frame.select(pl.col("timestamp").max() - pl.duration(microseconds=int(days * 86_400e6))).item()
    is_after = frame.select(session_end > cutoff_value).to_series()
    before, after = frame.filter(~is_after), frame.filter(is_after)
    after_known = after.filter(pl.col("_i").is_in(before["_i"].unique()))
    after_final = _drop_short_sessions(after_known, 2)
    info = {
        "cutoff": cutoff_value.isoformat(),
        "unknown_item_events_removed": after.height - after_known.height,
        "short_sessions_removed": _counts(after_known)["sessions"] - _counts(after_final)["sessions"],
    }
    return before, after_final, info


def make_split(sessions: pl.DataFrame, cleaning: CleaningConfig, split: SplitConfig) -> SplitResult:
    """Clean, then split by time into train / train_tr / valid / test, with the counts of every step."""
    raw_counts = _counts(sessions)
    cleaned, steps = _clean_coded(sessions, cleaning)
    train, test, test_info = _temporal(cleaned, split.test_days)
    train_tr, valid, valid_info = _temporal(train, split.valid_days)
    result = SplitResult(train=train, train_tr=train_tr, valid=valid, test=test)
    stats = {
        "input": raw_counts,
        "cleaning": steps,
        "after_cleaning": _counts(cleaned),
        "test_split": {"test_days": split.test_days, **test_info},
        "valid_split": {"valid_days": split.valid_days, **valid_info},
        "files": {name: _counts(part) for name, part in result.parts().items()},
        "next_item_predictions": {
            name: part.height - _counts(part)["sessions"]
            for name, part in result.parts().items()
            if name in ("valid", "test")
        },
    }
    codes = ["_s", "_i"]
    return SplitResult(
        train=train.drop(codes), train_tr=train_tr.drop(codes), valid=valid.drop(codes), test=test.drop(codes),
        stats=stats,
    )


def to_tsv_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """The `SessionId ItemId Time` layout (Time in unix seconds) that GRU4Rec and session-rec read."""
    return frame.select(
        pl.col("session_id").alias("SessionId"),
        pl.col("item_id").alias("ItemId"),
        (pl.col("timestamp").dt.epoch("us") / 1_000_000).alias("Time"),
    )


def write_split(result: SplitResult, out_dir: Path) -> dict[str, Path]:
    """Write ``train.tsv``, ``train_tr.tsv``, ``valid.tsv``, ``test.tsv`` and ``stats.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, part in result.parts().items():
        path = out_dir / f"{name}.tsv"
        to_tsv_frame(part).write_csv(path, separator="\t", float_precision=3)
        paths[name] = path
    paths["stats"] = out_dir / "stats.json"
    paths["stats"].write_text(json.dumps(result.stats, indent=2, default=str))
    return paths
