"""A weighted blend of two recommenders (by default VSTAN and GRU4Rec), with the blend fitted on validation data.

Why: neighbourhood models and neural sequence models err on different prefixes (kNN is strong on popular, recent
co-occurrences; the RNN generalises along sequences), so a blend of their per-prefix normalised scores can beat
both.

* Scores of each component are normalised per prefix before mixing, because their scales are unrelated:
  ``minmax`` maps each row to [0, 1]; ``rank`` replaces a score by 1 / (its competition rank), so only the
  orderings matter. ``auto`` picks the better of the two on the validation data.
* The weight ``w`` of the first component (the second gets ``1 - w``) is chosen on a grid of ``weight_steps + 1``
  values by the validation objective. The validation data are the sessions that end in the last ``valid_days`` of
  the training data (`carve_validation`, items restricted to the earlier part), never the test split.
* Already fitted components can be passed in (the experiment runner trains GRU4Rec once, on the same carve, and
  hands it over); they must have been fitted on the carved training part only. Non-neural components are cheap,
  so once the blend is fixed they are rebuilt on *all* training data (``refit_on_train``): the newest sessions
  and items are the most valuable ones for a neighbourhood model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from sessionrec.ops.evaluation import (
    LIST_LENGTH,
    carve_validation,
    iter_prefix_batches,
    metrics_from_ranks,
)
from sessionrec.ops.models.base import FitReport, Prefixes, SessionModel
from sessionrec.ops.models.registry import (
    MODEL_NAMES,
    NEURAL_MODELS,
    ModelError,
    create_model,
    load_model,
    read_state,
    save_model,
    write_state,
)
from sessionrec.ops.sessiondata import SessionData

Normalisation = Literal["minmax", "rank"]
NORMALISATIONS: tuple[Normalisation, ...] = ("minmax", "rank")


@dataclass(frozen=True)
class HybridConfig:
    components: tuple[str, str] = ("vstan", "gru4rec")
    normalisation: Literal["auto", "minmax", "rank"] = "auto"
    weight_steps: int = 20
    objective: Literal["recall@20", "mrr@20", "recall@20+mrr@20"] = "recall@20+mrr@20"
    valid_days: float = 1.0  # the blend is fitted on the sessions ending in the last valid_days of training
    refit_on_train: bool = True  # rebuild non-neural components on all training data once the blend is fixed

    def __post_init__(self) -> None:
        if len(self.components) != 2 or self.components[0] == self.components[1]:
            raise ValueError(f"components must be two different model names, got {self.components}")
        bad = [c for c in self.components if c not in MODEL_NAMES or c == "hybrid"]
        if bad:
            raise ValueError(f"components {bad} are not blendable models; choose from {MODEL_NAMES[:-1]}")
        if self.weight_steps < 1:
            raise ValueError(f"weight_steps must be at least 1, got {self.weight_steps}")
        if self.valid_days <= 0:
            raise ValueError(f"valid_days must be positive, got {self.valid_days}")


def normalise(scores: np.ndarray, method: Normalisation) -> np.ndarray:
    """Per-row normalisation of a score matrix; non-finite scores (NaN, +-inf) count as the row's lowest."""
    finite = np.isfinite(scores)
    low = np.min(np.where(finite, scores, np.inf), axis=1, keepdims=True, initial=np.inf)
    scores = np.where(finite, scores, np.where(np.isfinite(low), low, 0.0)).astype(np.float64)
    if method == "rank":
        order = np.argsort(-scores, axis=1)  # the order among equal scores does not matter: they share a rank
        ordered = np.take_along_axis(scores, order, axis=1)
        starts_group = np.ones(ordered.shape, dtype=bool)
        starts_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        # Competition rank: equal scores share the rank of the first of them.
        rank = np.maximum.accumulate(np.where(starts_group, np.arange(scores.shape[1]), 0), axis=1) + 1
        out = np.empty_like(scores)
        np.put_along_axis(out, order, 1.0 / rank, axis=1)
        return out
    low = scores.min(axis=1, keepdims=True, initial=np.inf)
    span = scores.max(axis=1, keepdims=True, initial=-np.inf) - low
    return np.where(span > 0, (scores - low) / np.where(span > 0, span, 1.0), 0.0)


