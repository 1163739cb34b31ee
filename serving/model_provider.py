"""The champion and challenger the service ranks with, loaded from the model registry and swapped atomically.

`ModelProvider.refresh` asks the source which version carries each alias, loads what changed, builds everything a
request needs (`make_servable`: popularity, business rules over the model's catalogue, the FAISS index) and only
then replaces the current `ModelSet` in one assignment. A request holds the set it started with, so a swap never
fails or mixes a request. When the registry does not answer, or a version does not load, the last good models stay
in service and `status` says what went wrong (for `/readyz` and the metrics).

Sources: `RegistrySource` reads the project's MLflow registry; anything with the same two methods works (tests and
the benchmark serve models fitted in-process through `StaticSource`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from sessionrec.config import ServingConfig
from sessionrec.ops.models.base import Prefixes, SessionModel
from sessionrec.ops.sessiondata import ItemIndex
from sessionrec.serving.candidates import CandidateIndex, index_kind, model_candidate_index, single_threaded
from sessionrec.serving.filters import ItemTable
from sessionrec.serving.ranking import ServableModel
from sessionrec.serving.routing import CHALLENGER, CHAMPION, VARIANTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVersion:
    model: SessionModel
    items: ItemIndex
    version: str
    candidates: CandidateIndex | None = None  # the index logged with the version, if it was


class ModelSource(Protocol):
    def versions(self) -> dict[str, str | None]:
        """Version carrying each alias now (None: no version has it); raises when the source does not answer."""

    def load(self, alias: str) -> LoadedVersion: ...


class RegistrySource:
    """The MLflow registry of the project (`integrations.mlflow_registry.Registry`), opened on first use so that
    importing MLflow (seconds) happens on the loader thread, not at import."""

    def __init__(self, uri: str, model_name: str) -> None:
        self.uri = uri
        self.model_name = model_name
        self._registry = None

    def _open(self):  # -> Registry
        if self._registry is None:
            from sessionrec.integrations.mlflow_registry import Registry

            self._registry = Registry(self.uri, self.model_name)
        return self._registry

    def versions(self) -> dict[str, str | None]:
        registry = self._open()
        found = {alias: registry.alias(alias) for alias in VARIANTS}
        return {alias: None if info is None else str(info.version) for alias, info in found.items()}

    def load(self, alias: str) -> LoadedVersion:
        loaded = self._open().load_alias(alias)
        # A version logged by an earlier release runs the pyfunc code logged with it, which has no index.
        candidates = getattr(loaded.recommender, "candidates", None)
        return LoadedVersion(loaded.model, loaded.item_index, str(loaded.version.version), candidates)


@dataclass
class StaticSource:
    """Models already in memory, by alias; `versions` can be changed to simulate a promotion."""

    models: dict[str, LoadedVersion]

    def versions(self) -> dict[str, str | None]:
        return {alias: (self.models[alias].version if alias in self.models else None) for alias in VARIANTS}

    def load(self, alias: str) -> LoadedVersion:
        return self.models[alias]


@dataclass(frozen=True)
class ModelSet:
    champion: ServableModel | None = None
    challenger: ServableModel | None = None

    def get(self, alias: str) -> ServableModel | None:
        return self.champion if alias == CHAMPION else self.challenger


@dataclass
class ProviderStatus:
    registry_reachable: bool | None = None  # None: not asked yet
    last_success: float | None = None
    last_error: str | None = None
    load_errors: dict[str, str] = field(default_factory=dict)
    loaded_at: dict[str, float] = field(default_factory=dict)


def single_threaded_inference() -> None:
    """One native thread per scoring call: requests run in parallel, so per-call thread pools only contend.

    Run it on every thread that scores: torch's setting is process-wide, but OpenMP's (FAISS) belongs to the
    thread that sets it."""
    single_threaded()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def make_servable(loaded: LoadedVersion, alias: str, table: ItemTable, config: ServingConfig) -> ServableModel:
    """Everything one request needs of a model version, computed once at load."""
    model, items = loaded.model, loaded.items
    now = time.time()
    empty = np.asarray(model.score(Prefixes([np.zeros(0, dtype=np.int64)], np.array([now])))[0], dtype=np.float64)
    rules = table.project(items, empty)
    candidates = loaded.candidates
    if candidates is None or candidates.kind != index_kind(len(items), config.ann_threshold_items):
        # Not logged with the version (or logged for another ANN threshold): built here, tuned the same way.
        candidates = model_candidate_index(model, rules.popular_order, config.ann_threshold_items)
    return ServableModel(model.name, loaded.version, alias, model, items, table, rules, candidates)


class ModelProvider:
    """Holds the current `ModelSet`; `refresh` runs on a worker thread (loading takes seconds)."""

    def __init__(self, source: ModelSource, build: Callable[[LoadedVersion, str], ServableModel]) -> None:
        self.source = source
        self.build = build
        self.status = ProviderStatus()
        self._current = ModelSet()
        self._lock = threading.Lock()  # one refresh at a time; readers never take it

    @property
    def current(self) -> ModelSet:
        return self._current

    def refresh(self, force: bool = False) -> ModelSet:
        """Load the versions the aliases point at now (all of them again when ``force``: new business rules)."""
        with self._lock:
            try:
                wanted = self.source.versions()
            except Exception as exc:  # unreachable registry: keep serving the last good models
                self.status.registry_reachable = False
                self.status.last_error = f"registry unreachable: {exc}"
                log.warning("model registry unreachable, serving the last good models: %s", exc)
                return self._current
            self.status.registry_reachable = True
            self.status.last_success = time.time()
            self.status.last_error = None
            if wanted.get(CHALLENGER) == wanted.get(CHAMPION):
                wanted[CHALLENGER] = None  # the same version under both aliases: nothing to compare
            chosen = {alias: self._choose(alias, wanted.get(alias), force) for alias in VARIANTS}
            self._current = ModelSet(**chosen)
            return self._current

    def _choose(self, alias: str, version: str | None, force: bool) -> ServableModel | None:
        current = self._current.get(alias)
        if version is None:
            # A champion alias that disappeared leaves the last champion in service; a challenger is withdrawn.
            return current if alias == CHAMPION else None
        if current is not None and current.version == version and not force:
            return current
        if not force:  # a promoted challenger is already loaded: it changes alias, no reload
            for other in (self._current.champion, self._current.challenger):
                if other is not None and other.version == version:
                    return replace(other, alias=alias)
        try:
            servable = self.build(self.source.load(alias), alias)
        except Exception as exc:
            self.status.load_errors[alias] = f"version {version} failed to load: {exc}"
            log.error("cannot load %s version %s, keeping %s: %s", alias, version,
                      current.label if current else "nothing", exc, exc_info=True)
            return current
        self.status.load_errors.pop(alias, None)
        self.status.loaded_at[alias] = time.time()
        log.info("loaded %s (candidates: %s)", servable.label,
                 servable.candidates.describe() if servable.candidates else "model top-N + popularity")
        return servable
