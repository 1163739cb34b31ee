"""The exact next-item evaluation every model is measured with, and the validation split carved from training.

Protocol
--------
* For every test session ``s`` of length ``L`` and every position ``1 <= t < L``, the prefix ``s[:t]`` (with the
  time of its last event, ``time[t-1]``) predicts the item ``s[t]``. A session of length 1 yields no prediction.
* The target is ranked against the **whole catalogue** of the model's `ItemIndex`: no sampled negatives.
* Ties are counted pessimistically: ``rank = 1 + #{other items j : score_j >= score_target}``. A constant scorer
  therefore ranks every target last (``rank = n_items``) instead of getting credit for an arbitrary sort order.
* NaN scores are treated as ``-inf`` (a model that emits NaN for an item never ranks it above anything; a NaN
  target ranks last).
* Items of the prefix are **not** removed from the ranking: repeat clicks are genuine next items in these data.
* Test events on items unknown to the training index are removed before evaluation and counted by the caller
  (`SessionData.from_frame` reports how many).

Metrics (``K`` in `KS`): ``recall@K`` (= HR@K, one relevant item), ``mrr@K`` (``1/rank`` if ``rank <= K`` else 0),
``ndcg@K`` (``1/log2(rank + 1)`` if ``rank <= K`` else 0), each averaged over all predictions;
``coverage@20`` (distinct items over all top-20 lists / catalogue size) and ``popularity_bias@20`` (mean over
lists of the mean training popularity of the listed items, popularity being the item's training event count
divided by the largest item count, as session-rec's ``Popularity`` metric). Top-20 *lists* break ties by the lower
item index, so they are deterministic; ranks never depend on tie order. ``by_prefix_length`` and
``by_session_length`` break ``recall@20`` / ``mrr@20`` down by the length of the prefix and of the (encoded) test
session. ``n_predictions`` counts the prefixes; ``predict_seconds`` is the time spent inside ``model.score``.

Why batched: scores are computed for `batch_size` prefixes at a time and ranks are vectorised over that
``batch x catalogue`` matrix, which is the largest array the evaluation ever holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from sessionrec.ops.models.base import Prefixes, SessionModel
from sessionrec.ops.sessiondata import SessionData

KS: tuple[int, ...] = (1, 5, 10, 20)
LIST_LENGTH = 20
#: (label, smallest, largest) length buckets of the breakdowns; ``None`` = unbounded.
PREFIX_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("1", 1, 1),
    ("2", 2, 2),
    ("3", 3, 3),
    ("4-5", 4, 5),
    ("6-10", 6, 10),
    ("11+", 11, None),
)
SESSION_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("2", 2, 2),
    ("3", 3, 3),
    ("4-5", 4, 5),
    ("6-10", 6, 10),
    ("11-20", 11, 20),
    ("21+", 21, None),
)


@dataclass(frozen=True)
class PrefixBatch:
    """Prefixes to score and what to score them against."""

    prefixes: Prefixes
    targets: np.ndarray  # item index of the true next item
    prefix_lengths: np.ndarray
    session_lengths: np.ndarray


def prediction_points(data: SessionData) -> tuple[np.ndarray, np.ndarray]:
    """(session index, prefix length t) of every next-item prediction, in session order."""
    per_session = np.maximum(data.lengths() - 1, 0)
    sessions = np.repeat(np.arange(data.n_sessions), per_session)
    starts = np.cumsum(per_session) - per_session
    lengths = np.arange(len(sessions)) - np.repeat(starts, per_session) + 1
    return sessions, lengths


def iter_prefix_batches(data: SessionData, batch_size: int = 512) -> Iterator[PrefixBatch]:
    """All prediction points of ``data`` as batches of at most ``batch_size`` prefixes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sessions, lengths = prediction_points(data)
    session_lengths = data.lengths()
    for lo in range(0, len(sessions), batch_size):
        s, t = sessions[lo : lo + batch_size], lengths[lo : lo + batch_size]
        starts = data.offsets[s]
        yield PrefixBatch(
            prefixes=Prefixes(
                items=[data.items[a : a + n] for a, n in zip(starts.tolist(), t.tolist())],
                times=data.times[starts + t - 1],
            ),
            targets=data.items[starts + t],
            prefix_lengths=t,
            session_lengths=session_lengths[s],
        )


