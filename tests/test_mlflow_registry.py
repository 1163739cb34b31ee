"""MLflow tracking, the pyfunc model and the registry against real stores: a SQLite file and the CI's PostgreSQL.

The models are real: popularity fitted on a slice of YOOCHOOSE clicks (session-rec's 100k training file) and
evaluated on the matching test file. The weaker challenger is the same model fitted on far fewer clicks, with the
same item index, so that both are ranked against the same catalogue on the same test split.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from mlflow import MlflowClient

from sessionrec.config import PromotionConfig
from sessionrec.integrations.mlflow_registry import (
    CHALLENGER,
    CHAMPION,
    NoChampionError,
    NoPreviousChampionError,
    Registry,
    RegistryError,
    RegistryUnreachableError,
    UnknownVersionError,
)
from sessionrec.integrations.mlflow_tracking import (
    RunRecord,
    StoreUnreachableError,
    TrackingStore,
    fluent_tracking_uri,
)
from sessionrec.integrations.pyfunc_model import ModelInputError, SessionRecommenderPyfunc
from sessionrec.ops.evaluation import evaluate, item_popularity
from sessionrec.ops.models.base import FitReport, Prefixes, SessionModel
from sessionrec.ops.models.registry import create_model
from sessionrec.ops.promotion import decide_promotion
from sessionrec.ops.sessiondata import ItemIndex, SessionData, read_split_tsv

SLICE = "yoochoose/session-rec/yoochoose-clicks-100k_train_full.txt"
TEST = "yoochoose/session-rec/yoochoose-clicks-100k_test.txt"
SLICE_ROWS = 20_000  # about 5k training sessions: a stable popularity ranking, fitted in milliseconds
WEAK_ROWS = 300  # the weak challenger's training clicks
#: The registry flows test the gate's bookkeeping, not this machine's speed: the latency rule is unit-tested below.
POLICY = PromotionConfig(max_latency_ms=1_000.0)


@dataclass(frozen=True)
class Data:
    train_frame: pl.DataFrame
    index: ItemIndex
    train: SessionData
    test: SessionData
    fingerprint: str


@dataclass(frozen=True)
class Trained:
    model: SessionModel
    report: FitReport
    evaluation: dict


@pytest.fixture(scope="module")
def data(shared_data: Path) -> Data:
    frame = read_split_tsv(shared_data / SLICE).head(SLICE_ROWS)
    index = ItemIndex.from_items(frame["ItemId"])
    train, _ = SessionData.from_frame(frame, index)
    test, _ = SessionData.from_frame(read_split_tsv(shared_data / TEST), index)
    fingerprint = hashlib.sha256((shared_data / TEST).read_bytes()).hexdigest()[:16]
    return Data(frame, index, train, test, fingerprint)


def _train(data: Data, rows: int) -> Trained:
    train, _ = SessionData.from_frame(data.train_frame.head(rows), data.index)
    model = create_model("pop")
    report = model.fit(train)
    evaluation = evaluate(model, data.test, data.train)
    return Trained(model, report, {**evaluation, "dataset_fingerprint": data.fingerprint})


@pytest.fixture(scope="module")
def strong(data: Data) -> Trained:
    return _train(data, SLICE_ROWS)


@pytest.fixture(scope="module")
def weak(data: Data, strong: Trained) -> Trained:
    trained = _train(data, WEAK_ROWS)
    # The precondition of the refusal tests: really worse than the allowed drop, measured, not assumed.
    assert trained.evaluation["mrr@20"] < strong.evaluation["mrr@20"] * (1 - POLICY.max_relative_drop)
    return trained


@pytest.fixture(scope="module")
def latency(data: Data, strong: Trained) -> float:
    wrapper = SessionRecommenderPyfunc()
    wrapper.bind(strong.model, data.index)
    sessions = [data.index.decode(data.test.session(s)[0]) for s in range(50)]
    return wrapper.latency_p99_ms(sessions)


def _log(store: TrackingStore, data: Data, trained: Trained, **report_changes) -> RunRecord:
    return store.log_training_run(
        trained.model,
        data.index,
        replace(trained.report, **report_changes),
        trained.evaluation,
        params={"slice_rows": SLICE_ROWS},
        dataset={"fingerprint": data.fingerprint, "n_sessions": data.test.n_sessions, "items": len(data.index)},
        tags={"purpose": "test"},
        item_popularity=item_popularity(data.train),
    )


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A directory that does not exist yet: the store must create it.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'state' / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sqlite_store(sqlite_uri: str, tmp_path_factory: pytest.TempPathFactory) -> TrackingStore:
    return TrackingStore(sqlite_uri, tmp_path_factory.mktemp("artifacts"), "sessionrec-test")


@pytest.fixture(scope="module")
def sqlite_runs(
    sqlite_store: TrackingStore, data: Data, strong: Trained, weak: Trained
) -> tuple[RunRecord, RunRecord]:
    return _log(sqlite_store, data, strong), _log(sqlite_store, data, weak)


def _release_flow(
    registry: Registry, runs: tuple[RunRecord, RunRecord], strong: Trained, weak: Trained, latency: float
) -> tuple[int, int]:
    """register → auto-promote (no champion) → worse challenger refused → manual promote → rollback."""
    popularity = strong.evaluation  # the popularity baseline is the strong model itself
    fingerprint = strong.evaluation["dataset_fingerprint"]
    first = registry.register(runs[0], strong.evaluation, fingerprint)
    assert registry.alias(CHALLENGER).version == first
    decision = registry.auto_promote(first, POLICY, popularity, latency)
    assert decision.passed, decision.reasons
    assert "no champion yet" in decision.reasons[0]
    assert registry.champion().version == first

    second = registry.register(runs[1], weak.evaluation, fingerprint)
    refused = registry.auto_promote(second, POLICY, popularity, latency)
    assert not refused.passed
    assert any("beyond the allowed drop" in reason for reason in refused.reasons), refused.reasons
    assert refused.evidence["champion_version"] == first
    assert registry.champion().version == first
    info = registry.version(second)
    assert info.gate_passed is False and info.gate_reasons == refused.reasons
    assert info.tags["decided_at"] and "gate_evidence" in info.tags
    assert info.metrics["mrr_at_20"] == pytest.approx(weak.evaluation["mrr@20"])
    assert info.dataset_fingerprint == fingerprint

    promoted = registry.promote(second, "campaign week: fresh items matter more", user="alice")
    assert registry.champion().version == second
    assert (promoted.promoted_by, promoted.previous_champion) == ("alice", first)
    assert promoted.promotion_reason == "campaign week: fresh items matter more" and promoted.promoted_at

    restored = registry.rollback("mrr dropped in production", user="bob")
    assert restored.version == first and registry.champion().version == first
    rolled_back = registry.version(second)
    assert rolled_back.tags["rolled_back_by"] == "bob"
    assert CHALLENGER not in rolled_back.aliases  # a canary must not keep serving the rolled-back version
    return first, second


def test_run_records_params_metrics_provenance_and_artifacts(
    sqlite_store: TrackingStore,
    sqlite_runs: tuple[RunRecord, RunRecord],
    strong: Trained,
    data: Data,
    tmp_path: Path,
) -> None:
    record = sqlite_runs[0]
    run = sqlite_store.client.get_run(record.run_id)
    assert record.run_url_path == f"#/experiments/{sqlite_store.experiment_id}/runs/{record.run_id}"
    assert run.data.metrics["mrr_at_20"] == pytest.approx(strong.evaluation["mrr@20"])
    assert run.data.metrics["by_prefix_length/1/recall_at_20"] == pytest.approx(
        strong.evaluation["by_prefix_length"]["1"]["recall@20"]
    )
    assert run.data.params["slice_rows"] == str(SLICE_ROWS)
    assert run.data.params["dataset.n_sessions"] == str(data.test.n_sessions)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert run.data.tags["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert run.data.tags["dataset_fingerprint"] == data.fingerprint
    assert run.data.tags["device"] == "cpu" and run.data.tags["model_name"] == "pop"
    assert run.data.tags["purpose"] == "test"
    names = {a.path for a in sqlite_store.client.list_artifacts(record.run_id)}
    assert {"evaluation.json", "item_index.json", "training_curves.png", "dataset.json"} <= names
    png = Path(sqlite_store.client.download_artifacts(record.run_id, "training_curves.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record.model_uri == f"models:/{record.model_id}"


def test_epoch_curves_are_step_metrics(sqlite_store: TrackingStore, data: Data, strong: Trained) -> None:
    # The per-epoch curves a neural model reports; logging them does not depend on which model produced them.
    epochs = [{"epoch": e, "train_loss": 2.0 / e, "valid_mrr@20": 0.1 * e} for e in (1, 2, 3)]
    record = _log(sqlite_store, data, strong, epochs=epochs, best_epoch=3, best_valid_mrr=0.3)
    history = sqlite_store.client.get_metric_history(record.run_id, "valid_mrr_at_20")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (e["epoch"], pytest.approx(e["valid_mrr@20"])) for e in epochs
    ]
    assert sqlite_store.client.get_run(record.run_id).data.metrics["best_epoch"] == 3


def test_release_flow_sqlite_and_pyfunc_serving(
    sqlite_uri: str,
    sqlite_runs: tuple[RunRecord, RunRecord],
    strong: Trained,
    weak: Trained,
    latency: float,
    data: Data,
) -> None:
    registry = Registry(sqlite_uri, "flow-model")
    first, second = _release_flow(registry, sqlite_runs, strong, weak, latency)

    # An alias moved by hand (what the MLflow UI does) is what list_versions and rollback see.
    MlflowClient(tracking_uri=sqlite_uri).set_registered_model_alias("flow-model", CHAMPION, str(second))
    assert [v.aliases for v in registry.list_versions()] == [[CHAMPION], []]
    assert registry.rollback("undo the manual change", user="carol").version == first
    assert {v.version: v.aliases for v in registry.list_versions()} == {second: [], first: [CHAMPION]}

    with fluent_tracking_uri(sqlite_uri):
        pyfunc = mlflow.pyfunc.load_model("models:/flow-model@champion")
    known = [data.index.decode(data.test.session(s)[0]) for s in range(2)]
    request = pd.DataFrame(
        {"items": [known[0], known[1] + ["no-such-item"], ["no-such-item", "nor-this"], []], "k": [20, 5, 10, 3]}
    )
    answer = pyfunc.predict(request)
    assert [len(items) for items in answer["items"]] == [20, 5, 10, 3]
    assert answer["n_unknown"].tolist() == [0, 1, 2, 0]
    # Popularity ignores the prefix: every row is the top of the training click counts, best first.
    clicks = data.train_frame["ItemId"].value_counts()
    counts = dict(zip(clicks["ItemId"].to_list(), clicks["count"].to_list()))
    expected = sorted(counts.values(), reverse=True)
    for items, scores in zip(answer["items"], answer["scores"]):
        assert list(scores) == expected[: len(scores)]
        assert [counts[item] for item in items] == list(scores)
    default_k = pyfunc.predict(pd.DataFrame({"items": [known[0]]}))
    assert len(default_k["items"][0]) == 20

    loaded = registry.load_champion()
    assert loaded.version.version == first and loaded.model.name == "pop"
    assert len(loaded.item_index) == len(data.index)


def test_registry_errors_say_what_to_do(
    sqlite_uri: str, sqlite_runs: tuple[RunRecord, RunRecord], data: Data, strong: Trained
) -> None:
    registry = Registry(sqlite_uri, "errors-model")
    with pytest.raises(NoChampionError, match="no champion yet"):
        registry.rollback("nothing to roll back")
    with pytest.raises(NoChampionError, match="alias 'canary'"):
        registry.load_alias("canary")
    version = registry.register(sqlite_runs[0], strong.evaluation, data.fingerprint)
    with pytest.raises(UnknownVersionError, match=f"no version 99; existing versions: {version}"):
        registry.promote(99, "typo")
    with pytest.raises(UnknownVersionError, match="positive integer"):
        registry.version("latest")
    registry.promote(version, "first release")
    with pytest.raises(NoPreviousChampionError, match="promote the version you want"):
        registry.rollback("nothing earlier")
    with pytest.raises(RegistryError, match="measured on split other"):
        registry.register(sqlite_runs[0], {**strong.evaluation, "dataset_fingerprint": "other"}, data.fingerprint)

    started = time.perf_counter()
    with pytest.raises(RegistryUnreachableError, match="unreachable"):
        Registry("postgresql://postgres:secret@127.0.0.1:1/nowhere", "m")
    with pytest.raises(StoreUnreachableError, match=r"postgres:\*\*\*@127\.0\.0\.1:1"):
        TrackingStore("postgresql://postgres:secret@127.0.0.1:1/nowhere", Path("unused"), "e")
    assert time.perf_counter() - started < 15  # not MLflow's 100 s of retries


def test_pyfunc_input_errors(data: Data, strong: Trained) -> None:
    wrapper = SessionRecommenderPyfunc()
    wrapper.bind(strong.model, data.index)
    with pytest.raises(ModelInputError, match="column 'items'"):
        wrapper.predict(None, pd.DataFrame({"session": [["a"]]}))
    with pytest.raises(ModelInputError, match="positive integer"):
        wrapper.predict(None, pd.DataFrame({"items": [["a"]], "k": [0]}))
    with pytest.raises(ModelInputError, match="list of item ids"):
        wrapper.predict(None, pd.DataFrame({"items": ["214716935"]}))
    # k larger than the catalogue: the whole catalogue, ranked.
    assert len(wrapper.rank([[]], len(data.index) + 10)[0].items) == len(data.index)


def test_flat_scores_fall_back_to_popularity(data: Data) -> None:
    knn = create_model("sknn")
    knn.fit(data.train)
    popularity = item_popularity(data.train)
    session = data.test.session(0)[0]
    own = knn.score(Prefixes(items=[session], times=np.array([time.time()])))[0].astype(np.float64)
    assert own.max() > own.min()  # this session has neighbours: kNN's own ranking must be kept

    bare = SessionRecommenderPyfunc()
    bare.bind(knn, data.index)
    assert set(bare.rank([["no-such-item"]], 5)[0].scores) == {0.0}  # kNN alone has nothing for a cold session

    wrapper = SessionRecommenderPyfunc()
    wrapper.bind(knn, data.index, popularity)
    cold, warm, empty = wrapper.rank([["no-such-item"], data.index.decode(session), []], 10)
    assert cold.scores == empty.scores == sorted(popularity, reverse=True)[:10]
    assert cold.n_unknown == 1 and empty.n_unknown == 0
    assert warm.scores == sorted(own, reverse=True)[:10]


# -- PostgreSQL ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_uri() -> Iterator[str]:
    """A fresh database on the CI's PostgreSQL (trust auth, user postgres), dropped afterwards."""
    import psycopg2

    try:
        admin = psycopg2.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5
        )
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at 127.0.0.1:5432 does not answer ({exc}); CI starts it (.ci/run), locally start one "
            "with trust authentication for the user postgres"
        )
    admin.autocommit = True
    name = f"sessionrec_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.mark.services
