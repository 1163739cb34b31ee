"""The asset graph, materialized in-process on real data, and its blocking checks on bad data."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from sessionrec.assets.definitions import DATA_ASSETS, DATA_CHECKS, defs
from sessionrec.assets.resources import SessionrecResource
from sessionrec.config import load_settings
from sessionrec.ops.lake import Lake


def _materialize(home: Path, paths: list[str], fmt: str = "auto", **settings_overrides) -> dg.ExecuteInProcessResult:
    settings = load_settings(home=home, **settings_overrides)
    return dg.materialize(
        [*DATA_ASSETS, *DATA_CHECKS],
        resources={"sessionrec": SessionrecResource(settings_json=settings.model_dump_json())},
        run_config={"ops": {"raw_events": {"config": {"paths": paths, "format": fmt}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    mats = result.asset_materializations_for_node(asset)
    assert mats, f"{asset} was not materialized"
    return {k: getattr(v, "value", v) for k, v in mats[-1].metadata.items()}


def test_definitions_load() -> None:
    assert {k.to_user_string() for k in defs.resolve_all_asset_keys()} >= {
        "raw_events", "lake_events", "sessions", "session_split"}
    assert defs.resolve_job_def("main") is not None


def test_whole_graph_on_real_rees46(shared_data, tmp_path) -> None:
    source = shared_data / "rees46" / "2019-Oct.csv"
    result = _materialize(tmp_path, [str(source)], split={"test_days": 0.01, "valid_days": 0.01},
                          cleaning={"min_item_support": 2})
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    raw = _metadata(result, "raw_events")
    assert raw["rows_in"] == 17_435  # 17,434 complete rows + the truncated last line
    assert raw["rows_in"] == raw["events_valid"] + raw["rows_quarantined"]  # nothing lost
    assert "malformed_line" in str(raw["quarantine_by_reason"])
    lake = _metadata(result, "lake_events")
    assert lake["events_new"] == raw["events_valid"]
    sessions = _metadata(result, "sessions")
    assert 4_500 <= sessions["sessions"] <= 5_066
    split = _metadata(result, "session_split")
    assert split["test_events"] > 0 and split["train_events"] > split["test_events"]
    for name in ("train", "train_tr", "valid", "test"):
        assert (tmp_path / "outputs" / "split" / f"{name}.tsv").is_file()
    # Re-ingesting the same file adds nothing to the lake (idempotent).
    again = _materialize(tmp_path, [str(source)], split={"test_days": 0.01, "valid_days": 0.01},
                         cleaning={"min_item_support": 2})
    assert again.success
    assert _metadata(again, "lake_events")["events_new"] == 0
    assert Lake(tmp_path / "lake").scan_events().collect().height == raw["events_valid"]


def test_blocking_check_stops_on_a_missing_column_and_keeps_the_lake(shared_data, tmp_path) -> None:
    good = shared_data / "yoochoose" / "session-rec" / "yoochoose-clicks-100k_test.txt"
    assert _materialize(tmp_path, [str(good)], fmt="yoochoose").success
    landed = Lake(tmp_path / "lake").scan_events().collect().height
    bad = tmp_path / "bad.csv"
    bad.write_text("session_id,timestamp\ns1,2024-01-01T00:00:00Z\n")  # no item column
    result = _materialize(tmp_path, [str(bad)], fmt="csv")
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["raw_events_valid"].passed
    assert "item_id" in (checks["raw_events_valid"].description or "")
    assert not result.asset_materializations_for_node("lake_events")  # nothing downstream ran
    assert not result.asset_materializations_for_node("sessions")
    assert Lake(tmp_path / "lake").scan_events().collect().height == landed  # nothing lost or overwritten


def test_duplicate_rate_beyond_threshold_fails_the_check(tmp_path) -> None:
    rows = "session_id,item_id,timestamp\n" + "s1,i1,2024-01-01T00:00:00Z\n" * 50 + "s1,i2,2024-01-01T00:01:00Z\n"
    path = tmp_path / "dups.csv"
    path.write_text(rows)
    result = _materialize(tmp_path, [str(path)], fmt="csv")
    assert not result.success
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["raw_events_valid"]
    assert not check.passed and "duplicate" in (check.description or "")
    assert Lake(tmp_path / "lake").scan_events().collect().height == 0


def _materialize_all(home: Path, paths: list[str], fmt: str, **overrides) -> dg.ExecuteInProcessResult:
    from sessionrec.assets.definitions import MODEL_ASSETS, MODEL_CHECKS

    settings = load_settings(home=home, **overrides)
    return dg.materialize(
        [*DATA_ASSETS, *DATA_CHECKS, *MODEL_ASSETS, *MODEL_CHECKS],
        resources={"sessionrec": SessionrecResource(settings_json=settings.model_dump_json())},
        run_config={"ops": {"raw_events": {"config": {"paths": paths, "format": fmt}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_train_evaluate_register_promote_on_real_yoochoose(shared_data, tmp_path) -> None:
    from sessionrec.integrations.mlflow_registry import Registry

    files = shared_data / "yoochoose" / "session-rec"
    result = _materialize_all(
        tmp_path, [str(files / "yoochoose-clicks-100k_train_full.txt"), str(files / "yoochoose-clicks-100k_test.txt")],
        "yoochoose", training={"models": ["pop", "sknn", "vstan"]}, cleaning={"drop_consecutive_repeats": False})
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"raw_events_valid": True, "sessions_valid": True, "challenger_beats_baselines": True}
    evaluation = _metadata(result, "model_evaluation")
    assert evaluation["challenger"] == "vstan"
    assert evaluation["challenger_mrr@20"] > 0.3  # far above popularity (about 0.03) on this split
    champion = _metadata(result, "champion_model")
    assert champion["gate_passed"] is True and champion["champion_version"] == 1
    bento = _metadata(result, "recommender_bento")
    assert bento["built"] is True and bento["bento_tag"].startswith("sessionrec-recommender:")
    settings = load_settings(home=tmp_path)
    versions = Registry(settings.tracking_uri, settings.tracking.registered_model).list_versions()
    assert [v.aliases for v in versions] == [["challenger", "champion"]]


def test_a_challenger_that_cannot_beat_popularity_is_not_registered(shared_data, tmp_path) -> None:
    files = shared_data / "yoochoose" / "session-rec"
    result = _materialize_all(tmp_path, [str(files / "yoochoose-clicks-100k_test.txt")], "yoochoose",
                              training={"models": ["pop"]}, split={"test_days": 0.3, "valid_days": 0.2})
    assert not result.success
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["challenger_beats_baselines"]
    assert not check.passed and "popularity" in (check.description or "")
    assert not result.asset_materializations_for_node("registered_model")
