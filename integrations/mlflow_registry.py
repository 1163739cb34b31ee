"""The model registry: versions, the `challenger` and `champion` aliases, the promotion gate and rollback.

The MLflow registry is the source of truth. Aliases are read on every call, never cached, so that an alias moved
by hand in the MLflow UI is what this module sees next. Every decision is written onto the model version as tags
(``gate_passed``, ``gate_reasons``, ``decided_at``, ``promoted_by`` ...), so that the registry alone explains who
put which version in front of users and why.

Rollback needs to know which version was champion before the current one. Each promotion writes a
``previous_champion`` tag on the new champion (for people reading the UI) and appends to a ``champion_history``
tag on the registered model. The history is what rollback walks back along; when the live alias differs from the
history's newest entry, the alias was moved outside this module, and rollback returns to the version that was
champion before that move. (Two release managers acting in the same second may interleave their history writes;
the aliases themselves are always what MLflow says.)
"""

from __future__ import annotations

import getpass
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

from sessionrec.config import PromotionConfig
from sessionrec.integrations.mlflow_tracking import (
    RunRecord,
    StoreUnreachableError,
    mlflow_key,
    numeric_items,
    prepare_store,
    resolve_store_uri,
)
from sessionrec.ops.errors import SessionrecError
from sessionrec.ops.promotion import FINGERPRINT_KEY, GateDecision, decide_promotion

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.pyfunc import PyFuncModel

    from sessionrec.integrations.pyfunc_model import SessionRecommenderPyfunc
    from sessionrec.ops.models.base import SessionModel
    from sessionrec.ops.sessiondata import ItemIndex

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Prefix of the version tags holding the test metrics (``metric.mrr_at_20``).
METRIC_TAG = "metric."
HISTORY_TAG = "champion_history"
#: Promotions remembered for rollback.
HISTORY_LENGTH = 50


class RegistryError(SessionrecError):
    """A registry operation that cannot be done as asked; the message says what to do instead."""


class RegistryUnreachableError(RegistryError, StoreUnreachableError):
    """The registry's database does not answer."""


class UnknownVersionError(RegistryError):
    """The version does not exist in the registered model."""


class NoChampionError(RegistryError):
    """No version carries the alias asked for (``champion`` unless said otherwise)."""


class NoPreviousChampionError(RegistryError):
    """Rollback asked for, but no earlier champion is recorded."""


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as a release manager sees it."""

    version: int
    aliases: list[str]
    run_id: str | None
    metrics: dict[str, float]  # MLflow-legal names (``mrr_at_20``), from the version's metric tags
    dataset_fingerprint: str | None
    created: datetime
    gate_passed: bool | None  # None: never went through the gate
    gate_reasons: list[str] = field(default_factory=list)
    promoted_by: str | None = None
    promotion_reason: str | None = None
    promoted_at: str | None = None
    previous_champion: int | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_mlflow(cls, mv: ModelVersion, aliases: list[str] | None = None) -> "VersionInfo":
        """``aliases`` overrides ``mv.aliases``, which version searches leave empty."""
        tags = dict(mv.tags or {})
        gate = tags.get("gate_passed")
        previous = tags.get("previous_champion")
        return cls(
            version=int(mv.version),
            aliases=sorted(mv.aliases if aliases is None else aliases),
            run_id=mv.run_id,
            metrics={k.removeprefix(METRIC_TAG): v for k, v in _metric_tags(tags).items()},
            dataset_fingerprint=tags.get(FINGERPRINT_KEY),
            created=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
            gate_passed=None if gate is None else gate == "true",
            gate_reasons=tags["gate_reasons"].splitlines() if tags.get("gate_reasons") else [],
            promoted_by=tags.get("promoted_by"),
            promotion_reason=tags.get("promotion_reason"),
            promoted_at=tags.get("promoted_at"),
            previous_champion=int(previous) if previous else None,
            tags=tags,
        )

    def evaluation(self, metric: str) -> dict[str, Any]:
        """This version's ``metric`` (our name, e.g. ``mrr@20``) and test split, as the gate compares them."""
        value = self.metrics.get(mlflow_key(metric))
        return {FINGERPRINT_KEY: self.dataset_fingerprint, **({metric: value} if value is not None else {})}


@dataclass(frozen=True)
class LoadedModel:
    """A registered version loaded for use: the MLflow pyfunc and, for serving, what it wraps (``recommender``
    ranks item ids without the pandas round trip; ``model`` and ``item_index`` are the raw parts)."""

    pyfunc: PyFuncModel
    recommender: SessionRecommenderPyfunc
    model: SessionModel
    item_index: ItemIndex
    version: VersionInfo


def _metric_tags(tags: dict[str, str]) -> dict[str, float]:
    """The numeric ``metric.*`` tags; one edited by hand into something else is left out rather than fatal."""
    metrics = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG):
            try:
                metrics[key] = float(value)
            except ValueError:
                continue
    return metrics


