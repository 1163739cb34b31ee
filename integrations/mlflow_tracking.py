"""Training runs in the MLflow tracking store: parameters, curves, metrics, provenance and the pyfunc model.

One `TrackingStore` per store URI: the default SQLite file under the state directory, or a PostgreSQL URL in
production (SQLite locks under concurrent writers). Artifacts go to ``artifacts_dir``, set as the experiment's
artifact location, so that nothing lands in ``./mlruns`` of whatever directory a command runs from.

MLflow is imported inside the functions: importing this module must stay cheap for the CLI and Dagster.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

from sessionrec.ops.errors import SessionrecError

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient

    from sessionrec.ops.models.base import FitReport, SessionModel
    from sessionrec.ops.sessiondata import ItemIndex
    from sessionrec.serving.candidates import CandidateIndex

#: MLflow's limit on a parameter value; longer values are cut in the params table (params.json keeps them whole).
MAX_PARAM_CHARS = 6000


class TrackingStoreError(SessionrecError):
    """The tracking store cannot be used as configured (unreachable, deleted experiment, bad input)."""


class StoreUnreachableError(TrackingStoreError):
    """The database behind the tracking URI does not answer."""


@dataclass(frozen=True)
class RunRecord:
    """Where a training run went: its id, its page in the MLflow UI (relative to the UI's base URL), its model."""

    run_id: str
    run_url_path: str
    model_uri: str  # models:/<model_id>, the logged pyfunc
    model_id: str


def mlflow_key(name: str) -> str:
    """An MLflow-legal metric/param/tag name for ours: ``recall@20`` → ``recall_at_20``."""
    return re.sub(r"[^\w.\-/]", "_", name.replace("@", "_at_"))


def redact(uri: str) -> str:
    """The URI without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)


def resolve_store_uri(uri: str) -> str:
    """``uri`` with the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 reads a plain ``postgresql://`` as psycopg 3; the project ships psycopg2 (``psycopg2-binary``),
    so a plain URL is pinned to it unless psycopg 3 is installed. Pass the result to anything that opens the store
    (``MlflowClient``, ``mlflow server --backend-store-uri``).
    """
    import importlib.util

    if uri.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + uri.removeprefix("postgresql://")
    return uri


def prepare_store(uri: str) -> None:
    """Make the store at ``uri`` (as returned by `resolve_store_uri`) usable, or fail fast with a message that
    says what to fix.

    SQLite: create the parent directory. Other databases: one connection attempt with a short timeout, because
    MLflow itself retries an unreachable database for about 100 seconds before it gives up.
    """
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return
    if "://" not in uri or uri.split("://", 1)[0] in {"http", "https", "file", "databricks"}:
        return
    import sqlalchemy

    connect_args = {"connect_timeout": 5} if uri.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # driver errors, a missing driver or a malformed URL: all mean "cannot connect"
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StoreUnreachableError(
            f"tracking store {redact(uri)} is unreachable ({detail}); start the database or point "
            f"SESSIONREC_TRACKING_URI (or [tracking] tracking_uri) at a reachable one"
        ) from exc


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide *fluent* API (``mlflow.start_run``, ``log_model``) at ``uri`` for a block.

    Everything else here uses an explicit ``MlflowClient``; only model logging needs the fluent API. Not
    thread-safe (MLflow's fluent state is global): log runs from one thread at a time.
    """
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def git_state(cwd: Path | None = None) -> tuple[str, bool | None]:
    """The commit checked out in ``cwd`` and whether the tree has uncommitted changes; ("unknown", None) outside
    a git repository or without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown", None
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None
    return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def _leaves(data: dict[str, Any], separator: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(joined key, value) for every non-dict leaf of a nested dict."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, separator, f"{name}{separator}")
        else:
            yield name, value


def numeric_items(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict with ``/``-joined keys (booleans and non-numbers left out)."""
    return {
        name: float(value)
        for name, value in _leaves(data, "/", prefix)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every leaf as an MLflow parameter (``.``-joined key, JSON text, capped in length)."""
    return {
        mlflow_key(name): (value if isinstance(value, str) else json.dumps(value, default=str))[:MAX_PARAM_CHARS]
        for name, value in _leaves(data, ".", prefix)
    }


class TrackingStore:
    """One MLflow experiment in one store; `log_training_run` records everything a training produced."""

    def __init__(self, uri: str, artifacts_dir: Path, experiment: str) -> None:
        from mlflow import MlflowClient

        self.uri = resolve_store_uri(uri)
        prepare_store(self.uri)
        self.artifacts_dir = Path(artifacts_dir).resolve()
        self.client: MlflowClient = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is None:
            self.artifacts_dir.mkdir(parents=True, exist_ok=True)
            try:
                return self.client.create_experiment(name, artifact_location=self.artifacts_dir.as_uri())
            except MlflowException:  # created meanwhile by another process
                existing = self.client.get_experiment_by_name(name)
                if existing is None:
                    raise
        if existing.lifecycle_stage == "deleted":
            raise TrackingStoreError(
                f"MLflow experiment {name!r} is deleted in {redact(self.uri)}: restore it "
                f"(`mlflow experiments restore --experiment-id {existing.experiment_id}`) or choose another name"
            )
        return existing.experiment_id

    def log_training_run(
        self,
        model: SessionModel,
        item_index: ItemIndex,
        fit_report: FitReport,
        evaluation: dict[str, Any],
        params: dict[str, Any],
        dataset: dict[str, Any],
        tags: dict[str, str],
        *,
        item_popularity: np.ndarray | None = None,
        candidates: CandidateIndex | None = None,
    ) -> RunRecord:
        """Log one trained model with everything needed to compare, reproduce and serve it.

        ``evaluation`` holds test-split metrics (``"recall@20"`` ...; stored as ``recall_at_20``); ``dataset``
        must carry the test split's ``fingerprint`` and may add statistics (sessions, events, items); ``params``
        override ``model.params()`` where both name the same key. ``item_popularity`` (training events per item,
        ``ops.evaluation.item_popularity(train)``) goes into the pyfunc: it answers sessions the model has nothing
        for (no known item, no neighbour). Pass it for every model whose empty-prefix scores are flat (kNN).
        ``candidates`` (`serving.candidates.model_candidate_index`) is the FAISS index serving ranks the version's
        candidates with; logged with it, the server loads it instead of building it in every process.
        """
        import mlflow
        import pandas as pd

        from sessionrec.integrations import pyfunc_model

        if not dataset.get("fingerprint"):
            raise TrackingStoreError(
                "dataset needs a 'fingerprint' of the test split the evaluation was measured on"
            )
        commit, dirty = git_state()
        run_tags = {
            **tags,
            "model_name": model.name,
            "dataset_fingerprint": str(dataset["fingerprint"]),
            "git_commit": commit,
            "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
            "device": fit_report.device,
        }
        all_params = {**model.params(), **params}
        with fluent_tracking_uri(self.uri), TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            with mlflow.start_run(experiment_id=self.experiment_id, run_name=model.name, tags=run_tags) as run:
                mlflow.log_params({**_flat_params(all_params), **_flat_params(dataset, "dataset.")})
                for step, epoch in enumerate(fit_report.epochs):
                    curves = {mlflow_key(k): v for k, v in numeric_items(epoch).items() if k != "epoch"}
                    mlflow.log_metrics(curves, step=int(epoch.get("epoch", step)))
                files = self._write_artifacts(tmp, model, item_index, fit_report, evaluation, all_params, dataset)
                for path in files:
                    mlflow.log_artifact(str(path))
                model_artifacts = {
                    pyfunc_model.MODEL_ARTIFACT: str(tmp / "model"),
                    pyfunc_model.ITEM_INDEX_ARTIFACT: str(tmp / "item_index.json"),
                }
                if item_popularity is not None:
                    pyfunc_model.save_popularity(item_popularity, tmp / "item_popularity.json")
                    model_artifacts[pyfunc_model.POPULARITY_ARTIFACT] = str(tmp / "item_popularity.json")
                if candidates is not None:
                    candidates.save(tmp / "candidates")
                    model_artifacts[pyfunc_model.CANDIDATES_ARTIFACT] = str(tmp / "candidates")
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=pyfunc_model.__file__,
                    artifacts=model_artifacts,
                    signature=pyfunc_model.SIGNATURE,
                    # MLflow loads the logged model and answers this request: a model that cannot be served
                    # fails here, at training time, and not at promotion.
                    input_example=pd.DataFrame({"items": [item_index.item_ids[:3].tolist(), []], "k": [5, 5]}),
                    pip_requirements=pyfunc_model.pip_requirements(),
                )
                final = {mlflow_key(k): v for k, v in numeric_items(evaluation).items()}
                final.update(_fit_summary(fit_report))
                # Linked to the logged model too, so that the UI's model list shows them.
                mlflow.log_metrics(final, model_id=info.model_id)
        return RunRecord(
            run_id=run.info.run_id,
            run_url_path=f"#/experiments/{self.experiment_id}/runs/{run.info.run_id}",
            model_uri=info.model_uri,
            model_id=info.model_id,
        )

    @staticmethod
    def _write_artifacts(
        tmp: Path,
        model: SessionModel,
        item_index: ItemIndex,
        fit_report: FitReport,
        evaluation: dict[str, Any],
        params: dict[str, Any],
        dataset: dict[str, Any],
    ) -> list[Path]:
        """Write the model directory and the run's files; returns the files to log beside the model."""
        from sessionrec.ops.models.registry import save_model

        save_model(model, tmp / "model")
        item_index.save(tmp / "item_index.json")
        documents = {
            "evaluation.json": evaluation,
            "dataset.json": dataset,
            "params.json": params,
            "fit_report.json": asdict(fit_report),
        }
        for name, content in documents.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True, default=str))
        plot_training(fit_report, evaluation, tmp / "training_curves.png", title=model.name)
        return [tmp / "item_index.json", *(tmp / name for name in documents), tmp / "training_curves.png"]


