"""The one interface every recommender implements: fit on a training split, score the whole catalogue for a
batch of session prefixes, save and load.

Scores are dense ``(batch, n_items)`` float32 arrays over the item indices of the model's `ItemIndex`: the
evaluation ranks the true next item against *all* of them, and serving takes its top-k. Prefixes arrive already
encoded (unknown items removed and counted by the caller via `ItemIndex.encode`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sessionrec.ops.sessiondata import SessionData


@dataclass(frozen=True)
class Prefixes:
    """A batch of session prefixes: item indices in order, and the time of each prefix's last event."""

    items: list[np.ndarray]
    times: np.ndarray  # float64 unix seconds, one per prefix

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class FitReport:
    """What training did, for the tracking store: per-epoch curves and the best validation score."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_valid_mrr: float | None = None
    train_seconds: float = 0.0
    device: str = "cpu"
    events_per_second: float | None = None


class SessionModel(ABC):
    """Base class of all recommenders. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str]

    @abstractmethod
    def fit(self, train: SessionData, valid: SessionData | None = None) -> FitReport:
        """Learn from ``train``; ``valid`` (never the test split) is for early stopping only."""

    @abstractmethod
    def score(self, prefixes: Prefixes) -> np.ndarray:
        """Scores over the full catalogue, shape ``(len(prefixes), n_items)``, higher is better."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write everything needed to score again into ``directory`` (which exists)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path) -> "SessionModel":
        """Inverse of `save`; scores after loading are identical."""

    def params(self) -> dict[str, Any]:
        """Hyper-parameters, for tracking."""
        return {}

    def item_embeddings(self) -> np.ndarray | None:
        """``(n_items, d)`` vectors whose inner product with `session_embeddings` gives `score`, if the model has
        them (neural models); serving builds its FAISS candidate index from them."""
        return None

    def session_embeddings(self, prefixes: Prefixes) -> np.ndarray | None:
        return None
