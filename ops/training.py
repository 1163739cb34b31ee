"""The training loop shared by the neural session models (GRU4Rec, SASRec), and what they have in common.

`NeuralSessionModel` implements the whole `SessionModel` contract once: `fit` (epochs, early stopping on the
validation MRR@20 with best-weights restore, per-epoch checkpoints that a later `fit` resumes, an optional refit,
progress bars), `score` / `session_embeddings` / `item_embeddings` (``score = session @ items.T`` by
construction: every score goes through those two matrices), and `save` / `load` (config JSON + float32 arrays,
no pickle). A model subclass supplies the network, its optimizer, one training epoch and how it turns item
sequences into session vectors.

Validation uses the evaluation protocol of `ops.evaluation` (every position ``t >= 1``, the whole catalogue,
pessimistic ties) but computes the vectors of all positions of a session in one pass of the network instead of
one prefix at a time, so that checking every epoch stays cheap.

Refit (``refit=True``): after early stopping on ``(train, valid)`` the model is re-initialised and trained on
``train + valid`` for the best number of epochs. The trade-off: the validation sessions are the newest ones,
which matter most for a test on the following day, but the refitted weights were never validated (the epoch
count is transferred from a slightly smaller data set) and training costs about twice as much.

Determinism: on CPU a seed fixes the weights (initialisation, negative samples, dropout and shuffling all draw
from torch's global generator, seeded at the start of `fit` and saved in every checkpoint), so the same seed
gives identical scores and a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from sessionrec.ops.device import resolve_device, synchronize
from sessionrec.ops.errors import SessionrecError
from sessionrec.ops.evaluation import metrics_from_ranks
from sessionrec.ops.models.base import FitReport, Prefixes, SessionModel
from sessionrec.ops.sessiondata import SessionData

if TYPE_CHECKING:
    import optuna
    import torch

#: The cut-off of the validation metrics (early stopping uses MRR@CUTOFF).
CUTOFF = 20
CHECKPOINT_VERSION = 1


class TrainingError(SessionrecError):
    """Unusable training input or state: nothing to learn from, a prefix with an unencoded item, a checkpoint
    written for other data or settings."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings every neural model shares; each model's config extends it with its hyper-parameters.

    ``device``, ``progress``, ``checkpoint_dir``, ``max_seconds`` and ``cpu_threads`` say *where and how* to run
    (they never change what is learned, except ``max_seconds`` cutting training short) and are left out of the
    checkpoint identity. ``batch_size`` is used on CPU, ``cuda_batch_size`` on CUDA: a GPU step costs about the
    same for 64 or 2048 rows, so it needs large batches to be worth using.
    """

    device: str = "auto"
    seed: int = 42
    max_epochs: int = 10
    patience: int = 2  # stop after this many epochs in a row without a better validation MRR@20
    refit: bool = False
    batch_size: int = 64
    cuda_batch_size: int = 1024
    learning_rate: float = 0.001
    cpu_threads: int = 1
    valid_max_sessions: int = 20_000
    max_seconds: float | None = None
    progress: bool = True
    checkpoint_dir: str | None = None

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (
        "device", "progress", "checkpoint_dir", "max_seconds", "cpu_threads"
    )

    def __post_init__(self) -> None:
        positive = ("max_epochs", "patience", "batch_size", "cuda_batch_size", "cpu_threads", "valid_max_sessions")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive (or None for no limit), got {self.max_seconds}")

    def hyper_parameters(self) -> dict[str, Any]:
        """What defines the learned model (for tracking and for the checkpoint identity)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME_FIELDS}


# --------------------------------------------------------------------------------------------------- metrics