def _fit_summary(report: FitReport) -> dict[str, float]:
    summary = {
        "train_seconds": report.train_seconds,
        "best_epoch": report.best_epoch,
        "best_valid_mrr": report.best_valid_mrr,
        "events_per_second": report.events_per_second,
    }
    return {key: float(value) for key, value in summary.items() if value is not None}


def plot_training(fit_report: FitReport, evaluation: dict[str, Any], path: Path, title: str) -> None:
    """One panel per per-epoch curve; a bar chart of the test metrics for models trained without epochs."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state, Agg rendering

    curves: dict[str, list[tuple[float, float]]] = {}
    for step, epoch in enumerate(fit_report.epochs):
        x = float(epoch.get("epoch", step))
        for key, value in numeric_items(epoch).items():
            if key != "epoch" and math.isfinite(value):
                curves.setdefault(key, []).append((x, value))
    if curves:
        columns = min(3, len(curves))
        rows = math.ceil(len(curves) / columns)
        figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
        for position, (key, points) in enumerate(sorted(curves.items()), start=1):
            axes = figure.add_subplot(rows, columns, position)
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            axes.set_title(key)
            axes.set_xlabel("epoch")
        figure.suptitle(f"{title}: training curves")
    else:
        metrics = {k: v for k, v in numeric_items(evaluation).items() if math.isfinite(v)}
        figure = Figure(figsize=(max(5.0, 0.6 * len(metrics) + 2), 3.5), layout="constrained")
        axes = figure.add_subplot()
        axes.bar(list(metrics), list(metrics.values()))
        axes.tick_params(axis="x", labelrotation=45)
        axes.set_title(f"{title}: test metrics (no training epochs)")
    figure.savefig(path, dpi=100)
