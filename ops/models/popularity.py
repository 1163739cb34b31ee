"""Popularity baselines: the floor every sequential model must clear by a wide margin.

``pop`` scores each item by its number of training events; ``rpop`` by its exponentially decayed number of events
in the last ``days`` days of training (the trend of the moment), with items that have no event in that window
ordered below all others by their overall count (so that the long tail is not one big tie). Both ignore the
session prefix.
"""

from __future__ import annotations

import dataclasses
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sessionrec.ops.models.base import FitReport, Prefixes, SessionModel
from sessionrec.ops.models.registry import ModelError, read_state, write_state
from sessionrec.ops.sessiondata import SessionData


class _StaticScores(SessionModel):
    """A model whose score vector does not depend on the prefix."""

    config_class: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()
        self._scores: np.ndarray | None = None

    @abstractmethod
    def _item_scores(self, train: SessionData) -> np.ndarray:
        """One score per catalogue item, learnt from ``train``."""

    def fit(self, train: SessionData, valid: SessionData | None = None) -> FitReport:
        started = time.perf_counter()
        self._scores = self._item_scores(train).astype(np.float32)
        return FitReport(train_seconds=time.perf_counter() - started)

    def score(self, prefixes: Prefixes) -> np.ndarray:
        if self._scores is None:
            raise ModelError(f"{self.name} is not fitted: call fit() or load a saved model")
        return np.broadcast_to(self._scores, (len(prefixes), len(self._scores))).copy()

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def save(self, directory: Path) -> None:
        if self._scores is None:
            raise ModelError(f"{self.name} is not fitted: nothing to save")
        write_state(directory, self.config, {"scores": self._scores})

    @classmethod
    def load(cls, directory: Path) -> "_StaticScores":
        config, arrays = read_state(directory, cls.name, cls.config_class)
        model = cls(config)
        model._scores = arrays["scores"]
        return model


@dataclass(frozen=True)
class PopularityConfig:
    """Global popularity has no hyper-parameters."""


class Popularity(_StaticScores):
    name = "pop"
    config_class = PopularityConfig

    def _item_scores(self, train: SessionData) -> np.ndarray:
        return np.bincount(train.items, minlength=train.n_items).astype(np.float64)


@dataclass(frozen=True)
class RecentPopularityConfig:
    days: float = 1.0  # window at the end of the training data
    half_life_days: float = 0.5  # an event this long before the last training event counts half

    def __post_init__(self) -> None:
        if self.days <= 0 or self.half_life_days <= 0:
            raise ValueError("days and half_life_days must be positive")


class RecentPopularity(_StaticScores):
    name = "rpop"
    config_class = RecentPopularityConfig

    def _item_scores(self, train: SessionData) -> np.ndarray:
        overall = np.bincount(train.items, minlength=train.n_items).astype(np.float64)
        if train.n_events == 0:
            return overall
        age_days = (train.times.max() - train.times) / 86_400.0
        recent = age_days <= self.config.days
        weights = 0.5 ** (age_days[recent] / self.config.half_life_days)
        decayed = np.bincount(train.items[recent], weights=weights, minlength=train.n_items)
        # Two tiers: items seen in the window score in (1, 2], the others in [0, 1] by their overall count.
        return np.where(decayed > 0, 1.0 + decayed / decayed.max(), overall / max(overall.max(), 1.0))
