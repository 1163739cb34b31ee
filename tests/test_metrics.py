"""The evaluation protocol against hand-computed cases: ranks, ties, NaN, metrics, lists, breakdowns, carve."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sessionrec.ops.evaluation import (
    carve_validation,
    evaluate,
    iter_prefix_batches,
    metrics_from_ranks,
    prediction_points,
    ranks_from_scores,
    top_k,
)
from sessionrec.ops.models.base import FitReport, Prefixes, SessionModel
from sessionrec.ops.sessiondata import SessionData


def sessions(rows: list[list[int]], n_items: int, times: list[list[float]] | None = None) -> SessionData:
    """SessionData from item lists; times default to one event per second in input order."""
    lengths = [len(r) for r in rows]
    flat_times = (
        np.concatenate([np.asarray(t, dtype=np.float64) for t in times])
        if times
        else np.arange(sum(lengths), dtype=np.float64)
    )
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    return SessionData(
        session_ids=np.asarray([f"s{i}" for i in range(len(rows))], dtype=object),
        offsets=offsets,
        items=np.asarray([i for r in rows for i in r], dtype=np.int64),
        times=flat_times,
        n_items=n_items,
    )


class Fixed(SessionModel):
    """Scores given by a function of the prefix: lets a test say exactly what a model answers."""

    name = "fixed"

    def __init__(self, n_items: int, answer) -> None:
        self.n_items, self.answer = n_items, answer

    def fit(self, train: SessionData, valid: SessionData | None = None) -> FitReport:
        return FitReport()

    def score(self, prefixes: Prefixes) -> np.ndarray:
        return np.stack([self.answer(p) for p in prefixes.items]).astype(np.float32)

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path) -> "Fixed":
        raise NotImplementedError


# -- ranks ------------------------------------------------------------------------------------------------------


def test_rank_counts_items_scored_at_least_as_high_as_the_target():
    scores = np.array([[0.1, 0.5, 0.3, 0.2], [0.9, 0.5, 0.3, 0.2]])
    assert ranks_from_scores(scores, np.array([2, 0])).tolist() == [2, 1]


def test_ties_are_pessimistic():
    assert ranks_from_scores(np.zeros((1, 7)), np.array([3])).tolist() == [7]  # all equal: last
    assert ranks_from_scores(np.array([[1.0, 1.0, 0.0, 2.0]]), np.array([0])).tolist() == [3]


def test_nan_scores_count_as_minus_infinity():
    scores = np.array([[np.nan, 0.2, 0.1], [np.nan, 0.2, 0.1], [np.nan, np.nan, np.nan]])
    # a NaN item never outranks the target; a NaN target is tied with the other NaNs and ranks last
    assert ranks_from_scores(scores, np.array([2, 0, 1])).tolist() == [2, 3, 3]


def test_rank_input_errors_are_clear():
    with pytest.raises(ValueError, match="one target per score row"):
        ranks_from_scores(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ranks_from_scores(np.zeros((1, 3)), np.array([3]))
    with pytest.raises(ValueError, match="matrix"):
        ranks_from_scores(np.zeros(3), np.array([0]))


# -- metric formulas --------------------------------------------------------------------------------------------


def test_metrics_from_hand_computed_ranks():
    m = metrics_from_ranks(np.array([1, 2, 6, 25]), ks=(1, 5, 20))
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@20"] == pytest.approx(3 / 4)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 2) / 4)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 6) / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 4)


def test_k_larger_than_the_catalogue_counts_every_rank():
    scores = np.array([[0.3, 0.2, 0.1]])
    m = metrics_from_ranks(ranks_from_scores(scores, np.array([2])), ks=(20,))
    assert m["recall@20"] == 1.0 and m["mrr@20"] == pytest.approx(1 / 3)


def test_no_ranks_give_zero_metrics():
    m = metrics_from_ranks(np.array([], dtype=np.int64), ks=(1, 20))
    assert m == {k: 0.0 for k in ("recall@1", "mrr@1", "ndcg@1", "recall@20", "mrr@20", "ndcg@20")}


# -- prefixes and top-k lists -----------------------------------------------------------------------------------


def test_every_position_after_the_first_is_predicted_and_length_one_sessions_are_not():
    data = sessions([[4, 5, 4], [7], [1, 2]], n_items=8, times=[[10, 20, 30], [40], [50, 60]])
    s, t = prediction_points(data)
    assert s.tolist() == [0, 0, 2] and t.tolist() == [1, 2, 1]
    (batch,) = list(iter_prefix_batches(data, batch_size=10))
    assert [p.tolist() for p in batch.prefixes.items] == [[4], [4, 5], [1]]
    assert batch.prefixes.times.tolist() == [10, 20, 50]  # time of the prefix's last event, not the target's
    assert batch.targets.tolist() == [5, 4, 2]  # the repeat click on 4 is a real target
    assert batch.session_lengths.tolist() == [3, 3, 2]
    assert sum(len(b.targets) for b in iter_prefix_batches(data, batch_size=1)) == 3


def test_top_k_breaks_ties_by_lower_index_and_caps_at_the_catalogue():
    scores = np.array([[0.0, 2.0, 1.0, 2.0, np.nan], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert top_k(scores, 3).tolist() == [[1, 3, 2], [0, 1, 2]]
    assert top_k(scores, 50).shape == (2, 5)
    assert top_k(scores, 50)[0].tolist() == [1, 3, 2, 0, 4]


# -- evaluate() -------------------------------------------------------------------------------------------------


def test_evaluate_an_oracle_a_constant_scorer_and_the_list_metrics():
    n_items = 30
    train = sessions([[0, 1], [0, 2], [0, 3]], n_items)  # item 0 has 3 events, items 1-3 one each
    test = sessions([[1, 2, 3], [4, 25], [9]], n_items)
    successor = {1: 2, 2: 3, 4: 25}

    def oracle(prefix: np.ndarray) -> np.ndarray:
        scores = np.zeros(n_items)
        scores[successor[int(prefix[-1])]] = 1.0
        return scores

    result = evaluate(Fixed(n_items, oracle), test, train)
    assert result["n_predictions"] == 3 and result["n_sessions"] == 2
    assert result["recall@1"] == result["mrr@20"] == result["ndcg@20"] == 1.0
    # Top-20 lists: the target, then the lowest other indices (all tied at 0): {0..19} twice, {25, 0..18} once.
    assert result["coverage@20"] == pytest.approx(21 / n_items)
    # Every list holds items 0 (3 events -> 1.0) and 1, 2, 3 (1 event -> 1/3): (1 + 3 * 1/3) / 20.
    assert result["popularity_bias@20"] == pytest.approx(0.1)
    assert result["by_prefix_length"]["1"] == {"n": 2, "recall@20": 1.0, "mrr@20": 1.0}
    assert result["by_prefix_length"]["2"]["n"] == 1 and result["by_prefix_length"]["11+"]["n"] == 0
    assert result["by_session_length"]["3"]["n"] == 2 and result["by_session_length"]["2"]["n"] == 1

    constant = evaluate(Fixed(n_items, lambda p: np.ones(n_items)), test, train)
    assert constant["recall@20"] == 0.0 and constant["mrr@20"] == 0.0  # every target ranks n_items = 30th


def test_evaluate_an_empty_test_set():
    train = sessions([[0, 1]], 3)
    empty = sessions([], 3)
    result = evaluate(Fixed(3, lambda p: np.ones(3)), empty, train)
    assert result["n_predictions"] == 0 and result["recall@20"] == 0.0 and result["coverage@20"] == 0.0
    assert result["popularity_bias@20"] == 0.0 and result["by_prefix_length"]["1"]["n"] == 0


def test_evaluate_rejects_a_wrong_score_shape_and_catalogue():
    train = sessions([[0, 1]], 3)
    with pytest.raises(ValueError, match="returned shape"):
        evaluate(Fixed(3, lambda p: np.ones(4)), train, train)
    with pytest.raises(ValueError, match="catalogue"):
        evaluate(Fixed(3, lambda p: np.ones(3)), sessions([[0, 1]], 4), train)


# -- validation carve -------------------------------------------------------------------------------------------


def test_carve_validation_takes_sessions_ending_in_the_last_days_and_known_items():
    day = 86_400.0
    data = sessions(
        [[0, 1, 2], [1, 2], [3, 0, 1], [4, 5], [1, 2, 3]],
        n_items=6,
        times=[[0, 10, 20], [day, day + 5], [2 * day, 2.5 * day, 2.6 * day], [2.2 * day, 2.3 * day],
               [0, 1, 3 * day]],
    )
    train_tr, valid = carve_validation(data, days=1.0)
    # The last session ends at day 3: sessions ending after day 2 (s2, s3, s4) are validation sessions.
    assert train_tr.session_ids.tolist() == ["s0", "s1"]
    # Items 3, 4, 5 never occur in train_tr: removed; s3 is left empty and dropped.
    assert valid.session_ids.tolist() == ["s2", "s4"]
    assert [valid.session(i)[0].tolist() for i in range(valid.n_sessions)] == [[0, 1], [1, 2]]
    assert valid.n_items == train_tr.n_items == 6
