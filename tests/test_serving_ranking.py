"""The ranking path without any server: candidates, business filters, dedupe, backfill and fallbacks.

Models are real and small: popularity, V-SKNN and a tiny GRU4Rec fitted on a slice of YOOCHOOSE clicks; the
sessions ranked are real test sessions of the matching test file. Categories do not exist in this dataset; the
category tests give items categories in an item table, as the business would.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pytest

from sessionrec.config import ServingConfig
from sessionrec.ops.models.base import FitReport, Prefixes, SessionModel
from sessionrec.ops.models.registry import create_model
from sessionrec.ops.errors import SessionrecError
from sessionrec.ops.sessiondata import ItemIndex, SessionData, read_split_tsv
from sessionrec.serving.candidates import (
    DEFAULT_RECALL_TARGET,
    REQUIRED_RECALL,
    CandidateIndex,
    exact_index,
    hnsw_index,
    model_candidate_index,
    recall_at,
)
from sessionrec.serving.filters import ItemRulesError, ItemTable
from sessionrec.serving import model_provider
from sessionrec.serving.model_provider import LoadedVersion, make_servable
from sessionrec.serving.ranking import (
    FALLBACK_EMPTY,
    FALLBACK_ERROR,
    FALLBACK_TIMEOUT,
    REASON_CATEGORY,
    REASON_MODEL,
    REASON_POPULAR,
    Ranker,
    RankRequest,
    Ranking,
    ServableModel,
)

TRAIN = "yoochoose/session-rec/yoochoose-clicks-100k_train_full.txt"
TEST = "yoochoose/session-rec/yoochoose-clicks-100k_test.txt"
ROWS = 20_000
CONFIG = ServingConfig(candidates=100)


@dataclass(frozen=True)
class Data:
    index: ItemIndex
    train: SessionData
    sessions: list[list[str]]  # real test sessions (known items only), as item ids


@pytest.fixture(scope="module")
def data(shared_data: Path) -> Data:
    frame = read_split_tsv(shared_data / TRAIN).head(ROWS)
    index = ItemIndex.from_items(frame["ItemId"])
    train, _ = SessionData.from_frame(frame, index)
    test, _ = SessionData.from_frame(read_split_tsv(shared_data / TEST), index)
    sessions = [index.decode(test.session(s)[0]) for s in range(test.n_sessions)]
    return Data(index, train, [s for s in sessions if len(s) >= 2][:200])


@pytest.fixture(scope="module")
def pop(data: Data) -> SessionModel:
    model = create_model("pop")
    model.fit(data.train)
    return model


@pytest.fixture(scope="module")
def vsknn(data: Data) -> SessionModel:
    model = create_model("vsknn")
    model.fit(data.train)
    return model


@pytest.fixture(scope="module")
def gru(data: Data) -> SessionModel:
    model = create_model("gru4rec", layers=(32,), n_sample=256, max_epochs=1, progress=False, device="cpu")
    model.fit(data.train)
    return model


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def servable(model: SessionModel, data: Data, table: ItemTable = ItemTable(), config: ServingConfig = CONFIG):
    return make_servable(LoadedVersion(model, data.index, "1"), "champion", table, config)


def rank(ranker: Ranker, target: ServableModel, request: RankRequest) -> Ranking:
    return asyncio.run(ranker.rank(target, request))


def popularity_order(model: SessionModel, data: Data) -> list[str]:
    scores = model.score(Prefixes([np.zeros(0, dtype=np.int64)], np.array([0.0])))[0]
    return data.index.decode(np.argsort(-scores, kind="stable"))


class Faulty(SessionModel):
    """A fitted model that raises, or sleeps, when asked to score a non-empty session, after ``healthy_calls``
    such scorings went well (the service scores one session to check a model before it takes traffic)."""

    name: ClassVar[str] = "faulty"

    def __init__(self, inner: SessionModel, sleep_s: float = 0.0, healthy_calls: int = 0) -> None:
        self.inner, self.sleep_s, self.healthy_calls = inner, sleep_s, healthy_calls

    def fit(self, train: SessionData, valid: SessionData | None = None) -> FitReport:
        return self.inner.fit(train, valid)

    def score(self, prefixes: Prefixes) -> np.ndarray:
        if all(len(p) == 0 for p in prefixes.items) or self.healthy_calls > 0:
            self.healthy_calls -= any(len(p) for p in prefixes.items)
            return self.inner.score(prefixes)
        if self.sleep_s:
            time.sleep(self.sleep_s)
            return self.inner.score(prefixes)
        raise RuntimeError("scoring backend lost")

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path) -> "Faulty":
        raise NotImplementedError


def test_model_ranking_is_unique_and_leaves_out_the_session(data: Data, vsknn: SessionModel, executor) -> None:
    ranker = Ranker(100, 1_000, executor)
    target = servable(vsknn, data)
    for session in data.sessions[:20]:
        ranking = rank(ranker, target, RankRequest(session, k=20))
        ids = [r.item_id for r in ranking.items]
        assert ranking.fallback is None
        assert len(ids) == 20 and len(set(ids)) == 20
        assert not set(ids) & set(session)
        assert ranking.items[0].reason == REASON_MODEL
        scores = [r.score for r in ranking.items if r.reason == REASON_MODEL]
        assert scores == sorted(scores, reverse=True)
    # The same session with exclude_seen=False may get its own items back (kNN scores them highest).
    session = data.sessions[0]
    again = rank(ranker, target, RankRequest(session, k=20, exclude_seen=False))
    assert set(session) & {r.item_id for r in again.items}


def test_model_top_matches_full_catalogue_scores(data: Data, vsknn: SessionModel, executor) -> None:
    """Candidates (model top-N plus popular) then re-ranking give exactly the model's own top-k."""
    ranker = Ranker(100, 1_000, executor)
    target = servable(vsknn, data)
    session = data.sessions[3]
    codes, _ = data.index.encode(session)
    scores = vsknn.score(Prefixes([codes], np.array([time.time()])))[0]
    scores[codes] = -np.inf
    expected = set(data.index.decode(np.argsort(-scores)[:10]))
    ranking = rank(ranker, target, RankRequest(session, k=10))
    assert {r.item_id for r in ranking.items} == expected


