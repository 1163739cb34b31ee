"""Dagster resources: the typed settings and the lake, chosen per environment by configuration (not code)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from sessionrec.config import Settings, load_settings
from sessionrec.ops.lake import Lake


class SessionrecResource(dg.ConfigurableResource):
    """Loads the platform settings once per run; assets take their sections from here as values.

    ``config_path``/``profile``/``home`` select the environment: empty values mean `sessionrec.toml` (if any),
    the ``SESSIONREC_PROFILE`` environment variable or `local`, and the state directory of the profile.
    """

    config_path: str = ""
    profile: str = ""
    home: str = ""
    settings_json: str = ""  # a complete Settings as JSON (the CLI passes the settings it built): wins if set

    def settings(self) -> Settings:
        if self.settings_json:
            return Settings.model_validate_json(self.settings_json)
        overrides = {"home": self.home} if self.home else {}
        return load_settings(
            Path(self.config_path) if self.config_path else None,
            profile=self.profile or None,  # type: ignore[arg-type]
            **overrides,
        )

    def lake(self) -> Lake:
        return Lake(self.settings().lake_dir)
