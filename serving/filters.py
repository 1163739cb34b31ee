"""Business rules: which items may be served at all, and which a given request asks to leave out.

Two layers, because they change at different speeds:

* `ItemTable` holds the business's facts by item *id* (blocklist, availability, category, popularity), read from
  files now and from the feature store once it exists. It knows items the model has never seen, so that a session
  of unknown items still has a category for the category-popularity fallback.
* `IndexedRules` is that table projected onto one model's `ItemIndex` as numpy arrays (computed once per loaded
  model), so that a request filters a few hundred candidates with vectorised lookups instead of dict lookups.

Filters are applied to candidates and to the popularity backfill alike: whatever path produced an item, a blocked,
unavailable, excluded or out-of-category item never reaches a response.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sessionrec.ops.errors import SessionrecError
from sessionrec.ops.sessiondata import ItemIndex

#: Columns the item table may carry besides ``item_id``; any subset is fine.
ITEM_TABLE_COLUMNS = ("available", "category", "popularity")
#: Popularity-ordered items inspected per step while backfilling under restrictive filters.
_BACKFILL_CHUNK = 4096


class ItemRulesError(SessionrecError):
    """A blocklist or item table that cannot be used; the message names the file and what to fix."""


@dataclass(frozen=True)
class ItemTable:
    """Facts about items by id. Empty mappings mean "not known": every item available, no category."""

    blocked: frozenset[str] = frozenset()
    available: dict[str, bool] = field(default_factory=dict)
    category: dict[str, str] = field(default_factory=dict)
    popularity: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, blocklist_path: Path | None, item_table_path: Path | None) -> "ItemTable":
        """Read the blocklist (one item id per line, ``#`` comments) and the item table (Parquet or CSV with
        ``item_id`` and any of `ITEM_TABLE_COLUMNS`)."""
        blocked = _read_blocklist(Path(blocklist_path)) if blocklist_path else frozenset()
        if item_table_path is None:
            return cls(blocked=blocked)
        return cls(blocked=blocked, **_read_item_table(Path(item_table_path)))

    def category_of(self, item_id: str) -> str | None:
        return self.category.get(item_id)

    def project(self, items: ItemIndex, model_popularity: np.ndarray) -> "IndexedRules":
        """These rules as arrays over ``items``; ``model_popularity`` ranks items the table has no popularity for
        (the whole catalogue when the table has none)."""
        ids = items.item_ids.tolist()
        forbidden = np.fromiter(
            ((item in self.blocked) or not self.available.get(item, True) for item in ids),
            dtype=bool,
            count=len(ids),
        )
        names = sorted(set(self.category.values()))
        codes = {name: code for code, name in enumerate(names)}
        category = np.fromiter(
            (codes.get(self.category.get(item, ""), -1) for item in ids), dtype=np.int32, count=len(ids)
        )
        popularity = np.asarray(model_popularity, dtype=np.float64)
        if self.popularity:
            known = np.fromiter((item in self.popularity for item in ids), dtype=bool, count=len(ids))
            table = np.fromiter((self.popularity.get(item, 0.0) for item in ids), dtype=np.float64, count=len(ids))
            # Items with a table value rank above the others; the model's popularity orders the rest.
            floor = table[known].min() if known.any() else 0.0
            popularity = np.where(known, table, floor - 2.0 + _unit_scale(popularity))
        # Stable sort: equal popularity keeps index order, so that answers are deterministic.
        order = np.argsort(-popularity, kind="stable")
        return IndexedRules(
            forbidden=forbidden,
            category=category,
            category_codes=codes,
            popularity=popularity,
            popular_order=order[~forbidden[order]],
        )


def _unit_scale(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min() if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def _read_blocklist(path: Path) -> frozenset[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ItemRulesError(f"cannot read the blocklist {path}: {exc}; fix serving.blocklist_path") from exc
    return frozenset(s for line in lines if (s := line.split("#", 1)[0].strip()))


def _read_item_table(path: Path) -> dict[str, dict]:
    import polars as pl

    try:
        if path.suffix == ".parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_csv(path, infer_schema_length=10_000)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ItemRulesError(f"cannot read the item table {path}: {exc}; it must be Parquet or CSV") from exc
    if "item_id" not in frame.columns:
        raise ItemRulesError(f"item table {path} has no item_id column (columns: {frame.columns})")
    present = [c for c in ITEM_TABLE_COLUMNS if c in frame.columns]
    if not present:
        raise ItemRulesError(f"item table {path} has none of the columns {ITEM_TABLE_COLUMNS}; nothing to apply")
    frame = frame.with_columns(pl.col("item_id").cast(pl.String))
    if frame["item_id"].null_count() or frame["item_id"].is_duplicated().any():
        raise ItemRulesError(f"item table {path}: item_id must be present and unique on every row")
    out: dict[str, dict] = {}
    try:
        if "available" in present:
            column = frame["available"].cast(pl.Boolean)
            if column.null_count():
                raise ItemRulesError(f"item table {path}: 'available' must be true/false on every row")
            out["available"] = dict(zip(frame["item_id"].to_list(), column.to_list()))
        if "category" in present:
            rows = frame.filter(pl.col("category").is_not_null())
            out["category"] = dict(zip(rows["item_id"].to_list(), rows["category"].cast(pl.String).to_list()))
        if "popularity" in present:
            rows = frame.filter(pl.col("popularity").is_not_null())
            out["popularity"] = dict(zip(rows["item_id"].to_list(), rows["popularity"].cast(pl.Float64).to_list()))
    except pl.exceptions.PolarsError as exc:
        raise ItemRulesError(f"item table {path}: a column has the wrong type ({exc})") from exc
    return out


@dataclass(frozen=True)
class IndexedRules:
    """An `ItemTable` over one model's item indices."""

    forbidden: np.ndarray  # bool per item: blocked or unavailable
    category: np.ndarray  # int32 code per item, -1 when unknown
    category_codes: dict[str, int]
    popularity: np.ndarray  # float64 per item, higher = more popular
    popular_order: np.ndarray  # item indices, most popular first, forbidden ones left out

    def request_filter(
        self,
        excluded: np.ndarray,
        include_categories: Collection[str] = (),
        exclude_categories: Collection[str] = (),
    ) -> "RequestFilter":
        """The filter of one request; ``excluded`` are item indices it must not get (asked, or already seen)."""
        include = None
        if include_categories:
            include = np.asarray([self.category_codes[c] for c in include_categories if c in self.category_codes])
        exclude = np.asarray([self.category_codes[c] for c in exclude_categories if c in self.category_codes])
        return RequestFilter(self, np.unique(np.asarray(excluded, dtype=np.int64)), include, exclude)

    def category_popular(self, category: str | None) -> np.ndarray:
        """Servable items of ``category`` by popularity (empty when the category is unknown to this model)."""
        code = self.category_codes.get(category) if category is not None else None
        if code is None:
            return np.zeros(0, dtype=np.int64)
        return self.popular_order[self.category[self.popular_order] == code]


