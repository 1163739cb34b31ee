"""The HTTP API in-process (Starlette's test client runs the app and its lifespan): auth, limits, sessions,
feedback and shadow logs, canary routing, the rollback guard, hot reload under load, readiness and metrics.

Models are real (popularity, V-SKNN fitted on a YOOCHOOSE slice) and served through a `StaticSource`, so that a
test can move the aliases; the registry-backed path is tested over a real `bentoml serve` in
test_serving_bento.py.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from starlette.testclient import TestClient

from sessionrec.config import Settings
from sessionrec.ops.models.base import SessionModel
from sessionrec.ops.models.registry import create_model
from sessionrec.ops.sessiondata import ItemIndex, SessionData, read_split_tsv
from sessionrec.serving.app import RecommenderApp
from sessionrec.serving.model_provider import LoadedVersion, StaticSource
from sessionrec.serving.routing import CHALLENGER, CHAMPION, assign_variant

TRAIN = "yoochoose/session-rec/yoochoose-clicks-100k_train_full.txt"
KEY, ADMIN = "test-key-1", "test-admin-token"
AUTH, ADMIN_AUTH = {"X-API-Key": KEY}, {"X-Admin-Token": ADMIN}


@dataclass(frozen=True)
class Models:
    index: ItemIndex
    pop: SessionModel
    vsknn: SessionModel
    sessions: list[list[str]]  # real training sessions as item ids


@pytest.fixture(scope="module")
def models(shared_data: Path) -> Models:
    frame = read_split_tsv(shared_data / TRAIN).head(20_000)
    index = ItemIndex.from_items(frame["ItemId"])
    train, _ = SessionData.from_frame(frame, index)
    pop, vsknn = create_model("pop"), create_model("vsknn")
    pop.fit(train)
    vsknn.fit(train)
    sessions = [index.decode(train.session(s)[0]) for s in range(train.n_sessions)]
    return Models(index, pop, vsknn, [s for s in sessions if len(s) >= 3][:500])


class FlakySource(StaticSource):
    """A static source whose registry can be made unreachable."""

    reachable = True

    def versions(self) -> dict[str, str | None]:
        if not self.reachable:
            raise ConnectionError("registry database refused the connection")
        return super().versions()


def _settings(tmp_path: Path, **serving: Any) -> Settings:
    values = {"api_keys": (KEY, "other-key"), "admin_token": ADMIN, "session_store_url": "memory://", "workers": 1,
              "latency_budget_ms": 2_000.0, "registry_poll_seconds": 1.0, **serving}
    return Settings(home=tmp_path / "home", serving=values)


@contextmanager
def serving(
    settings: Settings, source: StaticSource, ready: bool = True
) -> Iterator[tuple[TestClient, RecommenderApp]]:
    api = RecommenderApp(settings, lambda: source)
    with TestClient(api) as client:
        if ready:
            deadline = time.monotonic() + 30
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").json()
                time.sleep(0.05)
        yield client, api


def _source(models: Models, challenger: SessionModel | None = None) -> FlakySource:
    loaded = {CHAMPION: LoadedVersion(models.pop, models.index, "1")}
    if challenger is not None:
        loaded[CHALLENGER] = LoadedVersion(challenger, models.index, "2")
    return FlakySource(loaded)


def _recommend(client: TestClient, session_id: str, items: list[str] = (), **extra: Any) -> Any:
    body = {"session_id": session_id, "events": [{"item_id": i} for i in items], **extra}
    return client.post("/recommend", json=body, headers=AUTH)


def test_recommend_answers_with_model_and_version(models: Models, tmp_path: Path) -> None:
    with serving(_settings(tmp_path), _source(models)) as (client, _):
        response = _recommend(client, "s-1", models.sessions[0], k=7)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": "pop", "version": "1", "alias": "champion"}
        assert body["variant"] == "champion" and body["fallback"] is None
        assert len(body["items"]) == 7 and response.headers["X-Model-Version"] == "1"
        assert not {i["item_id"] for i in body["items"]} & set(models.sessions[0])
        assert body["took_ms"] > 0 and len(body["request_id"]) == 32


def test_authentication(models: Models, tmp_path: Path) -> None:
    with serving(_settings(tmp_path), _source(models)) as (client, _):
        body = {"session_id": "s", "k": 3}
        missing = client.post("/recommend", json=body)
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
        assert client.post("/recommend", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/recommend", json=body, headers={"X-API-Key": "other-key"}).status_code == 200
        assert client.post("/events", json={"session_id": "s", "events": [{"item_id": "a"}]}).status_code == 401
        assert client.post("/feedback", json={"request_id": "r", "event_type": "click"}).status_code == 401
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"X-Admin-Token": "nope"}).status_code == 401
        assert client.post("/admin/reload", headers=AUTH).status_code == 401  # an API key is no admin token
        assert client.get("/admin/canary", headers=ADMIN_AUTH).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert client.get(open_path).status_code == 200
    with serving(_settings(tmp_path, admin_token=None), _source(models)) as (client, _):
        disabled = client.post("/admin/canary", json={"share": 0.5}, headers=ADMIN_AUTH)
        assert disabled.status_code == 403 and "SESSIONREC_ADMIN_TOKEN" in disabled.json()["detail"]


def test_no_api_keys_refuses_to_start(tmp_path: Path, models: Models) -> None:
    api = RecommenderApp(_settings(tmp_path, api_keys=()), lambda: _source(models))
    with pytest.raises(Exception, match="SESSIONREC_API_KEYS"):
        with TestClient(api):
            pass


def test_rate_limit_per_key(models: Models, tmp_path: Path) -> None:
    with serving(_settings(tmp_path, rate_limit_per_minute=60), _source(models)) as (client, _):
        statuses = [_recommend(client, "s").status_code for _ in range(12)]
        assert statuses[:10] == [200] * 10 and statuses[-1] == 429  # a burst of 10 s at 1 request/s
        limited = _recommend(client, "s")
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        other = client.post("/recommend", json={"session_id": "s"}, headers={"X-API-Key": "other-key"})
        assert other.status_code == 200  # the limit is per key


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"session_id": "x" * 300}, "session_id"),
        ({"session_id": "has space"}, "session_id"),
        ({"session_id": "s", "k": 0}, "k"),
        ({"session_id": "s", "k": 101}, "k"),
        ({"session_id": "s", "k": "5"}, "k"),
        ({"session_id": "s", "events": [{"item_id": "a"}] * 101}, "events"),
        ({"session_id": "s", "events": [{"item_id": "a\nb"}]}, "events.0.item_id"),
        ({"session_id": "s", "events": [{"item_id": "a", "event_type": "teleport"}]}, "events.0.event_type"),
        ({"session_id": "s", "filters": {"exclude_items": ["bad id"]}}, "filters.exclude_items.0"),
        ({"session_id": "s", "colour": "red"}, "colour"),
        ({}, "session_id"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(models: Models, tmp_path: Path, body: dict, field: str) -> None:
    with serving(_settings(tmp_path), _source(models)) as (client, _):
        response = client.post("/recommend", json=body, headers=AUTH)
        assert response.status_code == 422, response.text
        assert field in {error["field"] for error in response.json()["detail"]}


def test_malformed_and_oversized_bodies(models: Models, tmp_path: Path) -> None:
    with serving(_settings(tmp_path, max_request_bytes=2048), _source(models)) as (client, _):
        big = {"session_id": "s", "context": {f"k{i}": "v" * 200 for i in range(20)}}
        too_large = client.post("/recommend", json=big, headers=AUTH)
        assert too_large.status_code == 413 and "2048" in too_large.json()["detail"]
        chunked = client.post("/recommend", content=iter([b'{"session_id": "s", "context": {"a": "', b"v" * 4000,
                                                          b'"}}']), headers=AUTH)
        assert chunked.status_code == 413
        assert client.post("/recommend", content=b"{not json", headers=AUTH).status_code == 422
        empty = client.post("/recommend", content=b"", headers=AUTH)
        assert empty.status_code == 422 and "empty" in empty.json()["detail"]


def test_server_side_sessions(models: Models, tmp_path: Path) -> None:
    session = models.sessions[1]
    with serving(_settings(tmp_path, session_timeout_minutes=0.02), _source(models, models.vsknn)) as (client, _):
        first = client.post("/events", json={"session_id": "u1", "events": [{"item_id": i} for i in session[:2]]},
                            headers=AUTH).json()
        assert first == {"session_id": "u1", "session_length": 2, "new_session": True, "stored": True}
        second = client.post("/events", json={"session_id": "u1", "events": [{"item_id": session[2]}]},
                             headers=AUTH).json()
        assert second["session_length"] == 3 and not second["new_session"]
        # /recommend without events ranks the stored session: its items are left out of the answer.
        answer = _recommend(client, "u1", k=20).json()
        assert not {i["item_id"] for i in answer["items"]} & set(session[:3])
        time.sleep(1.5)  # past the 1.2 s inactivity timeout: the id starts a new session
        again = client.post("/events", json={"session_id": "u1", "events": [{"item_id": session[0]}]},
                            headers=AUTH).json()
        assert again["session_length"] == 1 and again["new_session"]


def test_store_failure_still_answers(models: Models, tmp_path: Path) -> None:
    settings = _settings(tmp_path, session_store_url="redis://127.0.0.1:1/0", latency_budget_ms=50.0)
    with serving(settings, _source(models)) as (client, _):
        answer = _recommend(client, "s", models.sessions[0], k=5)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 5
        assert not {i["item_id"] for i in answer.json()["items"]} & set(models.sessions[0])
        events = client.post("/events", json={"session_id": "s", "events": [{"item_id": "a"}]}, headers=AUTH)
        assert events.status_code == 200 and events.json()["stored"] is False
        ready = client.get("/readyz").json()
        assert ready["ready"] and ready["detail"]["session_store"]["error"]
        assert 'sessionrec_errors_total{kind="session_store"}' in client.get("/metrics").text


def test_feedback_and_request_logs(models: Models, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with serving(settings, _source(models)) as (client, _):
        answer = _recommend(client, "s-9", models.sessions[2], k=3).json()
        item = answer["items"][0]["item_id"]
        feedback = client.post("/feedback", json={"request_id": answer["request_id"], "event_type": "click",
                                                  "item_id": item}, headers=AUTH)
        assert feedback.status_code == 202 and feedback.json() == {"accepted": True, "attributed": True}
        unknown = client.post("/feedback", json={"request_id": "from-another-worker", "event_type": "purchase"},
                              headers=AUTH)
        assert unknown.json() == {"accepted": True, "attributed": False}
    # Shutting down flushed the logs: monitoring reads them as Parquet datasets.
    clicks = pl.read_parquet(settings.serving_dir / "feedback" / "**" / "*.parquet")
    row = clicks.filter(pl.col("request_id") == answer["request_id"]).row(0, named=True)
    assert (row["event_type"], row["item_id"], row["model_version"], row["variant"], row["session_id"]) == (
        "click", item, "1", "champion", "s-9")
    requests = pl.read_parquet(settings.serving_dir / "requests" / "**" / "*.parquet")
    served = requests.filter(pl.col("request_id") == answer["request_id"]).row(0, named=True)
    assert served["items"] == [i["item_id"] for i in answer["items"]] and served["model_version"] == "1"


def test_canary_share_and_stickiness(models: Models, tmp_path: Path) -> None:
    with serving(_settings(tmp_path), _source(models, models.vsknn)) as (client, _):
        changed = client.post("/admin/canary", json={"share": 0.3}, headers=ADMIN_AUTH)
        assert changed.status_code == 200 and changed.json()["canary_share"] == 0.3
        ids = [f"session-{n}" for n in range(300)]
        seen = {s: _recommend(client, s, k=3).json() for s in ids}
        for s in ids[:50]:  # sticky: the same session gets the same variant again
            assert _recommend(client, s, k=3).json()["variant"] == seen[s]["variant"]
        for s, body in seen.items():
            assert body["variant"] == assign_variant(s, 0.3)
            assert body["model"]["version"] == ("2" if body["variant"] == CHALLENGER else "1")
        share = sum(body["variant"] == CHALLENGER for body in seen.values()) / len(ids)
        assert 0.2 < share < 0.4
        metrics = client.get("/metrics").text
        assert "sessionrec_canary_share 0.3" in metrics
        assert 'sessionrec_request_latency_seconds_count{endpoint="recommend",variant="challenger"}' in metrics


def test_shadow_scores_champion_traffic_off_the_response_path(models: Models, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with serving(settings, _source(models, models.vsknn)) as (client, _):
        assert client.post("/admin/canary", json={"shadow": True}, headers=ADMIN_AUTH).json()["shadow"]
        answers = [_recommend(client, f"s{n}", models.sessions[n], k=5).json() for n in range(20)]
        assert {a["variant"] for a in answers} == {CHAMPION}
        time.sleep(0.5)
    shadow = pl.read_parquet(settings.serving_dir / "shadow" / "**" / "*.parquet")
    assert set(shadow["request_id"]) == {a["request_id"] for a in answers}
    row = shadow.filter(pl.col("request_id") == answers[0]["request_id"]).row(0, named=True)
    assert row["champion_items"] == [i["item_id"] for i in answers[0]["items"]]
    assert (row["champion_version"], row["challenger_version"]) == ("1", "2")
    assert len(row["challenger_items"]) == 5 and row["challenger_items"] != row["champion_items"]


def _faulty_model_class() -> type[SessionModel]:
    """`Faulty` of the ranking tests: a real model that raises when it scores (test modules cannot import each
    other by name under pytest's importlib mode)."""
    spec = importlib.util.spec_from_file_location("serving_ranking_tests", Path(__file__).with_name(
        "test_serving_ranking.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module.Faulty


def test_a_model_failing_its_load_check_is_not_served(models: Models, tmp_path: Path) -> None:
    source = _source(models, _faulty_model_class()(models.vsknn))
    with serving(_settings(tmp_path, canary_share=1.0), source) as (client, _):
        assert "version 2 failed to load" in client.get("/readyz").json()["detail"]["load_errors"]["challenger"]
        assert _recommend(client, "s", models.sessions[0]).json()["model"]["version"] == "1"


def test_rollback_guard_stops_a_failing_canary(models: Models, tmp_path: Path) -> None:
    Faulty = _faulty_model_class()
    settings = _settings(tmp_path, canary_share=0.5, rollback_min_requests=20)
    with serving(settings, _source(models, Faulty(models.vsknn, healthy_calls=1))) as (client, _):
        answers = [_recommend(client, f"s{n}", models.sessions[n % 100], k=3) for n in range(300)]
        variants = [answer.json()["variant"] for answer in answers]
        assert CHALLENGER in variants[:100]
        control = client.get("/admin/canary", headers=ADMIN_AUTH).json()
        assert control["canary_share"] == 0.0 and "error rate" in control["stopped_reason"]
        assert set(variants[-50:]) == {CHAMPION}
        metrics = client.get("/metrics").text
        assert "sessionrec_canary_rollbacks_total 1.0" in metrics
        assert 'sessionrec_fallbacks_total{reason="model_error",variant="challenger"}' in metrics


def test_hot_reload_under_load_without_errors(models: Models, tmp_path: Path) -> None:
    source = _source(models)
    with serving(_settings(tmp_path), source) as (client, _):
        results: dict[int, list[tuple[int, str | None, str | None]]] = {w: [] for w in range(4)}
        stop = threading.Event()

        def hammer(worker: int) -> None:
            n = 0
            while not stop.is_set():
                response = _recommend(client, f"w{worker}-{n}", models.sessions[n % 100], k=5)
                body = response.json()
                version = body.get("model", {}).get("version")
                results[worker].append((response.status_code, version, body.get("fallback")))
                n += 1

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        source.models[CHAMPION] = LoadedVersion(models.vsknn, models.index, "2")
        reload = client.post("/admin/reload", headers=ADMIN_AUTH)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
    assert reload.status_code == 200 and reload.json() == {"models": {"champion": "2", "challenger": None},
                                                            "errors": {}}
    answers = [answer for worker in results.values() for answer in worker]
    assert len(answers) > 20
    assert {status for status, _, _ in answers} == {200}
    assert {fallback for _, _, fallback in answers} == {None}
    for worker in results.values():  # each worker's requests follow each other: one swap, never back
        versions = [version for _, version, _ in worker]
        assert versions[0] == "1" and versions[-1] == "2" and versions == sorted(versions)


def test_promoting_the_challenger_reuses_it(models: Models, tmp_path: Path) -> None:
    source = _source(models, models.vsknn)
    with serving(_settings(tmp_path), source) as (client, api):
        challenger = api.runtime.provider.current.challenger
        source.models = {CHAMPION: source.models[CHALLENGER]}  # the registry's promotion of version 2
        provider = api.runtime.provider
        provider.refresh()
        champion = provider.current.champion
        assert (champion.version, champion.alias, provider.current.challenger) == ("2", "champion", None)
        assert champion.rules is challenger.rules  # the loaded challenger changed alias, nothing was rebuilt
        assert _recommend(client, "s", models.sessions[0]).json()["model"] == {
            "name": "vsknn", "version": "2", "alias": "champion"}


def test_unreachable_registry_keeps_the_last_good_model(models: Models, tmp_path: Path) -> None:
    source = _source(models)
    with serving(_settings(tmp_path), source) as (client, _):
        source.reachable = False
        reload = client.post("/admin/reload", headers=ADMIN_AUTH).json()
        assert reload["models"]["champion"] == "1" and "unreachable" in reload["errors"]["registry"]
        ready = client.get("/readyz")
        assert ready.status_code == 200
        detail = ready.json()["detail"]["registry"]
        assert detail["reachable"] is False and detail["serving_last_good_models"]
        assert _recommend(client, "s", k=3).json()["model"]["version"] == "1"
        metrics = client.get("/metrics").text
        assert "sessionrec_registry_up 0.0" in metrics
        assert 'sessionrec_model_info{alias="champion",name="pop",version="1"} 1.0' in metrics


def test_not_ready_without_a_champion(tmp_path: Path) -> None:
    with serving(_settings(tmp_path), FlakySource({}), ready=False) as (client, api):
        deadline = time.monotonic() + 30
        while api.runtime is None or not api.runtime.polled:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "champion" in ready.json()["detail"]["reason"]
        answer = client.post("/recommend", json={"session_id": "s"}, headers=AUTH)
        assert answer.status_code == 503 and answer.json()["error"] == "not_ready"
        assert client.get("/healthz").json() == {"status": "ok"}