def pessimistic_ranks(scores: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """``1 + #{other items scoring >= the target}`` per row: `ops.evaluation.ranks_from_scores` on the device,
    so that validation never copies a score matrix to the host."""
    import torch

    scores = torch.nan_to_num(scores, nan=-math.inf)
    target_scores = scores.gather(1, targets[:, None])
    return (scores >= target_scores).sum(dim=1)


# ------------------------------------------------------------------------------------------------ data helpers


def concat_sessions(first: SessionData, second: SessionData) -> SessionData:
    """``first``'s sessions followed by ``second``'s (same catalogue): the full training data of a refit."""
    if first.n_items != second.n_items:
        raise TrainingError(
            f"cannot join sessions encoded with catalogues of {first.n_items} and {second.n_items} items"
        )
    return SessionData(
        session_ids=np.concatenate([first.session_ids, second.session_ids]),
        offsets=np.concatenate([first.offsets, second.offsets[1:] + first.offsets[-1]]),
        items=np.concatenate([first.items, second.items]),
        times=np.concatenate([first.times, second.times]),
        n_items=first.n_items,
    )


def last_sessions(data: SessionData, n: int) -> SessionData:
    """The newest ``n`` sessions (the caller's order is by time): a cheap, deterministic validation sample."""
    if data.n_sessions <= n:
        return data
    lo = data.offsets[-n - 1]
    return SessionData(
        session_ids=data.session_ids[-n:],
        offsets=data.offsets[-n - 1 :] - lo,
        items=data.items[lo:],
        times=data.times[lo:],
        n_items=data.n_items,
    )


def _check_sessions(data: SessionData, role: str, n_items: int | None = None) -> None:
    if n_items is not None and data.n_items != n_items:
        raise TrainingError(
            f"{role} is encoded with a catalogue of {data.n_items} items, training with {n_items}: "
            "encode both with the same ItemIndex"
        )
    if data.n_items < 2:
        raise TrainingError(f"{role}: the catalogue has {data.n_items} item(s); a recommender needs at least 2")
    if data.n_events and (data.items.min() < 0 or data.items.max() >= data.n_items):
        raise TrainingError(f"{role}: item indices must lie in [0, {data.n_items}); encode with ItemIndex")
    if not (data.lengths() >= 2).any():
        raise TrainingError(
            f"{role} has no session of two or more events, so no next-item example: "
            f"{data.n_sessions} sessions, {data.n_events} events"
        )


def data_fingerprint(*parts: SessionData) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for data in parts:
        digest.update(np.int64(data.n_items).tobytes())
        for array in (data.offsets, data.items):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def check_prefixes(prefixes: Prefixes, n_items: int) -> list[np.ndarray]:
    """The prefixes as int64 arrays; an index outside the catalogue (an unknown item encoded as -1, say) is the
    caller's mistake and gets an error rather than a silently wrong embedding row."""
    out = []
    for position, items in enumerate(prefixes.items):
        array = np.asarray(items, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= n_items):
            raise TrainingError(
                f"prefix {position} holds item index {int(array.min() if array.min() < 0 else array.max())} "
                f"outside the catalogue [0, {n_items}): encode prefixes with the model's ItemIndex.encode, which "
                "drops unknown items"
            )
        out.append(array)
    return out


# ---------------------------------------------------------------------------------------------- epoch meter


class EpochMeter:
    """Sums the loss of an epoch on the device and feeds the progress bar.

    The loss is read back (a device synchronisation) only every ``every`` steps, when the bar is redrawn, so
    that CUDA kernels stay queued between reads; the time budget is checked after every step.
    """

    def __init__(self, bar: Any, deadline: float | None, every: int = 50) -> None:
        self.bar = bar
        self.deadline = deadline
        self.every = every
        self.loss_sum: Any = 0.0
        self.events = 0
        self.steps = 0
        self.out_of_time = False
        self._shown = 0

    def step(self, loss_sum: "torch.Tensor", n_events: int) -> bool:
        """Record one optimisation step; False when the time budget is spent and the epoch must stop."""
        self.loss_sum = self.loss_sum + loss_sum.detach()
        self.events += n_events
        self.steps += 1
        if self.steps % self.every == 0:
            self._refresh()
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.out_of_time = True
        return not self.out_of_time

    def _refresh(self) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.update(self.events - self._shown)
            self._shown = self.events
            self.bar.set_postfix(loss=f"{self.mean_loss():.4f}", refresh=False)

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(self.events, 1)

    def close(self) -> None:
        self._refresh()


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class _LoopState:
    """Everything that must survive an interruption, besides the network and optimizer."""

    epoch: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best_epoch: int | None = None
    best_mrr: float | None = None
    best_weights: dict[str, Any] | None = None
    bad_epochs: int = 0
    finished: bool = False


class NeuralSessionModel(SessionModel):
    """Base of the torch session models: the loop, scoring through embeddings, persistence.

    Subclasses define ``name``, ``config_class`` and the abstract hooks below. Vectors have one more column
    than the hidden size: the session side carries a constant 1 and the item side the item's output bias, so
    the bias is part of the inner product that serving's FAISS index computes.
    """

    config_class: ClassVar[type[TrainConfig]] = TrainConfig

    def __init__(self, config: TrainConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TrainingError(
                f"{self.name} needs a {self.config_class.__name__}, got {type(self.config).__name__}"
            )
        self.network: torch.nn.Module | None = None
        self.n_items = 0
        self._device: torch.device | None = None

    # ----------------------------------------------------------------------------------------- subclass hooks

    @abstractmethod
    def _build(self, n_items: int) -> "torch.nn.Module":
        """A freshly initialised network for ``n_items`` items (draws from torch's global generator)."""

    @abstractmethod
    def _make_optimizer(self, network: "torch.nn.Module") -> Any:
        """An object with ``state_dict`` / ``load_state_dict``, used by `_train_epoch`."""

    @abstractmethod
    def _prepare(self, train: SessionData) -> tuple[Any, int]:
        """Device-resident training arrays (built once per fit) and the number of examples in one epoch."""

    @abstractmethod
    def _train_epoch(self, prepared: Any, optimizer: Any, meter: EpochMeter) -> None:
        """One pass over ``prepared``, calling ``meter.step`` after every optimisation step (stop when False)."""

    @abstractmethod
    def _session_vectors(self, prefixes: list[np.ndarray]) -> "torch.Tensor":
        """``(len(prefixes), D)`` float32 session vectors; an empty prefix is allowed."""

    @abstractmethod
    def _position_vectors(self, data: SessionData) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """(vectors, next items) for every position ``t >= 1`` of every session, equal to what `score` gives for
        the prefix ``s[:t]``, in batches."""

    @abstractmethod
    def _item_matrix(self) -> "torch.Tensor":
        """``(n_items, D)`` float32 item vectors (output embedding and bias)."""

    @classmethod
    @abstractmethod
    def search_space(cls, trial: "optuna.Trial") -> dict[str, Any]:
        """Config overrides suggested by an Optuna trial (used by `tune`)."""

    # ------------------------------------------------------------------------------------------ public API

    def params(self) -> dict[str, Any]:
        return self.config.hyper_parameters()

    @property
    def device(self) -> "torch.device":
        if self._device is None:
            self._device = resolve_device("auto")
        return self._device

    @property
    def effective_batch_size(self) -> int:
        return self.config.cuda_batch_size if self.device.type == "cuda" else self.config.batch_size

    def fit(self, train: SessionData, valid: SessionData | None = None) -> FitReport:
        """Train on ``train``; with ``valid``, early-stop on its MRR@20 and keep the best epoch's weights (then,
        with ``refit``, retrain on ``train + valid`` for that many epochs). Without ``valid``: ``max_epochs``.
        ``max_seconds`` stops the (first) training phase mid-epoch; a run stopped by it is not refitted.

        With ``checkpoint_dir`` set, every epoch is saved there and a later call with the same data and
        hyper-parameters continues where the last one stopped (a finished run is restored without training).
        """
        cfg = self.config
        self._device = resolve_device(cfg.device, cfg.cpu_threads)
        _check_sessions(train, "train")
        if valid is not None:
            _check_sessions(valid, "valid", train.n_items)
            valid = last_sessions(valid, cfg.valid_max_sessions)
        report = FitReport(device=str(self._device))
        deadline = time.perf_counter() + cfg.max_seconds if cfg.max_seconds else None
        self._run(train, valid, cfg.max_epochs, "search", report, deadline)
        out_of_time = any(e.get("out_of_time") for e in report.epochs)
        if cfg.refit and valid is not None and report.best_epoch and not out_of_time:
            # Not under the time budget: the refit is as long as the search up to its best epoch, and a refit
            # cut short would replace validated weights by worse, unvalidated ones.
            self._run(concat_sessions(train, valid), None, report.best_epoch, "refit", report, None)
        report.train_seconds = float(sum(e["train_seconds"] + e["valid_seconds"] for e in report.epochs))
        train_time = sum(e["train_seconds"] for e in report.epochs)
        report.events_per_second = sum(e["events"] for e in report.epochs) / train_time if train_time > 0 else None
        return report

    def score(self, prefixes: Prefixes) -> np.ndarray:
        sessions = self._vectors(prefixes)
        return (sessions @ self._item_matrix().T).cpu().numpy()

    def session_embeddings(self, prefixes: Prefixes) -> np.ndarray:
        return self._vectors(prefixes).cpu().numpy()

    def item_embeddings(self) -> np.ndarray:
        self._require_fitted()
        import torch

        with torch.inference_mode():
            return self._item_matrix().cpu().numpy()

    def save(self, directory: Path) -> None:
        from sessionrec.ops.models.registry import write_state

        self._require_fitted()
        arrays = {key: value.detach().float().cpu().numpy() for key, value in self.network.state_dict().items()}
        write_state(Path(directory), self.config, {"n_items": np.array(self.n_items), **arrays})

    @classmethod
    def load(cls, directory: Path) -> "NeuralSessionModel":
        import torch

        from sessionrec.ops.models.registry import read_state

        config, arrays = read_state(Path(directory), cls.name, cls.config_class)
        model = cls(config)
        model.n_items = int(arrays.pop("n_items"))
        with torch.random.fork_rng(devices=[]):  # the throw-away initialisation leaves the caller's RNG alone
            network = model._build(model.n_items)
        try:
            network.load_state_dict({key: torch.from_numpy(value) for key, value in arrays.items()})
        except RuntimeError as exc:
            raise TrainingError(f"the saved {cls.name} in {directory} does not match its config: {exc}") from exc
        model.network = network.to(model.device).eval()
        return model

    # -------------------------------------------------------------------------------------------- internals

    def _require_fitted(self) -> None:
        if self.network is None:
            raise TrainingError(f"{self.name} is not fitted: call fit() or load() first")

    def _vectors(self, prefixes: Prefixes) -> "torch.Tensor":
        import torch

        self._require_fitted()
        sequences = check_prefixes(prefixes, self.n_items)
        self.network.eval()
        with torch.inference_mode():
            return self._session_vectors(sequences)

    def _validate(self, valid: SessionData) -> dict[str, float]:
        import torch

        self.network.eval()
        ranks = []
        with torch.inference_mode():
            items = self._item_matrix()
            for vectors, targets in self._position_vectors(valid):
                ranks.append(pessimistic_ranks(vectors @ items.T, targets).cpu().numpy())
        metrics = metrics_from_ranks(np.concatenate(ranks) if ranks else np.zeros(0), (CUTOFF,))
        return {key: metrics[key] for key in (f"recall@{CUTOFF}", f"mrr@{CUTOFF}")}

    def _checkpoint_path(self, phase: str) -> Path | None:
        if self.config.checkpoint_dir is None:
            return None
        return Path(self.config.checkpoint_dir) / f"{self.name}-{phase}.pt"

    def _identity(self, phase: str, *parts: SessionData) -> str:
        settings = {"model": self.name, "phase": phase, **self.config.hyper_parameters()}
        settings = json.dumps(settings, sort_keys=True)
        return hashlib.blake2b(settings.encode(), digest_size=16).hexdigest() + data_fingerprint(*parts)

    def _run(
        self,
        train: SessionData,
        valid: SessionData | None,
        epochs: int,
        phase: str,
        report: FitReport,
        deadline: float | None,
    ) -> None:
        """One training phase: fresh network, optional resume, epochs with validation and early stopping."""
        import torch

        torch.manual_seed(self.config.seed)
        self.n_items = train.n_items
        self.network = self._build(train.n_items).to(self.device)
        optimizer = self._make_optimizer(self.network)
        prepared, epoch_events = self._prepare(train)
        identity = self._identity(phase, train, *([valid] if valid is not None else []))
        path = self._checkpoint_path(phase)
        state = self._restore(path, identity, optimizer) if path is not None and path.exists() else _LoopState()
        bars = _progress_enabled(self.config.progress)
        outer = _bar(bars, total=epochs, initial=state.epoch, desc=f"{self.name} {phase}", unit="epoch")
        try:
            while not state.finished and state.epoch < epochs:
                state.epoch += 1
                record = self._epoch(prepared, optimizer, epoch_events, valid, state, deadline, bars)
                record["refit"] = float(phase == "refit")
                state.history.append(record)
                if valid is None:
                    state.best_epoch = state.epoch
                elif state.best_mrr is None or record[f"valid_mrr@{CUTOFF}"] > state.best_mrr:
                    state.best_epoch, state.best_mrr = state.epoch, record[f"valid_mrr@{CUTOFF}"]
                    state.bad_epochs = 0
                    state.best_weights = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
                else:
                    state.bad_epochs += 1
                state.finished = (
                    state.bad_epochs >= self.config.patience
                    or state.epoch >= epochs
                    or bool(record.get("out_of_time"))
                )
                if path is not None:
                    self._save_checkpoint(path, identity, optimizer, state)
                outer.update(1)
                shown = {k: f"{v:.4f}" for k, v in record.items() if k in ("loss", f"valid_mrr@{CUTOFF}")}
                outer.set_postfix(shown, refresh=False)
        finally:
            outer.close()
        if state.best_weights is not None:
            self.network.load_state_dict(state.best_weights)
        self.network.eval()
        report.epochs.extend(state.history)
        if phase == "search":
            report.best_epoch, report.best_valid_mrr = state.best_epoch, state.best_mrr

    def _epoch(
        self,
        prepared: Any,
        optimizer: Any,
        epoch_events: int,
        valid: SessionData | None,
        state: _LoopState,
        deadline: float | None,
        bars: bool,
    ) -> dict[str, float]:
        bar = _bar(bars, total=epoch_events, desc=f"epoch {state.epoch}", unit="ev", leave=False)
        meter = EpochMeter(bar, deadline)
        started = time.perf_counter()
        self.network.train()
        try:
            self._train_epoch(prepared, optimizer, meter)
            synchronize(self.device)
            meter.close()
        finally:
            bar.close()
        record: dict[str, float] = {
            "epoch": float(state.epoch),
            "loss": meter.mean_loss(),
            "events": float(meter.events),
            "train_seconds": time.perf_counter() - started,
        }
        if meter.out_of_time:
            record["out_of_time"] = 1.0
        started = time.perf_counter()
        if valid is not None:
            record.update({f"valid_{k}": v for k, v in self._validate(valid).items()})
        record["valid_seconds"] = time.perf_counter() - started
        if not math.isfinite(record["loss"]):
            raise TrainingError(
                f"{self.name}: the training loss became {record['loss']} in epoch {state.epoch}; "
                "lower learning_rate (or raise the batch size)"
            )
        return record

    def _save_checkpoint(self, path: Path, identity: str, optimizer: Any, state: _LoopState) -> None:
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": CHECKPOINT_VERSION,
            "identity": identity,
            "network": self.network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "loop": dataclasses.asdict(state),
        }
        partial = path.with_suffix(".partial")
        torch.save(payload, partial)
        os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint intact

    def _restore(self, path: Path, identity: str, optimizer: Any) -> _LoopState:
        import torch

        try:
            payload = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise TrainingError(f"checkpoint {path} cannot be read ({exc}); delete it to start over") from exc
        if payload.get("version") != CHECKPOINT_VERSION or payload.get("identity") != identity:
            raise TrainingError(
                f"checkpoint {path} was written for other data or hyper-parameters; delete it or use another "
                "checkpoint_dir"
            )
        self.network.load_state_dict(payload["network"])
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"].cpu())
        if payload["cuda_rng"] is not None:
            torch.cuda.set_rng_state(payload["cuda_rng"].cpu(), self.device)
        return _LoopState(**payload["loop"])


def _progress_enabled(flag: bool) -> bool:
    return flag and sys.stderr.isatty()


def _bar(enabled: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kwargs)


# ---------------------------------------------------------------------------------------------------- tuning


def tune(
    model_name: str,
    train: SessionData,
    valid: SessionData,
    n_trials: int = 20,
    timeout: float | None = None,
    base: TrainConfig | None = None,
    on_trial: Callable[[int, float, dict[str, Any]], None] | None = None,
) -> TrainConfig:
    """A small Optuna (TPE, seeded) search of ``model_name``'s ``search_space`` on the validation split.

    Every trial trains with early stopping on ``valid`` and is scored by its best validation MRR@20; the best
    trial's config (``base`` with the suggested values, progress bars off) is returned. ``timeout`` (seconds)
    stops starting new trials; ``on_trial`` receives (trial number, MRR@20, suggested values).
    """
    import optuna

    from sessionrec.ops.models.registry import model_class

    cls = model_class(model_name)
    if not issubclass(cls, NeuralSessionModel):
        raise TrainingError(f"{model_name} is not a neural model; tune() searches gru4rec or sasrec")
    if n_trials < 1:
        raise TrainingError(f"n_trials must be at least 1, got {n_trials}")
    base = base if base is not None else cls.config_class()
    base = dataclasses.replace(base, progress=False, checkpoint_dir=None)

    def objective(trial: optuna.Trial) -> float:
        config = dataclasses.replace(base, **cls.search_space(trial))
        report = cls(config).fit(train, valid)
        mrr = report.best_valid_mrr or 0.0
        if on_trial is not None:
            on_trial(trial.number, mrr, trial.params)
        return mrr

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=base.seed))
    study.optimize(objective, n_trials=n_trials, timeout=timeout)
    return dataclasses.replace(base, **cls.search_space(optuna.trial.FixedTrial(study.best_trial.params)))
