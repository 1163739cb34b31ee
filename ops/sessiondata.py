"""Sessions as compact arrays: the input of every model and of the evaluation.

The split command writes tab-separated `SessionId ItemId Time` files (the format of the official GRU4Rec and of
session-rec); `read_split_tsv` reads them back and `SessionData` holds them in CSR form: one array of item
indices in session order and the offsets where each session starts. Items are indexed by an `ItemIndex` built on
the training data only, so that a test item unseen in training is *unknown*, never silently given a new index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

SPLIT_COLUMNS = ("SessionId", "ItemId", "Time")


@dataclass(frozen=True)
class ItemIndex:
    """Maps item ids (strings) to dense indices 0..n-1 and back."""

    item_ids: np.ndarray  # object array of str, position = index

    @classmethod
    def from_items(cls, item_ids: pl.Series | list[str]) -> "ItemIndex":
        unique = pl.Series(item_ids, dtype=pl.String).unique(maintain_order=True)
        return cls(np.asarray(unique.to_list(), dtype=object))

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def lookup(self) -> dict[str, int]:
        cached = self.__dict__.get("_lookup")
        if cached is None:
            cached = {item: i for i, item in enumerate(self.item_ids.tolist())}
            object.__setattr__(self, "_lookup", cached)
        return cached

    def encode(self, items: list[str] | pl.Series) -> tuple[np.ndarray, int]:
        """Indices of the known items (unknown ones dropped) and how many were unknown."""
        lookup = self.lookup
        codes = [lookup.get(str(item), -1) for item in items]
        arr = np.asarray(codes, dtype=np.int64)
        known = arr[arr >= 0]
        return known, int(len(arr) - len(known))

    def decode(self, indices: np.ndarray) -> list[str]:
        return self.item_ids[np.asarray(indices, dtype=np.int64)].tolist()

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.item_ids.tolist()))

    @classmethod
    def load(cls, path: Path) -> "ItemIndex":
        return cls(np.asarray(json.loads(path.read_text()), dtype=object))


@dataclass(frozen=True)
class SessionData:
    """Sessions in CSR form, items already encoded with an `ItemIndex`.

    ``items[offsets[s]:offsets[s+1]]`` are the items of session ``s`` in order, ``times`` their unix seconds.
    """

    session_ids: np.ndarray  # object array of str
    offsets: np.ndarray  # int64, len = n_sessions + 1
    items: np.ndarray  # int64 item indices
    times: np.ndarray  # float64 unix seconds
    n_items: int  # catalogue size of the index used

    @property
    def n_sessions(self) -> int:
        return len(self.session_ids)

    @property
    def n_events(self) -> int:
        return len(self.items)

    def session(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[s], self.offsets[s + 1]
        return self.items[lo:hi], self.times[lo:hi]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, index: ItemIndex) -> tuple["SessionData", int]:
        """Encode a `SessionId ItemId Time` frame; events on unknown items are dropped and counted.

        Sessions keep their order of first appearance; events inside a session are sorted by time with the
        frame's row order as tie-break (stable sort).
        """
        lookup = index.lookup
        frame = frame.with_row_index("_row").with_columns(
            pl.col("ItemId").cast(pl.String).replace_strict(lookup, default=-1, return_dtype=pl.Int64).alias("_item"),
            pl.col("SessionId").cast(pl.String),
        )
        n_unknown = int((frame["_item"] < 0).sum())
        frame = frame.filter(pl.col("_item") >= 0)
        first_seen = frame.group_by("SessionId", maintain_order=True).agg(pl.col("_row").min().alias("_first"))
        frame = frame.join(first_seen, on="SessionId").sort(["_first", "Time", "_row"])
        sessions = frame.group_by("SessionId", maintain_order=True).len()
        offsets = np.zeros(len(sessions) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(sessions["len"].to_numpy())
        data = cls(
            session_ids=np.asarray(sessions["SessionId"].to_list(), dtype=object),
            offsets=offsets,
            items=frame["_item"].to_numpy().astype(np.int64),
            times=frame["Time"].cast(pl.Float64).to_numpy(),
            n_items=len(index),
        )
        return data, n_unknown


def read_split_tsv(path: Path) -> pl.DataFrame:
    """Read a `SessionId ItemId Time` file (header optional, as in the two YOOCHOOSE slices) with ids as strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    with path.open("rb") as handle:
        first = handle.readline().decode("utf-8", errors="replace").strip().split("\t")
    has_header = first[:3] == list(SPLIT_COLUMNS)
    if not has_header and len(first) != 3:
        raise ValueError(
            f"{path}: expected 3 tab-separated columns SessionId, ItemId, Time; the first line has {len(first)}"
        )
    frame = pl.read_csv(
        path,
        separator="\t",
        has_header=has_header,
        new_columns=list(SPLIT_COLUMNS),
        schema_overrides={"SessionId": pl.String, "ItemId": pl.String, "Time": pl.Float64},
    )
    if frame.null_count().sum_horizontal().item() > 0:
        raise ValueError(f"{path}: empty SessionId, ItemId or Time values; re-create the split")
    return frame.select(SPLIT_COLUMNS)
