"""One typed configuration for the whole platform, with a `local` and a `production` profile.

Every module receives the section it needs as a value (``settings.sessions``, ``settings.validation`` ...); nothing
reads environment variables or module-level constants on its own. `load_settings` is the single place where the
configuration file, the profile and the environment are merged, so that a run is reproducible from what it logs.

Precedence (lowest first): defaults of the profile → ``sessionrec.toml`` (or the file given) → ``SESSIONREC_*``
environment variables for the handful of values that differ per machine (state directory, URLs, keys).
"""

from __future__ import annotations

import os
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Profile = Literal["local", "production"]

#: Event types of the canonical schema; dataset-specific types are mapped onto these by the readers.
CANONICAL_EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class IngestConfig(_Section):
    """Row-level rules applied to every event, whatever its source (file or stream)."""

    min_timestamp: str = Field("1995-01-01T00:00:00Z", description="events before this are implausible")
    max_future_skew_minutes: int = Field(24 * 60, ge=0, description="how far past 'now' an event may be stamped")
    max_id_length: int = Field(256, ge=8, le=4096)
    max_field_length: int = Field(4096, ge=64, description="longer raw fields are quarantined, not truncated")
    # Printable ASCII plus the usual id punctuation; control characters and whitespace are refused.
    id_pattern: str = r"^[A-Za-z0-9_.:@/#+=\-]+$"
    extra_event_types: tuple[str, ...] = Field(
        ("remove_from_cart",), description="event types accepted besides the canonical ones (dataset-specific, after mapping)"
    )

    @property
    def known_event_types(self) -> tuple[str, ...]:
        return CANONICAL_EVENT_TYPES + tuple(self.extra_event_types)


class ValidationConfig(_Section):
    """Dataset-level thresholds: crossing one fails the blocking asset check and stops the run."""

    max_duplicate_rate: float = Field(0.2, ge=0, le=1, description="share of duplicate events in one batch")
    max_quarantine_rate: float = Field(0.5, ge=0, le=1, description="share of rows quarantined in one batch")
    gx_sample_rows: int = Field(100_000, ge=1_000, description="rows GX validates per batch (row checks run on all)")
    max_session_length_check: int = Field(10_000, ge=2, description="no session longer than this after capping")
    max_session_hours: float = Field(24 * 30, gt=0, description="sessions lasting longer than this are suspicious")


class SessionConfig(_Section):
    """Sessionization: how events become ordered sessions."""

    timeout_minutes: float = Field(30.0, gt=0, description="inactivity gap that starts a new session for a user")
    allowed_lateness_minutes: float = Field(
        60.0, ge=0, description="an event arriving up to this much behind its session's newest event is reordered"
    )

    @property
    def timeout(self) -> timedelta:
        return timedelta(minutes=self.timeout_minutes)

    @property
    def allowed_lateness(self) -> timedelta:
        return timedelta(minutes=self.allowed_lateness_minutes)


class CleaningConfig(_Section):
    """The standard next-item protocol's cleaning (GRU4Rec / session-rec)."""

    drop_consecutive_repeats: bool = True
    min_session_length: int = Field(2, ge=1)
    min_item_support: int = Field(5, ge=1)
    max_session_length: int = Field(200, ge=2, description="longer sessions keep their last N events")


class SplitConfig(_Section):
    """Temporal split by session end: the last days are the test set, the days before them validation."""

    test_days: float = Field(1.0, gt=0)
    valid_days: float = Field(1.0, gt=0)


class GeneratorConfig(_Section):
    """The synthetic session generator: the demo's embedded data and the scale tests' input.

    Deterministic for a given seed. Drift options shift the distribution from ``drift_start_day`` on, so that
    monitoring has something real to detect.
    """

    n_events: int = Field(200_000, ge=1, le=50_000_000)
    n_items: int = Field(5_000, ge=10)
    n_categories: int = Field(50, ge=1)
    n_users: int = Field(20_000, ge=1)
    days: int = Field(14, ge=1)
    start: str = "2026-01-01T00:00:00Z"
    seed: int = 42
    with_session_ids: bool = Field(True, description="False: only user ids, sessions derived by timeout")
    mean_session_length: float = Field(6.0, gt=1)
    popularity_exponent: float = Field(1.1, gt=0, description="Zipf exponent of item popularity")
    follow_probability: float = Field(0.55, ge=0, le=1, description="next click follows a learned transition")
    repeat_probability: float = Field(0.08, ge=0, le=1, description="the same item again (repeat view)")
    category_switch_probability: float = Field(0.1, ge=0, le=1, description="jump to another category")
    drift_start_day: int | None = Field(None, ge=0, description="day from which the drift options apply")
    drift_new_items: float = Field(0.0, ge=0, le=1, description="share of events on items new at the drift")
    drift_popularity_shift: float = Field(0.0, ge=0, le=1, description="share of popularity mass rotated")


