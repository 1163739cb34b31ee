"""The Dagster code location: every asset, check and job of sessionrec, assembled in one place.

`dagster dev -w workspace.yaml` loads `defs` from here; `sessionrec run` materializes the same graph in-process.
"""

from __future__ import annotations

import dagster as dg

from sessionrec.assets.ingestion import lake_events, raw_events, raw_events_valid
from sessionrec.assets.resources import SessionrecResource
from sessionrec.assets.serving import recommender_bento
from sessionrec.assets.sessions import session_split, sessions, sessions_valid
from sessionrec.assets.training import (
    challenger_beats_baselines,
    champion_model,
    model_evaluation,
    registered_model,
    trained_models,
)

DATA_ASSETS = [raw_events, lake_events, sessions, session_split]
DATA_CHECKS = [raw_events_valid, sessions_valid]
MODEL_ASSETS = [trained_models, model_evaluation, registered_model, champion_model, recommender_bento]
MODEL_CHECKS = [challenger_beats_baselines]

main_job = dg.define_asset_job("main", selection=dg.AssetSelection.all(), description="ingest → validate → "
                               "sessionize → split (and, with the model assets, train → evaluate → promote)")



def build_definitions(resource: SessionrecResource) -> dg.Definitions:
    """All definitions bound to one environment's resource (the UI uses the default; the CLI its own)."""
    return dg.Definitions(
        assets=[*DATA_ASSETS, *MODEL_ASSETS],
        asset_checks=[*DATA_CHECKS, *MODEL_CHECKS],
        jobs=[main_job],
        resources={"sessionrec": resource},
    )


defs = build_definitions(SessionrecResource())