def test_release_flow_postgres(
    postgres_uri: str, tmp_path: Path, data: Data, strong: Trained, weak: Trained, latency: float
) -> None:
    store = TrackingStore(postgres_uri, tmp_path / "artifacts", "sessionrec-test")
    runs = (_log(store, data, strong), _log(store, data, weak))
    registry = Registry(postgres_uri, "pg-model")
    first, second = _release_flow(registry, runs, strong, weak, latency)
    assert [(v.version, v.aliases) for v in registry.list_versions()] == [(second, []), (first, [CHAMPION])]
    assert registry.load_champion().model.name == "pop"


# -- the gate on its own ------------------------------------------------------------------------------------------

GATE = PromotionConfig(metric="mrr@20", max_relative_drop=0.01, max_latency_ms=50.0, min_lift_over_popularity=0.01)


def _evaluation(mrr: float, fingerprint: str = "split-a") -> dict:
    return {"mrr@20": mrr, "recall@20": 2 * mrr, "dataset_fingerprint": fingerprint}


def test_gate_first_champion() -> None:
    decision = decide_promotion(_evaluation(0.30), None, _evaluation(0.20), GATE, 12.0)
    assert decision.passed and "no champion yet" in decision.reasons[0]
    assert decision.evidence["champion"] is None
    assert decision.evidence["lift_over_popularity"] == pytest.approx(0.10)


