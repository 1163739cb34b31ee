"""Train and evaluate a list of models on one train/test split with the exact protocol of `ops.evaluation`.

What each model learns from:

* the item catalogue is the training data's (`ItemIndex` built on ``train``); test events on other items are
  dropped and counted;
* the validation split is carved from ``train`` by time (`carve_validation`: sessions ending in the last
  ``valid_days``, items restricted to the earlier part); neural models train on the rest and early-stop on it;
  the hybrid fits its blend on the same carve;
* all other models (popularity, kNN) are built on the whole of ``train``: they need no validation, and the
  newest sessions matter most to them.

The hybrid reuses the neural component trained in the same run (trained on demand when the run does not list
it), so GRU4Rec is never trained twice; its kNN component costs well under a second to rebuild.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl

from sessionrec.ops.evaluation import carve_validation, evaluate
from sessionrec.ops.models.base import FitReport, SessionModel
from sessionrec.ops.models.hybrid import Hybrid, HybridConfig
from sessionrec.ops.models.registry import MODEL_NAMES, NEURAL_MODELS, ModelError, make_config, model_class
from sessionrec.ops.sessiondata import SPLIT_COLUMNS, ItemIndex, SessionData

def _counts(data: SessionData) -> dict[str, int]:
    return {
        "events": data.n_events,
        "sessions": data.n_sessions,
        "items": int(len(np.unique(data.items))),
    }


def fingerprint(index: ItemIndex, *parts: SessionData) -> str:
    """Identity of the split: the catalogue and every encoded session array (order included)."""
    digest = hashlib.sha256("\n".join(index.item_ids.tolist()).encode())
    for data in parts:
        for array in (data.offsets, data.items, data.times):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _check_frame(frame: pl.DataFrame, role: str) -> None:
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise ModelError(f"{role} frame lacks column(s) {missing}; expected the columns {list(SPLIT_COLUMNS)}")
    if frame.height == 0:
        raise ModelError(f"{role} frame is empty: nothing to {'learn from' if role == 'train' else 'evaluate'}")


class _Run:
    """One evaluation run: the encoded data, the run settings and the models fitted so far."""

    def __init__(self, train: SessionData, overrides: dict[str, dict], settings: dict[str, Any]) -> None:
        self.train = train
        self.train_tr, self.valid = carve_validation(train, settings["valid_days"])
        self.overrides = overrides
        self.settings = settings
        #: neural name -> (early-stopped on the carve, final model, report, seconds of both trainings)
        self.neural: dict[str, tuple[SessionModel, SessionModel, FitReport, float]] = {}

    def config(self, name: str) -> Any:
        """Defaults, then the run settings the model's config has a field for, then the user's overrides."""
        config_class = model_class(name).config_class  # type: ignore[attr-defined]
        fields = {f.name for f in dataclasses.fields(config_class)}
        values = {k: v for k, v in self.settings.items() if k in fields}
        values.update(self.overrides.get(name, {}))
        return make_config(name, config_class, values)

    def create(self, name: str, **extra: Any) -> SessionModel:
        config = self.config(name)
        return model_class(name)(dataclasses.replace(config, **extra) if extra else config)  # type: ignore[call-arg]

    def fit(self, name: str) -> tuple[SessionModel, FitReport, float]:
        """The final model, its report and its training wall time; neural models are fitted once per run."""
        if name == "hybrid":
            return self._fit_hybrid()
        if name in NEURAL_MODELS:
            _, final, report, seconds = self._fit_neural(name)
            return final, report, seconds
        model = self.create(name)
        started = time.perf_counter()
        report = model.fit(self.train)
        return model, report, time.perf_counter() - started

    def _fit_neural(self, name: str) -> tuple[SessionModel, SessionModel, FitReport, float]:
        """Early stopping on the carve (train_tr → valid); then, with ``refit_neural``, the same model trained
        afresh on all of ``train`` for the best number of epochs: the newest day matters most for a test on the
        day after, and the early-stopped model stays available for the hybrid's blend tuning (valid unseen)."""
        if name not in self.neural:
            started = time.perf_counter()
            tuned = self.create(name)
            report = tuned.fit(self.train_tr, self.valid)
            final = tuned
            if self.settings.get("refit_neural") and report.best_epoch:
                final = self.create(name, max_epochs=report.best_epoch)
                refit = final.fit(self.train)
                report.epochs = [*report.epochs, *({**epoch, "refit": 1.0} for epoch in refit.epochs)]
            self.neural[name] = (tuned, final, report, time.perf_counter() - started)
        return self.neural[name]

    def _fit_hybrid(self) -> tuple[SessionModel, FitReport, float]:
        """The hybrid's time includes its neural component only when that was trained for it."""
        config: HybridConfig = self.config("hybrid")
        neural = [name for name in config.components if name in NEURAL_MODELS]
        if neural and config.valid_days != self.settings["valid_days"]:
            raise ModelError(
                f"hybrid: valid_days {config.valid_days} differs from the run's {self.settings['valid_days']}; "
                "the blend must be fitted on the validation split the neural models did not train on"
            )
        started = time.perf_counter()
        components: dict[str, SessionModel] = {}
        for name in config.components:
            if name in NEURAL_MODELS:  # tuned with the early-stopped model: the validation day stays unseen
                components[name] = self._fit_neural(name)[0]
            else:  # fitted on the carve's training part, as the hybrid's contract requires
                components[name] = self.create(name)
                components[name].fit(self.train_tr)
        model = Hybrid(config, components)
        report = model.fit(self.train)
        for name in neural:  # the blend stays; the neural part is its version trained on all of train
            model.replace_component(name, self._fit_neural(name)[1])
        if neural:  # it scores where its neural component does
            report.device = self.neural[neural[0]][2].device
        return model, report, time.perf_counter() - started