def _user(user: str | None) -> str:
    if user:
        return user
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER variable and no passwd entry (some containers)
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """The registered model ``model_name`` in the store at ``uri`` (tracking and registry share one store)."""

    def __init__(self, uri: str, model_name: str) -> None:
        from mlflow import MlflowClient

        self.uri = resolve_store_uri(uri)
        try:
            prepare_store(self.uri)
        except StoreUnreachableError as exc:
            raise RegistryUnreachableError(str(exc).replace("tracking store", "model registry", 1)) from exc
        self.model_name = model_name
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # -- reading ---------------------------------------------------------------------------------------------

    def version(self, version: int | str) -> VersionInfo:
        return VersionInfo.from_mlflow(self._model_version(version))

    def alias(self, alias: str) -> VersionInfo | None:
        """The version carrying ``alias`` right now, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return VersionInfo.from_mlflow(self.client.get_model_version_by_alias(self.model_name, alias))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def champion(self) -> VersionInfo:
        found = self.alias(CHAMPION)
        if found is None:
            raise NoChampionError(
                f"registered model {self.model_name!r} has no champion yet: promote a version "
                f"(auto_promote after training, or promote(version, reason))"
            )
        return found

    def list_versions(self) -> list[VersionInfo]:
        """All versions, newest first, with their live aliases."""
        # Version searches come back without aliases: take them from the registered model.
        aliases = self._aliases_by_version()
        versions: list[VersionInfo] = []
        token = None
        while True:
            page = self.client.search_model_versions(
                f"name = '{self.model_name}'", max_results=1000, order_by=["version_number DESC"], page_token=token
            )
            versions.extend(VersionInfo.from_mlflow(mv, aliases.get(int(mv.version), [])) for mv in page)
            token = page.token
            if not token:
                return versions

    def _aliases_by_version(self) -> dict[int, list[str]]:
        from mlflow.exceptions import MlflowException

        try:
            registered = self.client.get_registered_model(self.model_name)
        except MlflowException:
            return {}
        by_version: dict[int, list[str]] = {}
        for alias, version in (registered.aliases or {}).items():
            by_version.setdefault(int(version), []).append(alias)
        return by_version

    def _model_version(self, version: int | str) -> ModelVersion:
        from mlflow.exceptions import MlflowException

        number = str(version).strip()
        if not number.isdigit():
            raise UnknownVersionError(f"model version must be a positive integer, got {version!r}")
        try:
            return self.client.get_model_version(self.model_name, number)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                known = [v.version for v in self.list_versions()]
                raise UnknownVersionError(
                    f"registered model {self.model_name!r} has no version {number}; existing versions: "
                    f"{', '.join(map(str, known)) or 'none'} (see `list_versions`)"
                ) from exc
            raise

    # -- writing ---------------------------------------------------------------------------------------------

    def register(self, run_record: RunRecord, evaluation: dict[str, Any], dataset_fingerprint: str) -> int:
        """Register the run's model as a new version, tag it with its test metrics and split, alias it
        `challenger`."""
        from mlflow.exceptions import MlflowException

        if not dataset_fingerprint:
            raise RegistryError("register needs the dataset_fingerprint of the test split the evaluation used")
        stated = evaluation.get(FINGERPRINT_KEY)
        if stated is not None and stated != dataset_fingerprint:
            raise RegistryError(
                f"the evaluation says it was measured on split {stated} but register was told "
                f"{dataset_fingerprint}: pass the fingerprint of the split the evaluation used"
            )
        try:
            self.client.create_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # Top-level metrics only: the breakdowns (by prefix length ...) stay in the run, not on the version.
        scalars = {k: v for k, v in evaluation.items() if not isinstance(v, dict)}
        tags = {f"{METRIC_TAG}{mlflow_key(k)}": repr(v) for k, v in numeric_items(scalars).items()}
        tags[FINGERPRINT_KEY] = dataset_fingerprint
        # The logged model's own location as source: given a ``models:/`` URI, MLflow's SQL registry would look the
        # model up through the process-wide tracking URI instead of this registry's store.
        logged = self.client.get_logged_model(run_record.model_id)
        mv = self.client.create_model_version(
            self.model_name,
            source=logged.artifact_location,
            run_id=run_record.run_id,
            tags=tags,
            model_id=run_record.model_id,
        )
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, mv.version)
        return int(mv.version)

    def auto_promote(
        self,
        version: int | str,
        policy: PromotionConfig,
        popularity_metrics: dict[str, Any] | None,
        latency: float | None,
        user: str | None = None,
    ) -> GateDecision:
        """Run the gate against the live champion; move `champion` to ``version`` when it passes.

        ``popularity_metrics`` is the popularity baseline's evaluation on the same split (with its
        ``dataset_fingerprint``); ``latency`` the challenger's measured p99 in milliseconds. The decision and its
        evidence are written on the version whatever the outcome.
        """
        challenger = self.version(version)
        champion = self.alias(CHAMPION)
        decision = decide_promotion(
            challenger.evaluation(policy.metric),
            None if champion is None else champion.evaluation(policy.metric),
            popularity_metrics,
            policy,
            latency,
        )
        evidence = {**decision.evidence, "champion_version": None if champion is None else champion.version}
        self._tag(
            challenger.version,
            gate_passed=str(decision.passed).lower(),
            gate_reasons="\n".join(decision.reasons),
            gate_evidence=json.dumps(evidence, sort_keys=True, default=str),
            decided_at=_now(),
            decided_by=_user(user),
        )
        if decision.passed:
            self.promote(challenger.version, f"promotion gate passed on {policy.metric}", user)
        return GateDecision(decision.passed, decision.reasons, evidence)

    def promote(self, version: int | str, reason: str, user: str | None = None) -> VersionInfo:
        """Make ``version`` the champion, recording who, when and why, and what it replaces (for rollback)."""
        if not reason.strip():
            raise RegistryError("say why you promote this version (reason); it is recorded on the version")
        target = self.version(version)
        current = self.alias(CHAMPION)
        if current is not None and current.version == target.version:
            return current
        history = self._history()
        if current is not None and (not history or history[-1] != current.version):
            history.append(current.version)  # the alias was moved outside this module: remember that state
        self.client.set_registered_model_alias(self.model_name, CHAMPION, str(target.version))
        self._tag(
            target.version,
            promoted_by=_user(user),
            promoted_at=_now(),
            promotion_reason=reason,
            previous_champion="" if current is None else str(current.version),
        )
        self._write_history([*history, target.version])
        return self.version(target.version)

    def rollback(self, reason: str, user: str | None = None) -> VersionInfo:
        """Move `champion` back to the version that held it before the current one; returns that version.

        The rolled-back version keeps its tags plus ``rolled_back_*``; if it is also the `challenger`, that alias
        is removed so that a canary does not keep serving it.
        """
        if not reason.strip():
            raise RegistryError("say why you roll back (reason); it is recorded on both versions")
        current = self.champion()
        history = self._history()
        while history and history[-1] == current.version:
            history.pop()
        if not history:
            raise NoPreviousChampionError(
                f"champion version {current.version} of {self.model_name!r} has no earlier champion recorded; "
                f"promote the version you want explicitly with promote(version, reason)"
            )
        previous = self.version(history[-1])
        self.client.set_registered_model_alias(self.model_name, CHAMPION, str(previous.version))
        who, when = _user(user), _now()
        self._tag(current.version, rolled_back_by=who, rolled_back_at=when, rolled_back_reason=reason)
        self._tag(previous.version, promoted_by=who, promoted_at=when, promotion_reason=f"rollback: {reason}")
        if CHALLENGER in current.aliases:
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        self._write_history(history)
        return self.version(previous.version)

    def _tag(self, version: int, **tags: str) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), key, value)

    def _history(self) -> list[int]:
        registered = self.client.get_registered_model(self.model_name)
        raw = (registered.tags or {}).get(HISTORY_TAG)
        return [int(v) for v in json.loads(raw)] if raw else []

    def _write_history(self, history: list[int]) -> None:
        self.client.set_registered_model_tag(self.model_name, HISTORY_TAG, json.dumps(history[-HISTORY_LENGTH:]))

    # -- loading ---------------------------------------------------------------------------------------------

    def load_alias(self, alias: str) -> LoadedModel:
        """Load the version that carries ``alias`` now: the pyfunc plus the `SessionModel` and `ItemIndex` it
        wraps (serving scores with those directly)."""
        info = self.alias(alias)
        if info is None:
            raise NoChampionError(
                f"no version of {self.model_name!r} carries the alias {alias!r}; aliases now: "
                f"{self._aliases_by_version() or 'none'}"
            )
        return self._load(info)

    def load_champion(self) -> LoadedModel:
        return self._load(self.champion())

    def _load(self, info: VersionInfo) -> LoadedModel:
        import mlflow

        # The version's storage location, not a ``models:/`` URI: MLflow resolves those through the process-wide
        # registry URI, not this registry's. A temporary copy is enough: `load_context` reads everything in.
        source = self.client.get_model_version_download_uri(self.model_name, str(info.version))
        with TemporaryDirectory(prefix="sessionrec-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
            pyfunc = mlflow.pyfunc.load_model(local)
        wrapper = pyfunc.unwrap_python_model()
        return LoadedModel(pyfunc, wrapper, wrapper.model, wrapper.item_index, info)