def test_gate_within_and_beyond_tolerance() -> None:
    within = decide_promotion(_evaluation(0.2975), _evaluation(0.30), _evaluation(0.20), GATE, 12.0)
    assert within.passed, within.reasons
    assert "challenger 0.2975 vs champion 0.3000 (-0.83%)" in within.reasons[0]
    beyond = decide_promotion(_evaluation(0.2960), _evaluation(0.30), _evaluation(0.20), GATE, 12.0)
    assert not beyond.passed
    assert "(-1.33%), beyond the allowed drop of 1.00% (floor 0.2970)" in beyond.reasons[0]


def test_gate_latency_over_budget_or_unmeasured() -> None:
    slow = decide_promotion(_evaluation(0.35), _evaluation(0.30), _evaluation(0.20), GATE, 80.5)
    assert not slow.passed and "p99 latency 80.50 ms over the budget of 50.0 ms" in slow.reasons
    unmeasured = decide_promotion(_evaluation(0.35), _evaluation(0.30), _evaluation(0.20), GATE, None)
    assert not unmeasured.passed and any("not measured" in r for r in unmeasured.reasons)


def test_gate_needs_lift_over_popularity() -> None:
    decision = decide_promotion(_evaluation(0.205), None, _evaluation(0.20), GATE, 12.0)
    assert not decision.passed
    assert "lift +0.0050 misses the required 0.0100" in decision.reasons[-1]
    assert not decide_promotion(_evaluation(0.3), None, None, GATE, 12.0).passed