@dataclasses.dataclass
class Experiment:
    """A finished run: the encoded data, every fitted model and its results (the Dagster assets log and
    register the models; the CLI only needs `as_json`)."""

    index: ItemIndex
    train: SessionData
    test: SessionData
    dataset: dict[str, Any]
    results: dict[str, dict[str, Any]]
    models: dict[str, SessionModel]
    reports: dict[str, FitReport]

    def as_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "models": self.results}

    def best(self, metric: str = "mrr@20") -> str:
        return max(self.results, key=lambda name: self.results[name][metric])


def train_and_evaluate(
    train: pl.DataFrame,
    test: pl.DataFrame,
    model_names: Sequence[str],
    *,
    device: str = "auto",
    seed: int = 42,
    overrides: dict[str, dict] | None = None,
    progress: Callable[[str], None] | None = None,
    valid_days: float = 1.0,
    batch_size: int = 512,
    refit_neural: bool = True,
) -> Experiment:
    """Fit and evaluate ``model_names`` on ``train`` -> ``test`` (``SessionId ItemId Time`` frames).

    ``overrides`` maps a model name to hyper-parameters replacing its defaults (also used for the hybrid's
    components); ``device`` and ``seed`` go to every model whose config has such a field. The results hold per
    model ``params``, ``train_seconds``, ``device``, the fit report and all metrics of `evaluate`.
    """
    names = list(dict.fromkeys(model_names))
    overrides = dict(overrides or {})
    unknown = sorted({*names, *overrides} - set(MODEL_NAMES))
    if unknown:
        raise ModelError(f"unknown model(s) {unknown}; valid names: {', '.join(MODEL_NAMES)}")
    if not names:
        raise ModelError(f"no model to evaluate; choose from {', '.join(MODEL_NAMES)}")
    _check_frame(train, "train")
    _check_frame(test, "test")
    say = progress or (lambda message: None)

    index = ItemIndex.from_items(train["ItemId"])
    train_data, _ = SessionData.from_frame(train, index)
    test_data, unknown_events = SessionData.from_frame(test, index)
    run = _Run(train_data, overrides, {"device": device, "seed": seed, "valid_days": valid_days,
                                      "refit_neural": refit_neural})
    dataset = {
        "fingerprint": fingerprint(index, train_data, test_data),
        "catalogue_items": len(index),
        "train": _counts(train_data),
        "train_tr": _counts(run.train_tr),
        "valid": _counts(run.valid),
        "test": {
            **_counts(test_data),
            "unknown_item_events_removed": unknown_events,
            "sessions_without_prediction": int((test_data.lengths() < 2).sum()),
        },
        "valid_days": valid_days,
    }
    say(
        f"train {dataset['train']['events']} events / {dataset['train']['sessions']} sessions, "
        f"test {dataset['test']['events']} events ({unknown_events} on unknown items removed)"
    )
    results: dict[str, dict[str, Any]] = {}
    fitted: dict[str, SessionModel] = {}
    reports: dict[str, FitReport] = {}
    for name in sorted(names, key=lambda n: n == "hybrid"):  # the hybrid last: it reuses what came before
        say(f"{name}: training")
        model, report, train_seconds = run.fit(name)
        fitted[name], reports[name] = model, report
        say(f"{name}: trained in {train_seconds:.1f}s, evaluating")
        metrics = evaluate(model, test_data, train_data, batch_size=batch_size)
        results[name] = {
            "params": model.params(),
            "train_seconds": train_seconds,
            "device": report.device,
            "fit": {
                "epochs": report.epochs,
                "best_epoch": report.best_epoch,
                "best_valid_mrr": report.best_valid_mrr,
                "events_per_second": report.events_per_second,
            },
            **metrics,
        }
        if isinstance(model, Hybrid):
            results[name]["blend"] = {"weight": model.weight, "normalisation": model.normalisation}
            results[name]["fit"]["validation_grid"] = model.validation
        say(f"{name}: recall@20 {metrics['recall@20']:.4f}  mrr@20 {metrics['mrr@20']:.4f}")
    return Experiment(index, train_data, test_data, dataset, results, fitted, reports)


def run_evaluation(train: pl.DataFrame, test: pl.DataFrame, model_names: Sequence[str], **kwargs: Any) -> dict:
    """`train_and_evaluate` as a JSON-ready dict ``{"dataset": {...}, "models": {name: {...}}}``."""
    return train_and_evaluate(train, test, model_names, **kwargs).as_json()
