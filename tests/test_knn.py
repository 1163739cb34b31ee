"""Baselines, the session-kNN family and the hybrid: exactness against a loop-by-loop reference, learning a planted
sequential pattern, persistence and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sessionrec.ops.evaluation import (
    carve_validation,
    evaluate,
    iter_prefix_batches,
    metrics_from_ranks,
    ranks_from_scores,
)
from sessionrec.ops.models.hybrid import Hybrid, HybridConfig, _blend_ranks, normalise
from sessionrec.ops.models.base import Prefixes
from sessionrec.ops.models.registry import ModelError, create_model, load_model, save_model
from sessionrec.ops.sessiondata import SessionData

KNN = ("sknn", "vsknn", "stan", "vstan")


def make_sessions(rows: list[np.ndarray], times: list[np.ndarray], n_items: int) -> SessionData:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return SessionData(
        session_ids=np.asarray([f"s{i}" for i in range(len(rows))], dtype=object),
        offsets=offsets,
        items=np.concatenate(rows).astype(np.int64),
        times=np.concatenate(times).astype(np.float64),
        n_items=n_items,
    )


def planted(n_sessions: int, n_items: int, seed: int, follow: float = 0.8) -> tuple[SessionData, SessionData]:
    """Sessions walking the chain i -> i+1 (probability ``follow``) or jumping to a random item; the last 20% of
    sessions (by time) are the test set. Item popularity is flat, so popularity cannot find the pattern."""
    rng = np.random.default_rng(seed)
    rows, times = [], []
    for s in range(n_sessions):
        length = 2 + rng.poisson(3)
        items = [int(rng.integers(n_items))]
        for _ in range(length - 1):
            items.append((items[-1] + 1) % n_items if rng.random() < follow else int(rng.integers(n_items)))
        rows.append(np.asarray(items))
        times.append(s * 300.0 + 20.0 * np.arange(length))
    cut = int(0.8 * n_sessions)
    return make_sessions(rows[:cut], times[:cut], n_items), make_sessions(rows[cut:], times[cut:], n_items)


@pytest.fixture(scope="module")
def chain() -> tuple[SessionData, SessionData]:
    return planted(n_sessions=1500, n_items=150, seed=1)


# -- a loop-by-loop reference of the four kNN models (the definitions of the module docstring) -----------------


def reference_scores(name: str, cfg, train: SessionData, prefix: list[int], now: float) -> np.ndarray:
    sessions = [train.session(s) for s in range(train.n_sessions)]
    ends = [float(t.max()) for _, t in sessions]
    recency = sorted(range(len(sessions)), key=lambda s: (-ends[s], s))
    rank = {s: r for r, s in enumerate(recency)}
    last_pos = [{int(i): p + 1 for p, i in enumerate(items)} for items, _ in sessions]
    length = len(prefix)
    q_pos = {i: p + 1 for p, i in enumerate(prefix)}
    q_items = sorted(q_pos)

    def weight(i: int) -> float:
        p = q_pos[i]
        if name == "vsknn":
            return {"quadratic": (p / length) ** 2, "div": p / length, "same": 1.0}[cfg.weighting]
        if name in ("stan", "vstan"):
            return math.exp((p - length) / cfg.lambda_spw)
        return 1.0

    candidates = sorted((s for s in range(len(sessions)) if set(q_items) & set(last_pos[s])), key=rank.get)
    if cfg.sample_size:
        candidates = candidates[: cfg.sample_size]
    norm2 = sum(weight(i) ** 2 for i in q_items)
    scored = []
    for s in candidates:
        shared = [i for i in q_items if i in last_pos[s]]
        size = len(last_pos[s])
        if name == "sknn":
            sim = (
                len(shared) / math.sqrt(len(q_items) * size)
                if cfg.similarity == "cosine"
                else len(shared) / (len(q_items) + size - len(shared))
            )
        elif name == "vsknn" and cfg.similarity == "vec":
            sim = sum(weight(i) for i in shared) / len(q_items)
        else:
            sim = sum(weight(i) for i in shared) / math.sqrt(norm2 * size)
        if name in ("stan", "vstan"):
            sim *= math.exp(-(now - ends[s]) / (cfg.lambda_snh * 86_400))
        if sim > 0:
            scored.append((-sim, rank[s], s, sim, shared))
    scores = np.zeros(train.n_items)
    idf = np.log(train.n_sessions / np.maximum(np.bincount(train.items, minlength=train.n_items), 1))
    idf_strength = {"vsknn": getattr(cfg, "idf_weighting", 0), "vstan": getattr(cfg, "lambda_idf", 0)}.get(name, 0)
    for _, _, s, sim, shared in sorted(scored)[: cfg.k]:
        newest_shared = max(q_pos[i] for i in shared)
        anchor = max(last_pos[s][i] for i in shared)
        if name == "vsknn":
            step = length - newest_shared + 1
            sim *= {"div": 1 / step, "quadratic": 1 / step**2, "same": 1.0}[cfg.weighting_score]
        if name == "vstan":
            sim *= math.exp((newest_shared - length) / cfg.lambda_ipw)
        for item, pos in last_pos[s].items():
            value = sim
            if name in ("stan", "vstan"):
                value *= math.exp(-abs(pos - anchor) / cfg.lambda_inh)
            value *= 1 + idf_strength * idf[item]
            scores[item] += value
    return scores


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("sknn", {"k": 5, "sample_size": 20, "similarity": "cosine"}),
        ("sknn", {"k": 50, "sample_size": 10, "similarity": "cosine"}),  # every sampled candidate is a neighbour
        ("sknn", {"k": 50, "sample_size": 0, "similarity": "jaccard"}),
        ("vsknn", {"k": 8, "sample_size": 30, "weighting": "quadratic", "weighting_score": "div",
                   "idf_weighting": 5.0}),
        ("vsknn", {"k": 8, "sample_size": 30, "weighting": "div", "weighting_score": "quadratic",
                   "similarity": "vec"}),
        ("stan", {"k": 6, "sample_size": 25, "lambda_spw": 1.5, "lambda_snh": 0.05, "lambda_inh": 0.7}),
        ("vstan", {"k": 6, "sample_size": 25, "lambda_spw": 2.0, "lambda_snh": 0.1, "lambda_inh": 2.0,
                   "lambda_ipw": 0.8, "lambda_idf": 1.5}),
    ],
)
def test_vectorised_scores_equal_the_loop_reference(name, overrides):
    rng = np.random.default_rng(7)
    rows = [rng.integers(0, 12, size=rng.integers(1, 7)) for _ in range(80)]  # repeats and shared items
    starts = 1000.0 * rng.permutation(len(rows))  # session order differs from time order
    times = [starts[s] + 10 * rng.random() + np.arange(len(r)) for s, r in enumerate(rows)]
    train = make_sessions(rows, times, n_items=14)  # items 12, 13 never occur
    model = create_model(name, **overrides)
    model.fit(train)
    prefixes = [[3], [3, 5, 3], [1, 2, 4, 8, 2, 9], [12], [], [0, 13, 7]]
    now = np.array([90_000.0, 50_000.0, 81_000.0, 1.0, 2.0, 79_500.0])
    got = model.score(Prefixes(items=[np.asarray(p, dtype=np.int64) for p in prefixes], times=now))
    assert got.dtype == np.float32 and got.shape == (len(prefixes), 14)
    for row, (prefix, t) in enumerate(zip(prefixes, now)):
        expected = reference_scores(name, model.config, train, prefix, float(t))
        np.testing.assert_allclose(got[row], expected, rtol=2e-6, atol=1e-12, err_msg=f"prefix {prefix}")
    assert not got[3].any() and not got[4].any()  # an unseen item or an empty prefix has no neighbours


# -- learning -------------------------------------------------------------------------------------------------


def test_every_model_learns_the_planted_chain_far_above_popularity(chain):
    train, test = chain
    pop = create_model("pop")
    pop.fit(train)
    floor = evaluate(pop, test, train)
    assert floor["recall@20"] < 0.25
    for name in (*KNN, "hybrid"):
        model = create_model(name, **({"components": ("vstan", "sknn")} if name == "hybrid" else {}))
        model.fit(train)
        result = evaluate(model, test, train)
        assert result["recall@20"] > floor["recall@20"] + 0.5, (name, result["recall@20"])
        # kNN models are not directional (i-1 and i+1 share the neighbours of i), so the next item is rarely alone
        # at rank 1; they still beat popularity's MRR many times over.
        assert result["mrr@20"] > 0.2 and result["mrr@20"] > 5 * floor["mrr@20"], (name, result["mrr@20"])


def test_recent_popularity_follows_the_trend_and_orders_the_rest_by_overall_count():
    day = 86_400.0
    rows = [np.array([0, 0, 0, 0]), np.array([1, 1]), np.array([2, 3]), np.array([3, 2, 2])]
    times = [np.arange(4.0), np.arange(2.0), 5 * day + np.arange(2.0), 5.9 * day + np.arange(3.0)]
    train = make_sessions(rows, times, n_items=5)
    model = create_model("rpop", days=1.0)
    model.fit(train)
    scores = model.score(Prefixes(items=[np.array([0])], times=np.array([6 * day])))[0]
    assert list(np.argsort(-scores, kind="stable")) == [2, 3, 0, 1, 4]  # trend first, then 0 (4 old) before 1 (2)
    pop = create_model("pop")
    pop.fit(train)
    pop_scores = pop.score(Prefixes([np.array([1])], np.array([0.0])))[0]
    assert list(np.argsort(-pop_scores, kind="stable")) == [0, 2, 1, 3, 4]


# -- hybrid blending ---------------------------------------------------------------------------------------------


def test_normalisations():
    scores = np.array([[0.5, 0.1, 0.5, 0.0], [2.0, 4.0, 0.0, np.nan], [3.0, 3.0, 3.0, 3.0]])
    np.testing.assert_allclose(normalise(scores, "rank")[0], [1, 1 / 3, 1, 1 / 4])  # competition ranks
    np.testing.assert_allclose(normalise(scores, "minmax"), [[1, 0.2, 1, 0], [0.5, 1, 0, 0], [0, 0, 0, 0]])


def test_blend_ranks_equal_ranking_every_blend_directly():
    rng = np.random.default_rng(3)
    a, b = rng.random((40, 30)), rng.random((40, 30)) ** 3
    targets = rng.integers(0, 30, 40)
    rows = np.arange(40)
    weights = np.linspace(0, 1, 11)
    got = _blend_ranks(a - a[rows, targets][:, None], b - b[rows, targets][:, None], weights)
    for g, w in enumerate(weights):
        np.testing.assert_array_equal(got[:, g], ranks_from_scores(w * a + (1 - w) * b, targets))


def test_hybrid_fits_its_blend_on_the_last_training_day_and_reuses_given_components(chain):
    train, test = chain
    day_train = make_sessions(
        [train.session(s)[0] for s in range(train.n_sessions)],
        [np.arange(len(train.session(s)[0])) + s * 200.0 for s in range(train.n_sessions)],  # spans 2.8 days
        train.n_items,
    )
    train_tr, held_out = carve_validation(day_train, 1.0)
    given = create_model("sknn")
    given.fit(train_tr)
    config = HybridConfig(components=("vstan", "sknn"), normalisation="minmax", weight_steps=4)
    hybrid = Hybrid(config, {"sknn": given})
    report = hybrid.fit(day_train)
    grid = hybrid.validation
    assert [(r["normalisation"], r["weight"]) for r in grid] == [("minmax", w) for w in (0, 0.25, 0.5, 0.75, 1)]
    chosen = [r for r in grid if r.get("chosen")]
    assert len(chosen) == 1 and report.best_valid_mrr == chosen[0]["mrr@20"]
    assert chosen[0]["recall@20"] + chosen[0]["mrr@20"] == max(r["recall@20"] + r["mrr@20"] for r in grid)
    # the weights were fitted on the carve: recompute the chosen blend's validation metrics from the parts
    vstan = create_model("vstan")
    vstan.fit(train_tr)
    ranks = [
        ranks_from_scores(
            hybrid.weight * normalise(vstan.score(b.prefixes), "minmax")
            + (1 - hybrid.weight) * normalise(given.score(b.prefixes), "minmax"),
            b.targets,
        )
        for b in iter_prefix_batches(held_out)
    ]
    assert metrics_from_ranks(np.concatenate(ranks), (20,))["mrr@20"] == pytest.approx(chosen[0]["mrr@20"])
    assert hybrid._models["sknn"] is not given  # rebuilt on all training data, the given one left untouched


# -- persistence and errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pop", "rpop", *KNN, "hybrid"])
def test_save_load_gives_identical_scores(name, chain, tmp_path):
    train, test = chain
    model = create_model(name, **({"components": ("vstan", "sknn")} if name == "hybrid" else {}))
    model.fit(train)
    save_model(model, tmp_path / name)
    loaded = load_model(tmp_path / name)
    assert type(loaded) is type(model) and loaded.params() == model.params()
    prefixes = Prefixes(items=[test.session(s)[0][:2] for s in range(40)], times=test.times[test.offsets[:40]])
    np.testing.assert_array_equal(loaded.score(prefixes), model.score(prefixes))


def test_unfitted_models_and_bad_prefixes_give_clear_errors(chain):
    train, _ = chain
    for name in ("pop", "vstan", "hybrid"):
        with pytest.raises(ModelError, match="not fitted"):
            create_model(name, **({"components": ("vstan", "sknn")} if name == "hybrid" else {})).score(
                Prefixes(items=[np.array([1])], times=np.array([0.0]))
            )
    model = create_model("stan")
    model.fit(train)
    with pytest.raises(ModelError, match="catalogue"):
        model.score(Prefixes(items=[np.array([train.n_items])], times=np.array([0.0])))


def test_hyper_parameters_are_validated():
    with pytest.raises(ModelError, match="k must be at least 1"):
        create_model("sknn", k=0)
    with pytest.raises(ModelError, match="lambda_snh must be positive"):
        create_model("vstan", lambda_snh=0.0)
    with pytest.raises(ModelError, match="weighting must be one of"):
        create_model("vsknn", weighting="cubic")
    with pytest.raises(ModelError, match="two different model names"):
        create_model("hybrid", components=("vstan", "vstan"))
    with pytest.raises(ModelError, match="not blendable"):
        create_model("hybrid", components=("vstan", "hybrid"))