def test_gate_refuses_different_test_splits() -> None:
    decision = decide_promotion(_evaluation(0.9), _evaluation(0.30, "split-b"), _evaluation(0.20), GATE, 12.0)
    assert not decision.passed
    assert decision.reasons == [
        "champion was measured on test split split-b but the challenger on split-a: re-evaluate both on the same "
        "split before comparing"
    ]
    unlabelled = decide_promotion({"mrr@20": 0.9}, None, _evaluation(0.20), GATE, 12.0)
    assert not unlabelled.passed and "no dataset_fingerprint" in unlabelled.reasons[0]
    elsewhere = decide_promotion(_evaluation(0.9), None, _evaluation(0.2, "split-b"), GATE, 12.0)
    assert not elsewhere.passed and "popularity was measured on test split split-b" in elsewhere.reasons[0]


def test_a_neural_version_carries_its_candidate_index(sqlite_uri: str, sqlite_store: TrackingStore, data: Data) -> None:
    """Serving's FAISS index is logged with the version and comes back with it, searching exactly as before."""
    from sessionrec.serving.candidates import model_candidate_index
    from sessionrec.serving.model_provider import RegistrySource

    model = create_model("gru4rec", layers=(16,), n_sample=64, max_epochs=1, progress=False, device="cpu")
    report = model.fit(data.train)
    popular = np.argsort(-item_popularity(data.train), kind="stable")
    candidates = model_candidate_index(model, popular, ann_threshold=100)  # HNSW for this small catalogue
    assert candidates is not None and candidates.kind == "hnsw"
    evaluation = {"recall@20": 0.1, "mrr@20": 0.05}
    run = sqlite_store.log_training_run(model, data.index, report, evaluation, {}, {"fingerprint": data.fingerprint},
                                        {}, candidates=candidates)
    registry = Registry(sqlite_uri, "neural-model")
    registry.promote(registry.register(run, evaluation, data.fingerprint), "a neural champion")
    loaded = RegistrySource(sqlite_uri, "neural-model").load(CHAMPION)
    assert loaded.candidates is not None and loaded.candidates.params == candidates.params
    queries = model.session_embeddings(Prefixes([np.array([i]) for i in range(20)], np.zeros(20)))
    assert np.array_equal(loaded.candidates.search(queries, 30)[0], candidates.search(queries, 30)[0])


def test_a_version_logged_before_candidate_indexes_still_loads(
    monkeypatch: pytest.MonkeyPatch, data: Data, tmp_path: Path
) -> None:
    """Models are logged as code: an old version's pyfunc is the old code, without a `candidates` attribute."""
    from types import SimpleNamespace

    from sessionrec.serving.model_provider import RegistrySource

    model = create_model("pop")
    model.fit(data.train)
    old = SimpleNamespace(recommender=SimpleNamespace(), model=model, item_index=data.index,
                          version=SimpleNamespace(version="3"))
    monkeypatch.setattr(Registry, "load_alias", lambda self, alias: old)
    loaded = RegistrySource(f"sqlite:///{tmp_path / 'mlflow.db'}", "any").load(CHAMPION)
    assert (loaded.version, loaded.candidates) == ("3", None)