def test_blocked_and_unavailable_items_never_served_and_k_backfilled(
    data: Data, pop: SessionModel, executor, tmp_path: Path
) -> None:
    order = popularity_order(pop, data)
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("# embargo\n" + "\n".join(order[:10]) + "\n")
    items = tmp_path / "items.csv"
    pl.DataFrame({"item_id": order[10:20], "available": [False] * 10}).write_csv(items)
    table = ItemTable.load(blocklist, items)
    ranker = Ranker(100, 1_000, executor)
    target = servable(pop, data, table)
    for session in ([], data.sessions[0], ["unknown-item"]):
        ranking = rank(ranker, target, RankRequest(session, k=30, exclude_items=order[20:25]))
        ids = [r.item_id for r in ranking.items]
        assert len(ids) == 30 and len(set(ids)) == 30
        assert not set(ids) & set(order[:25])
    # Popularity as the model: the answer is the popularity order without the forbidden and excluded items.
    assert ids == [i for i in order if i not in set(order[:25])][:30]


def test_category_include_and_exclude(data: Data, vsknn: SessionModel, executor, tmp_path: Path) -> None:
    categories = {item: f"c{i % 4}" for i, item in enumerate(data.index.item_ids.tolist())}
    path = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": list(categories), "category": list(categories.values())}).write_parquet(path)
    target = servable(vsknn, data, ItemTable.load(None, path))
    ranker = Ranker(100, 1_000, executor)
    session = data.sessions[1]
    only = rank(ranker, target, RankRequest(session, k=50, include_categories=["c1", "c2"]))
    assert len(only.items) == 50 and {categories[r.item_id] for r in only.items} <= {"c1", "c2"}
    without = rank(ranker, target, RankRequest(session, k=50, exclude_categories=["c0"]))
    assert len(without.items) == 50 and "c0" not in {categories[r.item_id] for r in without.items}
    nothing = rank(ranker, target, RankRequest(session, k=50, include_categories=["no-such-category"]))
    assert nothing.items == []