class TrackingConfig(_Section):
    """MLflow tracking and registry; the default is a SQLite file under the state directory."""

    tracking_uri: str | None = Field(None, description="None: sqlite:///<home>/mlflow/mlflow.db")
    experiment: str = "sessionrec"
    registered_model: str = "sessionrec-recommender"


class TrainingConfig(_Section):
    """Which models the main job trains, and where; hyper-parameters live in each model's typed config."""

    models: tuple[str, ...] = Field(
        ("pop", "vsknn", "vstan", "gru4rec", "hybrid"), description="names from ops.models.registry.MODEL_NAMES"
    )
    device: str = Field("auto", description="auto (CUDA when available) | cpu | cuda")
    seed: int = 42
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-model hyper-parameters replacing the defaults"
    )
    log_all_runs: bool = Field(True, description="log every model's run to MLflow, not only the challenger's")


class PromotionConfig(_Section):
    """The automatic gate between the `challenger` and `champion` aliases of the registry."""

    metric: str = Field("mrr@20", description="metric compared on the same test split")
    max_relative_drop: float = Field(0.01, ge=0, le=1, description="challenger may be this much worse (relative)")
    max_latency_ms: float = Field(50.0, gt=0, description="p99 scoring latency per request the challenger must meet")
    min_lift_over_popularity: float = Field(
        0.0, ge=0, description="the challenger must beat the popularity baseline's metric by this much (absolute)"
    )


class ServingConfig(_Section):
    """The recommendation endpoint: limits, fallbacks, canary and the session store."""

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    k_default: int = Field(20, ge=1, le=100)
    k_max: int = Field(100, ge=1, le=1000)
    latency_budget_ms: float = Field(50.0, gt=0, description="past this the request is answered by the fallback")
    candidates: int = Field(200, ge=10, description="candidates fetched from FAISS/kNN/popularity before ranking")
    ann_threshold_items: int = Field(
        20_000, ge=1, description="exact inner-product index below this size (HNSW is 3-4x faster at 50k items)"
    )
    workers: int = Field(
        2, ge=1, le=64, description="server processes; each loads the models (memory://: one, it is per process)"
    )
    batches_in_flight: int = Field(
        1, ge=1, le=16, description="ranking batches per model and process at once (about cores / workers)"
    )
    model_prefix_items: int = Field(
        50, ge=1, description="most recent session items the model encodes (all of them still count as seen)"
    )
    session_store_url: str | None = Field(None, description="None: SQLite under home; memory://; redis://host:port/db")
    session_ttl_seconds: int = Field(24 * 3600, ge=60)
    session_timeout_minutes: float = Field(30.0, gt=0, description="a session id back after this starts afresh")
    max_session_events: int = Field(200, ge=1, description="events kept per session (oldest dropped)")
    max_request_bytes: int = Field(64 * 1024, ge=1024)
    max_events_per_request: int = Field(100, ge=1)
    rate_limit_per_minute: int = Field(60_000, ge=1, description="per API key")
    api_keys: tuple[str, ...] = Field((), description="accepted X-API-Key values (env SESSIONREC_API_KEYS)")
    admin_token: str | None = Field(None, description="token for /admin/* (env SESSIONREC_ADMIN_TOKEN)")
    canary_share: float = Field(0.0, ge=0, le=1, description="share of sessions served by the challenger")
    shadow: bool = Field(False, description="challenger also scores champion traffic, off the response path")
    rollback_min_requests: int = Field(200, ge=1, description="canary requests before the guard judges")
    rollback_error_rate_margin: float = Field(0.02, ge=0, le=1)
    rollback_fallback_rate_margin: float = Field(0.05, ge=0, le=1)
    rollback_p99_margin_ms: float = Field(25.0, ge=0)
    registry_poll_seconds: float = Field(30.0, ge=1)
    blocklist_path: Path | None = Field(None, description="item ids never to serve, one per line")
    availability_path: Path | None = Field(None, description="Parquet/CSV with item_id, available (bool)")

    @model_validator(mode="after")
    def _store_shared_by_workers(self) -> "ServingConfig":
        if self.workers > 1 and (self.session_store_url or "").startswith("memory:"):
            raise ValueError(
                f"serving.workers={self.workers} with the memory:// session store: each process would keep its own "
                "sessions. Use workers = 1, or a store the processes share (the default SQLite file, or redis://)"
            )
        return self