@dataclass(frozen=True)
class RequestFilter:
    rules: IndexedRules
    excluded: np.ndarray  # sorted unique item indices
    include: np.ndarray | None  # category codes, None = any category
    exclude: np.ndarray  # category codes

    def allowed(self, items: np.ndarray) -> np.ndarray:
        """Boolean mask over ``items`` (item indices): may each of them be served to this request?"""
        ok = ~self.rules.forbidden[items]
        if len(self.excluded):  # sorted: a binary search per item (np.isin costs more for a few hundred items)
            at = np.minimum(np.searchsorted(self.excluded, items), len(self.excluded) - 1)
            ok &= self.excluded[at] != items
        if self.include is not None:
            ok &= np.isin(self.rules.category[items], self.include)
        if len(self.exclude):
            ok &= ~np.isin(self.rules.category[items], self.exclude)
        return ok

    def take_popular(self, order: np.ndarray, n: int, taken: np.ndarray) -> np.ndarray:
        """Up to ``n`` allowed items from ``order`` (most popular first) that are not in ``taken``."""
        picked: list[np.ndarray] = []
        have = 0
        for lo in range(0, len(order), _BACKFILL_CHUNK):
            chunk = order[lo : lo + _BACKFILL_CHUNK]
            chunk = chunk[self.allowed(chunk) & ~np.isin(chunk, taken)]
            picked.append(chunk[: n - have])
            have += len(picked[-1])
            if have >= n:
                break
        return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
