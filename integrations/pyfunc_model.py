"""The MLflow pyfunc wrapper around a saved `SessionModel` directory.

Why a pyfunc of our own rather than ``mlflow.pytorch``: its default ``pt2`` export needs fixed tensor shapes, which
variable-length sessions are not; and not every model is a torch model. The wrapper carries the model directory
written by ``ops.models.registry.save_model`` (loaded back with ``load_model``), the ``item_index.json`` of
`ItemIndex` and, when given, the training popularity of every item; it turns item *ids* into ranked item *ids*.

How it is packaged: MLflow 3 refuses to unpickle models by default, so this file is logged as a *model from code*
(``python_model=<path of this file>``); MLflow executes it at load time and picks up the `set_model` call at the
bottom. The code it imports (``sessionrec.ops...``) is *not* copied into the model (``code_paths`` would copy the
whole repository root, which is the package itself); the project is an installed dependency instead, named in the
model's pip requirements. ``mlflow.pyfunc.load_model`` therefore works in any environment where ``sessionrec`` is
installed: the project's virtual environment, the serving image, a Dagster worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

from sessionrec.ops.errors import SessionrecError
from sessionrec.ops.models.base import Prefixes, SessionModel
from sessionrec.ops.sessiondata import ItemIndex

if TYPE_CHECKING:
    from sessionrec.serving.candidates import CandidateIndex

DEFAULT_K = 20
#: Rows scored per call of ``SessionModel.score``: bounds the dense (rows, n_items) score matrix in memory.
SCORE_CHUNK = 256

#: Names of the artifacts of the pyfunc (keys of ``context.artifacts``); popularity is optional.
MODEL_ARTIFACT = "model"
ITEM_INDEX_ARTIFACT = "item_index"
POPULARITY_ARTIFACT = "item_popularity"
CANDIDATES_ARTIFACT = "candidates"  # the FAISS candidate index over the item embeddings (neural models)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(Array("string"), "items"), ColSpec("long", "k", required=False)]),
    outputs=Schema(
        [ColSpec(Array("string"), "items"), ColSpec(Array("double"), "scores"), ColSpec("long", "n_unknown")]
    ),
)


class ModelInputError(SessionrecError):
    """A prediction request the model cannot answer as asked (bad ``k``, a session that is not a list)."""


@dataclass(frozen=True)
class Ranking:
    """The answer for one session: top item ids, their scores, and how many session items were unknown."""

    items: list[str]
    scores: list[float]
    n_unknown: int


def pip_requirements() -> list[str]:
    """Only what the wrapper itself imports: MLflow and the project (which brings numpy, pandas, torch ...)."""
    return [f"mlflow=={version('mlflow')}", f"sessionrec=={version('sessionrec')}"]


def save_popularity(popularity: np.ndarray, path: Path) -> None:
    path.write_text(json.dumps(np.asarray(popularity, dtype=np.float64).tolist()))


class SessionRecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """Ranks the catalogue for sessions of item ids; loaded by MLflow from its artifacts."""

    model: SessionModel
    item_index: ItemIndex
    candidates: CandidateIndex | None = None  # serving's candidate index, when it was logged with the version

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from sessionrec.ops.models.registry import load_model

        artifacts = context.artifacts
        popularity = artifacts.get(POPULARITY_ARTIFACT)
        self.bind(
            load_model(Path(artifacts[MODEL_ARTIFACT])),
            ItemIndex.load(Path(artifacts[ITEM_INDEX_ARTIFACT])),
            None if popularity is None else np.asarray(json.loads(Path(popularity).read_text()), dtype=np.float64),
        )
        if CANDIDATES_ARTIFACT in artifacts:  # serving's index, read in full: the artifact directory is temporary
            from sessionrec.serving.candidates import CandidateIndex

            embeddings = self.model.item_embeddings()
            if embeddings is not None:
                self.candidates = CandidateIndex.load(Path(artifacts[CANDIDATES_ARTIFACT]), embeddings)

    def bind(self, model: SessionModel, item_index: ItemIndex, popularity: np.ndarray | None = None) -> None:
        """Attach a loaded model; scores the empty prefix once, so that a mismatch fails at load, not per request.

        A session without any known item gets the model's empty-prefix answer, computed here, so that such a
        request never reaches the model and never raises. Where a model's scores rank nothing (all equal: a kNN
        model without neighbours, including for the empty prefix), ``popularity`` (training events per item), when
        given, answers instead.
        """
        empty = model.score(Prefixes(items=[np.empty(0, dtype=np.int64)], times=np.array([time.time()])))
        n_items = len(item_index)
        if empty.shape != (1, n_items) or (popularity is not None and len(popularity) != n_items):
            raise SessionrecError(
                f"model {model.name!r} scores {empty.shape[-1]} items, its item index has {n_items} and the "
                f"popularity {'none' if popularity is None else len(popularity)}: they come from different "
                f"trainings; log them together again"
            )
        self.model, self.item_index = model, item_index
        self._popularity = popularity
        self._empty_scores = self._informative(np.asarray(empty[0], dtype=np.float64))

    def _informative(self, scores: np.ndarray) -> np.ndarray:
        if self._popularity is not None and len(scores) and scores.max() == scores.min():
            return self._popularity
        return scores

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """``model_input``: column ``items`` (a list of item ids per row), optional column ``k`` (default 20)."""
        if "items" not in model_input.columns:
            raise ModelInputError(
                f"input needs a column 'items' (a list of item ids per session); got {list(model_input.columns)}"
            )
        ks = model_input["k"].tolist() if "k" in model_input.columns else [DEFAULT_K] * len(model_input)
        sessions = [_as_session(row) for row in model_input["items"].tolist()]
        rankings = self.rank(sessions, [_as_k(k) for k in ks])
        return pd.DataFrame(
            {
                "items": [r.items for r in rankings],
                "scores": [r.scores for r in rankings],
                "n_unknown": np.array([r.n_unknown for r in rankings], dtype=np.int64),
            }
        )

    def rank(self, sessions: list[list[str]], ks: list[int] | int = DEFAULT_K) -> list[Ranking]:
        """Top-k item ids per session. Unknown items are dropped and counted; a session left empty gets the
        empty-prefix answer (see `bind`)."""
        if isinstance(ks, int):
            ks = [ks] * len(sessions)
        encoded = [self.item_index.encode(session) for session in sessions]
        known_rows = [row for row, (codes, _) in enumerate(encoded) if len(codes)]
        scores: dict[int, np.ndarray] = {}
        now = time.time()
        for start in range(0, len(known_rows), SCORE_CHUNK):
            rows = known_rows[start : start + SCORE_CHUNK]
            batch = self.model.score(Prefixes(items=[encoded[r][0] for r in rows], times=np.full(len(rows), now)))
            scores.update((r, self._informative(s)) for r, s in zip(rows, np.asarray(batch, dtype=np.float64)))
        return [
            self._top(scores.get(row, self._empty_scores), k, n_unknown)
            for row, ((_, n_unknown), k) in enumerate(zip(encoded, ks))
        ]

    def latency_p99_ms(self, sessions: list[list[str]], k: int = DEFAULT_K) -> float:
        """p99 wall time of answering ``sessions`` one request each, in milliseconds: the promotion gate's
        latency figure. Measure on the kind of machine that serves, with sessions from traffic or a test split."""
        if not sessions:
            raise ModelInputError("latency needs at least one session to time")
        timings = []
        for session in sessions:
            started = time.perf_counter()
            self.rank([session], k)
            timings.append((time.perf_counter() - started) * 1000.0)
        return float(np.percentile(timings, 99))

    def _top(self, scores: np.ndarray, k: int, n_unknown: int) -> Ranking:
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return Ranking(self.item_index.decode(top), scores[top].tolist(), n_unknown)


def _as_session(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ModelInputError(
            f"each 'items' value must be a list of item ids, got {type(value).__name__}: {value!r:.80}"
        )
    return [str(item) for item in value]


def _as_k(value: Any) -> int:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return DEFAULT_K
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = 0.0
    if isinstance(value, bool) or not number.is_integer() or number < 1:
        raise ModelInputError(f"'k' must be a positive integer, got {value!r}")
    return int(number)


# Models from code: MLflow executes this file when loading the pyfunc and takes the model set here.
mlflow.models.set_model(SessionRecommenderPyfunc())
