"""Entry point of the Bento: makes the Bento's source folder importable as ``sessionrec``, then exposes the
service.

The repository root *is* the ``sessionrec`` package (pyproject maps it), so its modules import each other as
``sessionrec.ops...``. ``bentoml build`` copies the files it includes from the repository root into the Bento's
``src/`` folder as they are, without a ``sessionrec`` folder around them, and the Bento does not pip-install the
project (that would pull in every dependency of the platform, Dagster included). This module registers ``src/``
under the package name ``sessionrec``, exactly as the editable install does for the repository, so that the same
import lines work in both places. bentofile.yaml names ``serving.bento_entry:Recommender`` as the service.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]

if "sessionrec" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "sessionrec", _ROOT / "__init__.py", submodule_search_locations=[str(_ROOT)]
    )
    _package = importlib.util.module_from_spec(_spec)
    sys.modules["sessionrec"] = _package
    _spec.loader.exec_module(_package)

from sessionrec.serving.service import Recommender  # noqa: E402

__all__ = ["Recommender"]
