"""The Dagster code location: every asset, check and job of sessionrec, assembled in one place.

`dagster dev -w workspace.yaml` loads `defs` from here; `sessionrec run` materializes the same graph in-process.
"""

from __future__ import annotations

import dagster as dg

from sessionrec.assets.ingestion import lake_events, raw_events, raw_events_valid
from sessionrec.assets.resources import SessionrecResource
from sessionrec.assets.sessions import session_split, sessions, sessions_valid

DATA_ASSETS = [raw_events, lake_events, sessions, session_split]
DATA_CHECKS = [raw_events_valid, sessions_valid]

main_job = dg.define_asset_job("main", selection=dg.AssetSelection.all(), description="ingest → validate → "
                               "sessionize → split (and, with the model assets, train → evaluate → promote)")



def build_definitions(resource: SessionrecResource) -> dg.Definitions:
    """All definitions bound to one environment's resource (the UI uses the default; the CLI its own)."""
    return dg.Definitions(
        assets=DATA_ASSETS,
        asset_checks=DATA_CHECKS,
        jobs=[main_job],
        resources={"sessionrec": resource},
    )


defs = build_definitions(SessionrecResource())