class Hybrid(SessionModel):
    name = "hybrid"
    config_class: ClassVar[type] = HybridConfig

    def __init__(self, config: HybridConfig | None = None, components: Mapping[str, SessionModel] | None = None):
        self.config = config if config is not None else HybridConfig()
        unknown = sorted(set(components or {}) - set(self.config.components))
        if unknown:
            raise ModelError(f"hybrid: components {unknown} given but the blend uses {self.config.components}")
        self._given = dict(components or {})
        self._models: dict[str, SessionModel] = {}
        self.weight: float | None = None
        self.normalisation: Normalisation | None = None
        #: validation metrics of every (normalisation, weight) tried, and of the chosen blend
        self.validation: list[dict[str, Any]] = []

    def fit(self, train: SessionData, valid: SessionData | None = None) -> FitReport:
        """Fit the blend on the last ``valid_days`` of ``train``, then the non-neural components on all of it.

        ``valid`` is not used: the hybrid carves its own validation split from ``train`` (the same carve the
        experiment runner gives neural models for early stopping), so that its neighbourhood component ends up
        built on *all* of ``train``, including the newest sessions and items.
        """
        started = time.perf_counter()
        train_tr, held_out = carve_validation(train, self.config.valid_days)
        if held_out.n_sessions == 0:
            raise ModelError("hybrid: the validation split is empty; the blend weight cannot be fitted")
        models: dict[str, SessionModel] = {}
        for name in self.config.components:
            if name in self._given:
                models[name] = self._given[name]
            else:
                models[name] = create_model(name)
                models[name].fit(train_tr, held_out)
        self._fit_blend(models, held_out)
        if self.config.refit_on_train:
            for name in self.config.components:
                if name not in NEURAL_MODELS:
                    models[name] = create_model(name, **models[name].params())
                    models[name].fit(train)
        self._models = models
        chosen = next(r for r in self.validation if r.get("chosen"))
        return FitReport(train_seconds=time.perf_counter() - started, best_valid_mrr=chosen[f"mrr@{LIST_LENGTH}"])

    def _fit_blend(self, models: Mapping[str, SessionModel], valid: SessionData) -> None:
        first, second = (models[name] for name in self.config.components)
        methods = NORMALISATIONS if self.config.normalisation == "auto" else (self.config.normalisation,)
        weights = np.linspace(0.0, 1.0, self.config.weight_steps + 1)
        ranks: dict[tuple[str, float], list[np.ndarray]] = {(m, w): [] for m in methods for w in weights}
        for batch in iter_prefix_batches(valid):
            raw = first.score(batch.prefixes), second.score(batch.prefixes)
            rows = np.arange(len(batch.targets))
            for method in methods:
                a, b = normalise(raw[0], method), normalise(raw[1], method)
                a -= a[rows, batch.targets][:, None]
                b -= b[rows, batch.targets][:, None]
                counts = _blend_ranks(a, b, weights)
                for g, w in enumerate(weights):
                    ranks[(method, w)].append(counts[:, g])
        results = []
        for (method, w), parts in ranks.items():
            metrics = metrics_from_ranks(np.concatenate(parts), (LIST_LENGTH,))
            results.append({"normalisation": method, "weight": float(w), **{k: metrics[k] for k in _OBJECTIVE}})
        best = max(range(len(results)), key=lambda i: _objective(results[i], self.config.objective))
        results[best]["chosen"] = True
        self.validation = results
        self.normalisation, self.weight = results[best]["normalisation"], results[best]["weight"]

    def replace_component(self, name: str, model: SessionModel) -> None:
        """Swap a fitted component for the same model trained on more data, keeping the blend.

        The experiment runner tunes the blend with a neural component trained on the carved part (so the
        validation day is unseen), then hands in the same model retrained on all training data for the best
        number of epochs — what the non-neural components get through ``refit_on_train``.
        """
        if name not in self._models:
            raise ModelError(f"hybrid: no fitted component {name!r} to replace (components {self.config.components})")
        self._models[name] = model

    def score(self, prefixes: Prefixes) -> np.ndarray:
        if self.weight is None or self.normalisation is None or not self._models:
            raise ModelError("hybrid is not fitted: call fit() or load a saved model")
        first, second = (self._models[name] for name in self.config.components)
        blended = self.weight * normalise(first.score(prefixes), self.normalisation)
        blended += (1.0 - self.weight) * normalise(second.score(prefixes), self.normalisation)
        return blended.astype(np.float32)

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def save(self, directory: Path) -> None:
        if self.weight is None or self.normalisation is None:
            raise ModelError("hybrid is not fitted: nothing to save")
        fitted = {"weight": np.array(self.weight), "normalisation": np.array(self.normalisation)}
        write_state(directory, self.config, fitted)
        for name, model in self._models.items():
            save_model(model, Path(directory) / name)

    @classmethod
    def load(cls, directory: Path) -> "Hybrid":
        config, arrays = read_state(directory, cls.name, HybridConfig)
        model = cls(config)
        model.weight = float(arrays["weight"])
        model.normalisation = str(arrays["normalisation"])  # type: ignore[assignment]
        model._models = {name: load_model(Path(directory) / name) for name in config.components}
        return model


_OBJECTIVE = (f"recall@{LIST_LENGTH}", f"mrr@{LIST_LENGTH}")


def _objective(row: Mapping[str, Any], objective: str) -> float:
    return float(sum(row[key] for key in objective.split("+")))


def _blend_ranks(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pessimistic rank of each row's target under every blend ``w * a + (1 - w) * b``, as a (rows, weights) array.

    ``a`` and ``b`` hold the scores *minus the target's score*. An item is at or above the target iff
    ``b + w (a - b) >= 0``, a condition linear in ``w``: it holds on a prefix or a suffix of the weight grid. So
    each item adds 1 to a contiguous range of grid cells (a difference array) instead of being tested per weight.
    """
    n_rows, n_weights = a.shape[0], len(weights)
    row, col = np.nonzero((a >= 0) | (b >= 0))  # items below the target in both are below it in every blend
    da, db = a[row, col], b[row, col]
    first = np.zeros(len(row), dtype=np.int64)  # first grid index where the item is at or above the target
    last = np.full(len(row), n_weights - 1, dtype=np.int64)
    rising = db < 0  # then da >= 0: holds for w >= -db / (da - db)
    first[rising] = np.searchsorted(weights, -db[rising] / (da[rising] - db[rising]), side="left")
    falling = da < 0  # then db >= 0: holds for w <= db / (db - da)
    last[falling] = np.searchsorted(weights, db[falling] / (db[falling] - da[falling]), side="right") - 1
    valid = first <= last
    cell = row[valid] * (n_weights + 1)
    size = n_rows * (n_weights + 1)
    diff = np.bincount(cell + first[valid], minlength=size) - np.bincount(cell + last[valid] + 1, minlength=size)
    return np.cumsum(diff.reshape(n_rows, n_weights + 1)[:, :-1], axis=1)