def _finite(scores: np.ndarray) -> np.ndarray:
    """NaN -> -inf, without copying when there is no NaN."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (batch, n_items) matrix, got shape {scores.shape}")
    nan = np.isnan(scores)
    return np.where(nan, -np.inf, scores) if nan.any() else scores


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Pessimistic 1-based rank of each row's target among all items of the row (see module docstring)."""
    scores = _finite(scores)
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"need one target per score row: {scores.shape[0]} rows, targets {targets.shape}")
    if len(targets) and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"target item indices must lie in [0, {scores.shape[1]})")
    target_scores = scores[np.arange(len(targets)), targets]
    # The target itself satisfies ">=" (also at -inf), so the count is 1 + the other items at or above it.
    return (scores >= target_scores[:, None]).sum(axis=1).astype(np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@K, mrr@K and ndcg@K averaged over ``ranks``; all 0.0 when there are no ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        if len(ranks) == 0:
            out[f"recall@{k}"] = out[f"mrr@{k}"] = out[f"ndcg@{k}"] = 0.0
            continue
        out[f"recall@{k}"] = float(hit.mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / ranks, 0.0).mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's ``k`` best items, best first; ties go to the lower item index (deterministic)."""
    scores = _finite(scores)
    n_rows, n_items = scores.shape
    k = min(k, n_items)
    if k <= 0 or n_rows == 0:
        return np.zeros((n_rows, 0), dtype=np.int64)
    kth = np.partition(scores, n_items - k, axis=1)[:, n_items - k][:, None]
    above = scores > kth
    ties = scores == kth
    needed = k - above.sum(axis=1, keepdims=True)
    chosen = above | (ties & (np.cumsum(ties, axis=1, dtype=np.int32) <= needed))
    columns = np.nonzero(chosen)[1].reshape(n_rows, k)  # row-major: ascending item index within a row
    order = np.argsort(-np.take_along_axis(scores, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)


def _breakdown(
    lengths: np.ndarray, ranks: np.ndarray, buckets: tuple[tuple[str, int, int | None], ...]
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, lo, hi in buckets:
        mask = (lengths >= lo) & (lengths <= (hi if hi is not None else np.iinfo(np.int64).max))
        metrics = metrics_from_ranks(ranks[mask], (LIST_LENGTH,))
        out[label] = {
            "n": int(mask.sum()),
            f"recall@{LIST_LENGTH}": metrics[f"recall@{LIST_LENGTH}"],
            f"mrr@{LIST_LENGTH}": metrics[f"mrr@{LIST_LENGTH}"],
        }
    return out


def item_popularity(train: SessionData) -> np.ndarray:
    """Training event count of every catalogue item."""
    return np.bincount(train.items, minlength=train.n_items).astype(np.float64)


def evaluate(
    model: SessionModel,
    test: SessionData,
    train: SessionData,
    *,
    ks: Sequence[int] = KS,
    batch_size: int = 512,
) -> dict:
    """Run the protocol of the module docstring for a fitted ``model``; ``train`` only supplies item popularity.

    Returns a JSON-ready dict: ``n_predictions``, ``n_sessions``, the metrics, ``coverage@20``,
    ``popularity_bias@20``, ``by_prefix_length``, ``by_session_length`` and ``predict_seconds`` (time spent
    inside ``model.score``).
    """
    if test.n_items != train.n_items:
        raise ValueError(
            f"test is encoded with a catalogue of {test.n_items} items but train with {train.n_items}: "
            "encode both with the ItemIndex the model was trained on"
        )
    popularity = item_popularity(train)
    popularity = popularity / popularity.max() if len(popularity) and popularity.max() > 0 else popularity
    recommended = np.zeros(test.n_items, dtype=bool)
    ranks, prefix_lengths, session_lengths = [], [], []
    popularity_sum, predict_seconds = 0.0, 0.0
    for batch in iter_prefix_batches(test, batch_size):
        started = time.perf_counter()
        scores = model.score(batch.prefixes)
        predict_seconds += time.perf_counter() - started
        if scores.shape != (len(batch.targets), test.n_items):
            raise ValueError(
                f"{type(model).__name__}.score returned shape {scores.shape}, "
                f"expected {(len(batch.targets), test.n_items)}"
            )
        ranks.append(ranks_from_scores(scores, batch.targets))
        lists = top_k(scores, LIST_LENGTH)
        recommended[lists.ravel()] = True
        if lists.shape[1]:
            popularity_sum += float(popularity[lists].mean(axis=1).sum())
        prefix_lengths.append(batch.prefix_lengths)
        session_lengths.append(batch.session_lengths)
    all_ranks = np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
    prefix_len = np.concatenate(prefix_lengths) if prefix_lengths else np.zeros(0, dtype=np.int64)
    session_len = np.concatenate(session_lengths) if session_lengths else np.zeros(0, dtype=np.int64)
    n = len(all_ranks)
    return {
        "n_predictions": n,
        "n_sessions": int((test.lengths() >= 2).sum()),
        **metrics_from_ranks(all_ranks, ks),
        f"coverage@{LIST_LENGTH}": float(recommended.sum() / test.n_items) if test.n_items else 0.0,
        f"popularity_bias@{LIST_LENGTH}": popularity_sum / n if n else 0.0,
        "by_prefix_length": _breakdown(prefix_len, all_ranks, PREFIX_BUCKETS),
        "by_session_length": _breakdown(session_len, all_ranks, SESSION_BUCKETS),
        "predict_seconds": predict_seconds,
    }


def _subset(data: SessionData, sessions: np.ndarray, keep_event: np.ndarray | None = None) -> SessionData:
    """The given sessions (in that order), optionally only their events where ``keep_event`` is True."""
    lengths = data.lengths()[sessions]
    starts = data.offsets[sessions] - np.cumsum(lengths) + lengths
    event_idx = np.repeat(starts, lengths) + np.arange(lengths.sum())
    if keep_event is not None:
        kept = keep_event[event_idx]
        lengths = np.bincount(np.repeat(np.arange(len(sessions)), lengths)[kept], minlength=len(sessions))
        event_idx = event_idx[kept]
    offsets = np.zeros(len(sessions) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    return SessionData(
        session_ids=data.session_ids[sessions],
        offsets=offsets,
        items=data.items[event_idx],
        times=data.times[event_idx],
        n_items=data.n_items,
    )


def carve_validation(train: SessionData, days: float = 1.0) -> tuple[SessionData, SessionData]:
    """Split ``train`` by time into (``train_tr``, ``valid``) exactly as the test split was made.

    ``valid`` = the sessions that *end* in the last ``days`` days, restricted to items that occur in ``train_tr``
    and to sessions still of length >= 2 afterwards; ``train_tr`` = all other sessions. Both keep the catalogue
    (``n_items``) of ``train`` so that models fitted on ``train_tr`` score the same item indices. Tuning and early
    stopping use this split, never the test split.
    """
    if days <= 0:
        raise ValueError(f"validation days must be positive, got {days}")
    non_empty = np.flatnonzero(train.lengths() > 0)
    if len(non_empty) == 0:
        return train, _subset(train, non_empty)
    ends = np.maximum.reduceat(train.times, train.offsets[non_empty])
    late = ends > ends.max() - days * 86_400.0
    train_tr = _subset(train, non_empty[~late])
    known = np.zeros(train.n_items, dtype=bool)
    known[train_tr.items] = True
    valid = _subset(train, non_empty[late], keep_event=known[train.items])
    valid = _subset(valid, np.flatnonzero(valid.lengths() >= 2))
    return train_tr, valid