def test_fewer_allowed_items_than_k(data: Data, pop: SessionModel, executor, tmp_path: Path) -> None:
    keep = data.index.item_ids[:7].tolist()
    path = tmp_path / "items.csv"
    pl.DataFrame({"item_id": data.index.item_ids.tolist(),
                  "available": [item in keep for item in data.index.item_ids.tolist()]}).write_csv(path)
    ranking = rank(Ranker(100, 1_000, executor), servable(pop, data, ItemTable.load(None, path)),
                   RankRequest(data.sessions[0], k=100, exclude_seen=False))
    assert sorted(r.item_id for r in ranking.items) == sorted(keep)


def test_model_error_falls_back_to_popularity(data: Data, pop: SessionModel, executor) -> None:
    target = servable(Faulty(pop), data)
    ranking = rank(Ranker(100, 1_000, executor), target, RankRequest(data.sessions[0], k=10))
    assert ranking.fallback == FALLBACK_ERROR
    assert [r.item_id for r in ranking.items] == [i for i in popularity_order(pop, data)
                                                 if i not in data.sessions[0]][:10]
    assert {r.reason for r in ranking.items} == {REASON_POPULAR}


def test_slow_model_falls_back_within_the_budget(data: Data, pop: SessionModel, executor) -> None:
    target = servable(Faulty(pop, sleep_s=0.5), data)
    ranker = Ranker(100, 40, executor)
    started = time.perf_counter()
    ranking = rank(ranker, target, RankRequest(data.sessions[0], k=10))
    assert (time.perf_counter() - started) < 0.2
    assert ranking.fallback == FALLBACK_TIMEOUT and len(ranking.items) == 10


def test_failure_fallback_prefers_the_last_category(
    data: Data, pop: SessionModel, executor, tmp_path: Path
) -> None:
    session = data.sessions[2]
    categories = {item: ("last" if i % 3 == 0 else "other") for i, item in enumerate(data.index.item_ids.tolist())}
    categories[session[-1]] = "last"
    path = tmp_path / "items.csv"
    pl.DataFrame({"item_id": list(categories), "category": list(categories.values())}).write_csv(path)
    target = servable(Faulty(pop), data, ItemTable.load(None, path))
    ranking = rank(Ranker(100, 1_000, executor), target, RankRequest(session, k=10))
    assert ranking.fallback == FALLBACK_ERROR
    assert all(r.reason == REASON_CATEGORY and categories[r.item_id] == "last" for r in ranking.items)


def test_empty_and_unknown_sessions_get_popularity(data: Data, vsknn: SessionModel, pop: SessionModel,
                                                   executor, tmp_path: Path) -> None:
    # V-SKNN scores the empty session all zero: the item table's popularity orders the fallback.
    order = popularity_order(pop, data)
    path = tmp_path / "items.csv"
    pl.DataFrame({"item_id": order[:50], "popularity": list(range(50, 0, -1))}).write_csv(path)
    target = servable(vsknn, data, ItemTable.load(None, path))
    ranker = Ranker(100, 1_000, executor)
    for session in ([], ["not-in-catalogue", "neither"]):
        ranking = rank(ranker, target, RankRequest(session, k=5))
        assert ranking.fallback == FALLBACK_EMPTY
        assert [r.item_id for r in ranking.items] == order[:5]
    assert rank(ranker, target, RankRequest(["not-in-catalogue"], k=5)).n_unknown == 1


def test_batched_answers_equal_single_answers(
    data: Data, vsknn: SessionModel, gru: SessionModel, executor
) -> None:
    """Requests that arrive together are scored as one batch; each gets the answer it would get alone."""
    for model in (vsknn, gru):
        target = servable(model, data)
        ranker = Ranker(100, 5_000, executor)
        requests = [RankRequest(session, k=10) for session in data.sessions[:40]]
        alone = [rank(ranker, target, request) for request in requests]

        async def together() -> list[Ranking]:
            return await asyncio.gather(*(ranker.rank(target, request) for request in requests))

        batched = asyncio.run(together())
        for one, other in zip(alone, batched):
            assert [r.item_id for r in one.items] == [r.item_id for r in other.items]
            np.testing.assert_allclose([r.score for r in one.items], [r.score for r in other.items], rtol=1e-4)


def test_embedding_candidates_give_the_models_own_top_k(data: Data, gru: SessionModel, executor) -> None:
    target = servable(gru, data)
    assert target.candidates is not None and target.candidates.kind == "exact"
    ranker = Ranker(100, 5_000, executor)
    for session in data.sessions[:20]:
        codes, _ = data.index.encode(session)
        scores = gru.score(Prefixes([codes], np.array([0.0])))[0]
        scores[codes] = -np.inf
        ranking = rank(ranker, target, RankRequest(session, k=20))
        assert ranking.fallback is None
        assert [r.item_id for r in ranking.items] == data.index.decode(np.argsort(-scores, kind="stable")[:20])


