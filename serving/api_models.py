"""Request and response bodies of the HTTP API, as pydantic models: one source for validation and for the OpenAPI
document.

Request models carry the limits of the configuration (id length and charset, ``k`` bounds, events per request), so
the schema a client reads is the one the service enforces; `request_models` builds them from the settings.
Validation is strict (no "20" for 20) and unknown fields are refused, so that a typo is a 422 that names the field
rather than a silently ignored option.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, create_model

from sessionrec.config import IngestConfig, ServingConfig

FEEDBACK_TYPES = ("impression", "click", "add_to_cart", "purchase")
#: Bounds with no configuration field of their own.
MAX_FILTER_ITEMS = 1_000
MAX_FILTER_CATEGORIES = 100
MAX_CONTEXT_KEYS = 50
MAX_TEXT_LENGTH = 256
#: Any printable text: category names and context keys may contain spaces and punctuation.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_LENGTH, pattern=TEXT_PATTERN)]


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` admits ``15.0``; strict pydantic would not. Accept whole floats, nothing else."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]
#: Context keys are free text: JSON Schema cannot express a pattern on keys the way pydantic checks it.
ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_LENGTH)]
ContextValue = Annotated[str, StringConstraints(max_length=MAX_TEXT_LENGTH)] | int | float | bool | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CanaryRequest(_Body):
    share: float | None = Field(None, ge=0.0, le=1.0, description="share of sessions served by the challenger")
    shadow: bool | None = Field(None, description="challenger also scores champion traffic, off the response path")


# -- responses ---------------------------------------------------------------------------------------------------


class Item(BaseModel):
    item_id: str
    score: float
    reason: Literal["model", "popular", "category_popular"] | None = None


class ModelRef(BaseModel):
    name: str
    version: str
    alias: Literal["champion", "challenger"]


class RecommendResponse(BaseModel):
    request_id: str
    items: list[Item]
    model: ModelRef
    variant: Literal["champion", "challenger"]
    fallback: Literal["empty_session", "timeout", "model_error"] | None
    took_ms: float


class EventsResponse(BaseModel):
    session_id: str
    session_length: int = Field(description="events kept in the session after this append")
    new_session: bool = Field(description="no live session existed under this id (new, expired or timed out)")
    stored: bool = Field(description="false when the session store failed; the events were not kept")


class FeedbackResponse(BaseModel):
    accepted: bool
    attributed: bool = Field(description="model version and variant known to this worker and logged with it")


class ControlResponse(BaseModel):
    canary_share: float
    shadow: bool
    reload_generation: int
    stopped_reason: str | None


class ReloadResponse(BaseModel):
    models: dict[str, str | None] = Field(description="alias -> version served after the reload")
    errors: dict[str, str]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    detail: dict[str, Any]


class Error(BaseModel):
    error: str = Field(description="stable code: bad_request, unauthorized, rate_limited, too_large, not_ready")
    detail: str | list[dict[str, Any]] = Field(description="what was wrong and how to fix it")


@dataclass(frozen=True)
class RequestModels:
    Event: type[BaseModel]
    RecommendRequest: type[BaseModel]
    EventsRequest: type[BaseModel]
    FeedbackRequest: type[BaseModel]


def request_models(serving: ServingConfig, ingest: IngestConfig) -> RequestModels:
    """Request bodies bounded by the configured limits."""
    Id = Annotated[
        str, StringConstraints(min_length=1, max_length=ingest.max_id_length, pattern=ingest.id_pattern)
    ]
    n_events = serving.max_events_per_request
    Event = create_model(
        "Event",
        __base__=_Body,
        item_id=(Id, ...),
        event_type=(Literal[ingest.known_event_types], Field("click")),  # type: ignore[valid-type]
        timestamp=(datetime | None, Field(None, description="when it happened (default: on arrival)")),
    )
    Filters = create_model(
        "Filters",
        __base__=_Body,
        exclude_items=(list[Id], Field(default_factory=list, max_length=MAX_FILTER_ITEMS)),
        include_categories=(
            list[Text],
            Field(default_factory=list, max_length=MAX_FILTER_CATEGORIES, description="only these categories"),
        ),
        exclude_categories=(list[Text], Field(default_factory=list, max_length=MAX_FILTER_CATEGORIES)),
        exclude_seen=(bool, Field(True, description="leave out items already in the session")),
    )
    recommend = create_model(
        "RecommendRequest",
        __base__=_Body,
        session_id=(Id, ...),
        events=(
            list[Event],  # type: ignore[valid-type]
            Field(default_factory=list, max_length=n_events, description="appended to the session first"),
        ),
        k=(Integer, Field(serving.k_default, ge=1, le=serving.k_max, description="number of items to return")),
        filters=(Filters, Field(default_factory=Filters)),  # type: ignore[valid-type]
        context=(
            dict[ContextKey, ContextValue],
            Field(default_factory=dict, max_length=MAX_CONTEXT_KEYS, description="free-form, kept in the log"),
        ),
    )
    events = create_model(
        "EventsRequest",
        __base__=_Body,
        session_id=(Id, ...),
        events=(
            list[Event],  # type: ignore[valid-type]
            Field(min_length=1, max_length=n_events, description="oldest first"),
        ),
    )
    feedback = create_model(
        "FeedbackRequest",
        __base__=_Body,
        request_id=(Id, ...),
        event_type=(Literal[FEEDBACK_TYPES], ...),  # type: ignore[valid-type]
        item_id=(Id | None, None),
        session_id=(Id | None, None),
        timestamp=(datetime | None, None),
    )
    return RequestModels(Event, recommend, events, feedback)
