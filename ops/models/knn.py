"""Session-based nearest neighbours: SKNN, V-SKNN, STAN and VSTAN.

The four share one procedure (Ludewig & Jannach 2018; Garg et al., SIGIR 2019; Ludewig et al. 2021, and the
reference code of session-rec, ``algorithms/knn``), and differ only in the weights plugged into it:

1. *Candidates*: every training session that shares at least one item with the prefix (an inverted index
   item -> sessions); when there are more than ``sample_size`` of them, only the ``sample_size`` most recent ones
   (by the time of their last event) are kept.
2. *Similarity* of each candidate to the prefix; the ``k`` most similar candidates with a positive similarity are
   the neighbours.
3. *Scores*: every item of a neighbour gets the neighbour's weight (similarity times a neighbour factor) times an
   item factor; the item's score is the sum over neighbours.

=========  ===========================================  ==========================  ============================
model      similarity (prefix item weights w)            neighbour factor            item factor
=========  ===========================================  ==========================  ============================
SKNN       cosine or Jaccard of the item sets            1                           1
V-SKNN     sum of w over shared items / #prefix items,   decay of the position of    1 + idf_weighting * idf
           w = decay of the item's position in the        the most recent prefix item
           prefix ("weighting")                          in the neighbour
           ("weighting_score")
STAN       weighted cosine, w = exp((p - L)/l_spw),      1                           exp(-|p_n(i) - p_n(*)|/l_inh)
           times exp(-age of neighbour / l_snh days)
VSTAN      as STAN                                       exp((p* - L)/l_ipw)         STAN's times
                                                                                     1 + l_idf * idf
=========  ===========================================  ==========================  ============================

``p`` is the 1-based position of an item's *last* occurrence in the prefix of length ``L`` (repeats count as
positions); ``p_n(i)`` the position of item i's last occurrence in the neighbour; ``p_n(*)`` the last position in
the neighbour of any prefix item; ``p*`` the last prefix position of an item the neighbour contains; the
neighbour's age is the prefix time minus the neighbour's last event time; ``idf = log(#sessions / #events of the
item)``.

Deliberate differences to session-rec, none of which changes a ranking under the published tuned parameters:
ties between equally similar candidates are broken by recency (session-rec: by Python set order); the "linear"
decays are clipped at 0 (session-rec lets them go negative); the dwell-time, "extend" (adding test sessions to the
index while evaluating) and reminder options are not implemented. SKNN's cosine is the textbook one (session-rec's
differs by a constant factor per prefix, which does not change the neighbours or the ranking).

Implementation: the whole batch is processed with flat numpy arrays. (prefix row, prefix item) pairs are expanded
through the inverted index into (row, candidate session) triples, grouped by one sort, reduced with ``reduceat``
(weighted overlap, overlap count, last shared positions), sampled and cut to the top ``k`` by one more sort, and
the neighbours' items are summed into the dense score matrix with ``bincount``.
"""

from __future__ import annotations

import dataclasses
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from sessionrec.ops.models.base import FitReport, Prefixes, SessionModel
from sessionrec.ops.models.registry import ModelError, read_state, write_state
from sessionrec.ops.sessiondata import SessionData

Decay = Literal["same", "div", "linear", "quadratic", "log"]

#: Score cells (rows x items) accumulated at once; bounds the float64 work array (~32 MB).
_CHUNK_CELLS = 4_000_000
_DAY = 86_400.0


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every (s, c): a CSR gather without a Python loop."""
    ends = np.cumsum(counts)
    return np.repeat(starts - ends + counts, counts) + np.arange(ends[-1] if len(ends) else 0)


def _position_weight(decay: str, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """V-SKNN's weight of a prefix item at 1-based ``positions`` in a prefix of ``lengths`` (recent = high)."""
    p, n = positions.astype(np.float64), lengths.astype(np.float64)
    if decay == "same":
        return np.ones_like(p)
    if decay == "div":
        return p / n
    if decay == "linear":
        return np.maximum(0.0, 1.0 - 0.1 * (n - p))
    if decay == "quadratic":
        return (p / n) ** 2
    return 1.0 / np.log10(n - p + 1.7)


def _step_weight(decay: str, steps: np.ndarray) -> np.ndarray:
    """V-SKNN's neighbour factor for the most recent shared prefix item ``steps`` back (1 = the last item)."""
    s = steps.astype(np.float64)
    if decay == "same":
        return np.ones_like(s)
    if decay == "div":
        return 1.0 / s
    if decay == "linear":
        return np.maximum(0.0, 1.0 - 0.1 * s)
    if decay == "quadratic":
        return 1.0 / s**2
    return 1.0 / np.log10(s + 1.7)