def test_long_sessions_are_scored_on_their_last_items(data: Data, gru: SessionModel, executor) -> None:
    """The model sees the last `model_prefix_items` items; all of the session still counts as seen."""
    target = servable(gru, data)
    prefix = ServingConfig().model_prefix_items
    session = [item for s in data.sessions for item in s][: prefix + 15]
    codes, _ = data.index.encode(session)
    scores = gru.score(Prefixes([codes[-prefix:]], np.array([0.0])))[0]
    scores[codes] = -np.inf
    ranking = rank(Ranker(100, 5_000, executor), target, RankRequest(session, k=10))
    assert [r.item_id for r in ranking.items] == data.index.decode(np.argsort(-scores, kind="stable")[:10])


def test_ann_index_reaches_the_recall_target(data: Data, gru: SessionModel) -> None:
    """HNSW tuned on single-item sessions, measured on real multi-item test sessions."""
    vectors = gru.item_embeddings()
    tuning = gru.session_embeddings(Prefixes([np.array([i]) for i in range(256)], np.zeros(256)))
    exact = exact_index(vectors)
    ann = hnsw_index(vectors, tuning, exact=exact)
    test = [data.index.encode(s)[0] for s in data.sessions]
    queries = gru.session_embeddings(Prefixes(test, np.zeros(len(test))))
    assert ann.kind == "hnsw" and ann.recall >= DEFAULT_RECALL_TARGET
    assert recall_at(ann, exact, queries) >= REQUIRED_RECALL
    # Above the threshold the service builds the ANN index by itself.
    big = servable(gru, data, config=ServingConfig(candidates=100, ann_threshold_items=100))
    assert big.candidates.kind == "hnsw" and big.candidates.recall >= DEFAULT_RECALL_TARGET


def test_the_index_logged_with_a_version_is_loaded_not_rebuilt(
    data: Data, gru: SessionModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServingConfig(candidates=100, ann_threshold_items=100)
    popular = np.argsort(-np.bincount(data.train.items, minlength=len(data.index)), kind="stable")
    built = model_candidate_index(gru, popular, config.ann_threshold_items)
    assert built is not None and built.kind == "hnsw"
    built.save(tmp_path / "candidates")
    loaded = CandidateIndex.load(tmp_path / "candidates", gru.item_embeddings())
    assert (loaded.kind, loaded.params, loaded.recall) == (built.kind, built.params, built.recall)
    queries = gru.session_embeddings(Prefixes([data.index.encode(s)[0] for s in data.sessions[:50]], np.zeros(50)))
    assert np.array_equal(loaded.search(queries, 50)[0], built.search(queries, 50)[0])
    # make_servable takes it as it is; it builds one only when the version has none or one of another kind.
    monkeypatch.setattr(model_provider, "model_candidate_index", lambda *_: pytest.fail("rebuilt the index"))
    version = LoadedVersion(gru, data.index, "1", loaded)
    assert make_servable(version, "champion", ItemTable(), config).candidates is loaded
    monkeypatch.undo()
    exact = make_servable(version, "champion", ItemTable(), ServingConfig(candidates=100)).candidates
    assert exact is not None and exact.kind == "exact"  # 20k threshold: this catalogue gets the exact index
    with pytest.raises(SessionrecError, match="different trainings"):  # another version's embeddings
        CandidateIndex.load(tmp_path / "candidates", gru.item_embeddings()[:-1])


def test_bad_item_tables_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    pl.DataFrame({"id": ["a"], "available": [True]}).write_csv(path)
    with pytest.raises(ItemRulesError, match="no item_id column"):
        ItemTable.load(None, path)
    pl.DataFrame({"item_id": ["a", "a"], "available": [True, False]}).write_csv(path)
    with pytest.raises(ItemRulesError, match="unique"):
        ItemTable.load(None, path)
    with pytest.raises(ItemRulesError, match="cannot read the blocklist"):
        ItemTable.load(tmp_path / "missing.txt", None)