class Settings(_Section):
    profile: Profile = "local"
    home: Path = Field(Path(".sessionrec"), description="state directory: lake, quarantine, Dagster, MLflow")
    ingest: IngestConfig = IngestConfig()
    validation: ValidationConfig = ValidationConfig()
    sessions: SessionConfig = SessionConfig()
    cleaning: CleaningConfig = CleaningConfig()
    split: SplitConfig = SplitConfig()
    tracking: TrackingConfig = TrackingConfig()
    generator: GeneratorConfig = GeneratorConfig()
    training: TrainingConfig = TrainingConfig()
    promotion: PromotionConfig = PromotionConfig()
    serving: ServingConfig = ServingConfig()

    @field_validator("home")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # Derived locations: one function each, so that no module spells a path of its own.
    @property
    def lake_dir(self) -> Path:
        return self.home / "lake"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.tracking_uri or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "mlflow" / "artifacts"

    @property
    def serving_dir(self) -> Path:
        """Session store (SQLite), feedback log and shadow log of the local serving profile."""
        return self.home / "serving"


_PROFILE_DEFAULTS: dict[Profile, dict[str, Any]] = {
    "local": {},
    # Production: shared servers instead of embedded files. URLs come from the environment (never from code).
    "production": {"validation": {"gx_sample_rows": 200_000}},
}

#: Environment variables that override single values: (variable, dotted path in Settings).
_ENV_OVERRIDES: tuple[tuple[str, str], ...] = (
    ("SESSIONREC_HOME", "home"),
    ("SESSIONREC_TRACKING_URI", "tracking.tracking_uri"),
    ("SESSIONREC_SESSION_STORE_URL", "serving.session_store_url"),
    ("SESSIONREC_API_KEYS", "serving.api_keys"),
    ("SESSIONREC_ADMIN_TOKEN", "serving.admin_token"),
)
#: Variables holding comma-separated lists.
_LIST_VARIABLES = {"SESSIONREC_API_KEYS"}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def load_settings(
    path: Path | None = None,
    profile: Profile | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings of one run.

    ``path`` defaults to ``sessionrec.toml`` in the working directory when it exists; ``overrides`` are section
    dicts (``sessions={"timeout_minutes": 10}``) applied last, for the CLI flags.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    config_path = path or (Path("sessionrec.toml") if Path("sessionrec.toml").is_file() else None)
    if config_path is not None:
        if not config_path.is_file():
            raise FileNotFoundError(f"configuration file {config_path} does not exist")
        with config_path.open("rb") as handle:
            try:
                data = tomllib.load(handle)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"configuration file {config_path} is not valid TOML: {exc}") from exc
    chosen: Profile = profile or env.get("SESSIONREC_PROFILE") or data.get("profile", "local")  # type: ignore[assignment]
    if chosen not in _PROFILE_DEFAULTS:
        raise ValueError(f"unknown profile {chosen!r}; choose one of {sorted(_PROFILE_DEFAULTS)}")
    data = _deep_merge(_PROFILE_DEFAULTS[chosen], data)
    data["profile"] = chosen
    for variable, dotted in _ENV_OVERRIDES:
        if env.get(variable):
            value: Any = env[variable]
            if variable in _LIST_VARIABLES:
                value = tuple(part.strip() for part in value.split(",") if part.strip())
            _set_dotted(data, dotted, value)
    data = _deep_merge(data, {k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(data)
