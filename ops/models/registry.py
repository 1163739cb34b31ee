"""Model names -> classes, typed creation from overrides, and the on-disk layout of a saved model.

Every model class has a ``config_class`` (a frozen dataclass of its hyper-parameters with defaults) and is
built as ``cls(config)``. A saved model is a directory with ``model.json`` (``{"name", "params"}``: how
`load_model` finds the class, and what a person reads) plus whatever the class's ``save`` writes; the classes of
this package write ``config.json`` and ``arrays.npz`` through `write_state` / `read_state`.

The neural modules are imported only when one of them is asked for: importing torch takes seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from pathlib import Path
from typing import Any

import numpy as np

from sessionrec.ops.errors import SessionrecError
from sessionrec.ops.models.base import SessionModel

MODEL_NAMES: tuple[str, ...] = ("pop", "rpop", "sknn", "vsknn", "stan", "vstan", "gru4rec", "sasrec", "hybrid")
#: Models that learn by gradient descent: they use the validation split for early stopping.
NEURAL_MODELS: tuple[str, ...] = ("gru4rec", "sasrec")

_CLASSES: dict[str, tuple[str, str]] = {
    "pop": ("sessionrec.ops.models.popularity", "Popularity"),
    "rpop": ("sessionrec.ops.models.popularity", "RecentPopularity"),
    "sknn": ("sessionrec.ops.models.knn", "SKNN"),
    "vsknn": ("sessionrec.ops.models.knn", "VSKNN"),
    "stan": ("sessionrec.ops.models.knn", "STAN"),
    "vstan": ("sessionrec.ops.models.knn", "VSTAN"),
    "gru4rec": ("sessionrec.ops.models.gru4rec", "GRU4Rec"),
    "sasrec": ("sessionrec.ops.models.sasrec", "SASRec"),
    "hybrid": ("sessionrec.ops.models.hybrid", "Hybrid"),
}

MODEL_FILE = "model.json"
CONFIG_FILE = "config.json"
ARRAYS_FILE = "arrays.npz"


class ModelError(SessionrecError):
    """An unknown model name, a bad hyper-parameter or an unreadable saved model."""


def model_class(name: str) -> type[SessionModel]:
    if name not in _CLASSES:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    module, attr = _CLASSES[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:  # a missing optional dependency (torch) or module: say which model needs it
        raise ModelError(f"model {name!r} cannot be loaded ({exc}); check the installation") from exc


def _check_type(name: str, field: str, value: Any, expected: Any) -> None:
    origin = typing.get_origin(expected)
    if origin is typing.Literal:
        if value not in typing.get_args(expected):
            raise ModelError(f"{name}: {field} must be one of {typing.get_args(expected)}, got {value!r}")
        return
    if origin is not None:  # unions / containers: the config's own __post_init__ checks the details
        return
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ModelError(f"{name}: {field} must be {expected.__name__}, got {value!r} ({type(value).__name__})")


def make_config(name: str, config_class: type, overrides: dict[str, Any]) -> Any:
    """``config_class(**overrides)`` with a message naming the valid keys and types instead of a TypeError."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ModelError(f"{name}: unknown hyper-parameter(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(config_class)
    values = dict(overrides)
    for key, value in overrides.items():
        if isinstance(value, list):  # JSON has no tuples
            values[key] = value = tuple(value)
        _check_type(name, key, value, hints[key])
    try:
        return config_class(**values)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{name}: {exc}") from exc


def create_model(name: str, **overrides: Any) -> SessionModel:
    """A new, unfitted model ``name`` with its default hyper-parameters updated by ``overrides``."""
    cls = model_class(name)
    return cls(make_config(name, cls.config_class, overrides))  # type: ignore[attr-defined, call-arg]


def save_model(model: SessionModel, directory: Path) -> None:
    """Save ``model`` into ``directory`` (created) so that `load_model` restores it with identical scores."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory)
    (directory / MODEL_FILE).write_text(json.dumps({"name": model.name, "params": model.params()}, indent=2))


def load_model(directory: Path) -> SessionModel:
    """Inverse of `save_model`."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{directory} holds no saved model ({MODEL_FILE} missing): save it with save_model")
    try:
        name = json.loads(path.read_text())["name"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is damaged ({exc}); save the model again") from exc
    return model_class(name).load(Path(directory))


def write_state(directory: Path, config: Any, arrays: dict[str, np.ndarray]) -> None:
    """Persist a dataclass config (JSON) and numpy arrays (npz, no pickle)."""
    directory = Path(directory)
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    np.savez(directory / ARRAYS_FILE, **arrays)


def read_state(directory: Path, name: str, config_class: type) -> tuple[Any, dict[str, np.ndarray]]:
    """Inverse of `write_state`."""
    directory = Path(directory)
    try:
        values = json.loads((directory / CONFIG_FILE).read_text())
        with np.load(directory / ARRAYS_FILE, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the saved {name} model in {directory}: {exc}") from exc
    return make_config(name, config_class, values), arrays