@dataclass(frozen=True)
class Candidates:
    """Candidate neighbours of a batch of prefixes, one entry per (prefix row, training session)."""

    row: np.ndarray
    session: np.ndarray  # recency rank of the training session (0 = most recent)
    weighted_overlap: np.ndarray  # sum of the prefix weights of the shared items
    overlap: np.ndarray  # number of shared distinct items
    last_prefix_position: np.ndarray  # p*: last prefix position of a shared item
    last_neighbour_position: np.ndarray  # p_n(*): last neighbour position of a shared item
    prefix_length: np.ndarray  # per row
    prefix_distinct: np.ndarray  # per row
    prefix_norm2: np.ndarray  # per row: sum of squared prefix weights over distinct items
    prefix_time: np.ndarray  # per row
    session_distinct: np.ndarray  # per training session
    session_end: np.ndarray  # per training session


class SessionKNN(SessionModel):
    """The shared procedure of the module docstring; subclasses supply the weights."""

    config_class: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()
        self._index: dict[str, np.ndarray] | None = None

    # -- weights: the only thing the four models disagree on -------------------------------------------------
    def _prefix_weights(self, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return np.ones(len(positions))

    @abstractmethod
    def _similarity(self, c: Candidates) -> np.ndarray:
        """Similarity of every candidate to its prefix."""

    def _neighbour_factor(self, c: Candidates) -> np.ndarray | None:
        return None

    def _item_factor(self, positions: np.ndarray, anchors: np.ndarray) -> np.ndarray | None:
        """Weight of a neighbour's item at ``positions`` given the neighbour's ``anchors`` p_n(*)."""
        return None

    def _idf_strength(self) -> float:
        return 0.0

    # -- fitting -------------------------------------------------------------------------------------------------
    def fit(self, train: SessionData, valid: SessionData | None = None) -> FitReport:
        """Build the indexes; ``valid`` is not needed (no training loop)."""
        started = time.perf_counter()
        self._index = _build_index(train)
        return FitReport(train_seconds=time.perf_counter() - started)

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def save(self, directory: Path) -> None:
        write_state(directory, self.config, self._fitted())

    @classmethod
    def load(cls, directory: Path) -> "SessionKNN":
        config, arrays = read_state(directory, cls.name, cls.config_class)
        model = cls(config)
        model._index = arrays
        return model

    def _fitted(self) -> dict[str, np.ndarray]:
        if self._index is None:
            raise ModelError(f"{self.name} is not fitted: call fit() or load a saved model")
        return self._index

    # -- scoring -------------------------------------------------------------------------------------------------
    def score(self, prefixes: Prefixes) -> np.ndarray:
        n_items = int(self._fitted()["item_events"].shape[0])
        out = np.zeros((len(prefixes), n_items), dtype=np.float32)
        step = max(1, _CHUNK_CELLS // max(n_items, 1))
        for lo in range(0, len(prefixes), step):
            hi = min(lo + step, len(prefixes))
            out[lo:hi] = self._score_rows(prefixes.items[lo:hi], np.asarray(prefixes.times[lo:hi], np.float64))
        return out

    def _neighbours(
        self, items: list[np.ndarray], times: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row, session recency rank, weight, p_n(*)) of the selected neighbours of each prefix."""
        index = self._fitted()
        n_items, n_sessions = int(index["item_events"].shape[0]), int(index["session_end"].shape[0])
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
        lengths = np.fromiter((len(p) for p in items), dtype=np.int64, count=len(items))
        if lengths.sum() == 0 or n_sessions == 0:
            return empty
        flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in items])
        if flat.min() < 0 or flat.max() >= n_items:
            raise ModelError(f"{self.name}: prefix item indices must lie in the catalogue [0, {n_items})")
        row = np.repeat(np.arange(len(items)), lengths)
        position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1

        # Distinct items of each prefix with the position of their last occurrence.
        key = row * n_items + flat
        order = np.lexsort((position, key))
        last = np.append(key[order][1:] != key[order][:-1], True)
        q_row, q_item, q_pos = row[order][last], flat[order][last], position[order][last]
        q_weight = self._prefix_weights(q_pos, lengths[q_row])

        # Expand through the inverted index and group by (row, session).
        counts = index["item_offsets"][q_item + 1] - index["item_offsets"][q_item]
        if counts.sum() == 0:
            return empty
        src = _ranges(index["item_offsets"][q_item], counts)
        pair = np.repeat(q_row, counts) * n_sessions + index["item_sessions"][src]
        order = np.argsort(pair, kind="stable")
        pair = pair[order]
        starts = np.flatnonzero(np.append(True, pair[1:] != pair[:-1]))
        g_row, g_session = pair[starts] // n_sessions, pair[starts] % n_sessions
        if self.config.sample_size > 0:  # keep the most recent candidates: sessions are numbered by recency
            keep = np.arange(len(starts)) - np.searchsorted(g_row, g_row) < self.config.sample_size
        else:
            keep = np.ones(len(starts), dtype=bool)
        reduce_add = np.add.reduceat(np.repeat(q_weight, counts)[order], starts)
        candidates = Candidates(
            row=g_row[keep],
            session=g_session[keep],
            weighted_overlap=reduce_add[keep],
            overlap=np.diff(np.append(starts, len(pair)))[keep],
            last_prefix_position=np.maximum.reduceat(np.repeat(q_pos, counts)[order], starts)[keep],
            last_neighbour_position=np.maximum.reduceat(index["item_positions"][src][order], starts)[keep],
            prefix_length=lengths,
            prefix_distinct=np.bincount(q_row, minlength=len(items)),
            prefix_norm2=np.bincount(q_row, weights=q_weight**2, minlength=len(items)),
            prefix_time=times,
            session_distinct=np.diff(index["session_offsets"]),
            session_end=index["session_end"],
        )
        similarity = self._similarity(candidates)
        positive = similarity > 0
        row_, session_, similarity = candidates.row[positive], candidates.session[positive], similarity[positive]
        top = np.lexsort((session_, -similarity, row_))  # best first; equal similarity: more recent first
        top = top[np.arange(len(top)) - np.searchsorted(row_[top], row_[top]) < self.config.k]
        factor = self._neighbour_factor(candidates)
        weight = similarity[top] * (factor[positive][top] if factor is not None else 1.0)
        anchors = candidates.last_neighbour_position[positive][top]
        return row_[top], session_[top], weight, anchors

    def _score_rows(self, items: list[np.ndarray], times: np.ndarray) -> np.ndarray:
        index = self._fitted()
        n_items = int(index["item_events"].shape[0])
        row, session, weight, anchors = self._neighbours(items, times)
        counts = index["session_offsets"][session + 1] - index["session_offsets"][session]
        src = _ranges(index["session_offsets"][session], counts)
        item = index["session_items"][src]
        value = np.repeat(weight, counts)
        item_factor = self._item_factor(index["session_positions"][src], np.repeat(anchors, counts))
        if item_factor is not None:
            value = value * item_factor
        strength = self._idf_strength()
        if strength:
            value = value * (1.0 + strength * index["idf"][item])
        flat = np.repeat(row, counts) * n_items + item
        return np.bincount(flat, weights=value, minlength=len(items) * n_items).reshape(len(items), n_items)


def _build_index(train: SessionData) -> dict[str, np.ndarray]:
    """Distinct items per session with their last position, and the inverted index item -> sessions.

    Sessions are renumbered by recency (0 = latest last event; ties by input order), so that "the most recent
    candidates" are simply the lowest numbers.
    """
    n_items = train.n_items
    lengths = train.lengths()
    present = np.flatnonzero(lengths > 0)
    ends = np.maximum.reduceat(train.times, train.offsets[present]) if len(present) else np.zeros(0)
    by_recency = np.lexsort((present, -ends))
    rank = np.full(train.n_sessions, -1, dtype=np.int64)
    rank[present[by_recency]] = np.arange(len(present))
    event_rank = np.repeat(rank, lengths)
    position = np.arange(train.n_events) - np.repeat(train.offsets[:-1], lengths) + 1
    key = event_rank * n_items + train.items
    order = np.lexsort((position, key))
    last = np.append(key[order][1:] != key[order][:-1], True) if len(order) else np.zeros(0, dtype=bool)
    u_key, u_pos = key[order][last], position[order][last]
    u_session, u_item = u_key // max(n_items, 1), u_key % max(n_items, 1)
    by_item = np.argsort(u_item, kind="stable")  # keeps sessions in recency order within an item
    item_events = np.bincount(train.items, minlength=n_items)
    with np.errstate(divide="ignore"):
        idf = np.where(item_events > 0, np.log(len(present) / np.maximum(item_events, 1)), 0.0)
    return {
        "session_end": ends[by_recency],
        "session_offsets": np.append(0, np.cumsum(np.bincount(u_session, minlength=len(present)))),
        "session_items": u_item,
        "session_positions": u_pos,
        "item_offsets": np.append(0, np.cumsum(np.bincount(u_item, minlength=n_items))),
        "item_sessions": u_session[by_item],
        "item_positions": u_pos[by_item],
        "item_events": item_events,
        "idf": idf,
    }


def _positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be positive, got {value}")


def _neighbourhood(k: int, sample_size: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if sample_size < 0:
        raise ValueError(f"sample_size must be >= 0 (0 = all candidates), got {sample_size}")


@dataclass(frozen=True)
class SKNNConfig:
    """Defaults: session-rec's tuned SKNN for rsc15 (conf/save/rsc15/window/window_rsc15_baselines.yml)."""

    k: int = 500
    sample_size: int = 10_000
    similarity: Literal["cosine", "jaccard"] = "jaccard"

    def __post_init__(self) -> None:
        _neighbourhood(self.k, self.sample_size)


class SKNN(SessionKNN):
    name = "sknn"
    config_class = SKNNConfig

    def _similarity(self, c: Candidates) -> np.ndarray:
        mine, theirs = c.prefix_distinct[c.row], c.session_distinct[c.session]
        if self.config.similarity == "jaccard":
            return c.overlap / (mine + theirs - c.overlap)
        return c.overlap / np.sqrt(mine * theirs)


@dataclass(frozen=True)
class VSKNNConfig:
    """Defaults: session-rec's V-SKNN for its rsc15-100k sample (conf/example_next.yml)."""

    k: int = 500
    sample_size: int = 5000
    weighting: Decay = "quadratic"
    weighting_score: Decay = "div"
    idf_weighting: float = 5.0  # 0 = off
    similarity: Literal["cosine", "vec"] = "cosine"  # weighted cosine, or weighted overlap / #prefix items

    def __post_init__(self) -> None:
        _neighbourhood(self.k, self.sample_size)
        if self.idf_weighting < 0:
            raise ValueError(f"idf_weighting must be >= 0, got {self.idf_weighting}")


class VSKNN(SessionKNN):
    name = "vsknn"
    config_class = VSKNNConfig

    def _prefix_weights(self, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return _position_weight(self.config.weighting, positions, lengths)

    def _similarity(self, c: Candidates) -> np.ndarray:
        if self.config.similarity == "vec":
            return c.weighted_overlap / c.prefix_distinct[c.row]
        return c.weighted_overlap / np.sqrt(c.prefix_norm2[c.row] * c.session_distinct[c.session])

    def _neighbour_factor(self, c: Candidates) -> np.ndarray:
        steps = c.prefix_length[c.row] - c.last_prefix_position + 1
        return _step_weight(self.config.weighting_score, steps)

    def _idf_strength(self) -> float:
        return self.config.idf_weighting


@dataclass(frozen=True)
class STANConfig:
    """Defaults: session-rec's tuned "stan-hr" for rsc15 (conf/save/rsc15/window/window_rsc15_stan.yml)."""

    k: int = 1000
    sample_size: int = 10_000
    lambda_spw: float = 0.5  # prefix position decay, in positions (tiny = only the last item counts)
    lambda_snh: float = 20.0  # neighbour recency decay, in days
    lambda_inh: float = 0.5  # decay of a neighbour's items by their distance to the shared item, in positions

    def __post_init__(self) -> None:
        _neighbourhood(self.k, self.sample_size)
        _positive(lambda_spw=self.lambda_spw, lambda_snh=self.lambda_snh, lambda_inh=self.lambda_inh)


class STAN(SessionKNN):
    name = "stan"
    config_class = STANConfig

    def _prefix_weights(self, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return np.exp((positions - lengths) / self.config.lambda_spw)

    def _similarity(self, c: Candidates) -> np.ndarray:
        cosine = c.weighted_overlap / np.sqrt(c.prefix_norm2[c.row] * c.session_distinct[c.session])
        age = c.prefix_time[c.row] - c.session_end[c.session]
        return cosine * np.exp(-age / (self.config.lambda_snh * _DAY))

    def _item_factor(self, positions: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        return np.exp(-np.abs(positions - anchors) / self.config.lambda_inh)


@dataclass(frozen=True)
class VSTANConfig(STANConfig):
    """Defaults: session-rec's tuned "vstan-hr" for rsc15 (conf/save/rsc15/single/single_rsc15_vstan.yml)."""

    k: int = 2000
    sample_size: int = 2500
    lambda_spw: float = 8.0
    lambda_snh: float = 10.0
    lambda_inh: float = 8.0
    lambda_ipw: float = 0.5  # neighbour decay by how far back in the prefix the shared item lies, in positions
    lambda_idf: float = 2.0  # 0 = off

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(lambda_ipw=self.lambda_ipw)
        if self.lambda_idf < 0:
            raise ValueError(f"lambda_idf must be >= 0, got {self.lambda_idf}")


class VSTAN(STAN):
    name = "vstan"
    config_class = VSTANConfig

    def _neighbour_factor(self, c: Candidates) -> np.ndarray:
        return np.exp((c.last_prefix_position - c.prefix_length[c.row]) / self.config.lambda_ipw)

    def _idf_strength(self) -> float:
        return self.config.lambda_idf
