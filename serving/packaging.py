"""Build the service's Bento (what the Dagster asset after a promotion calls; it records the returned tag).

``bentoml build`` runs as a child process: BentoML reads ``BENTOML_HOME`` once, when it is imported, so a build
into a given store is only reliable in a process that starts with it set. The Bento content is bentofile.yaml's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sessionrec.ops.errors import SessionrecError

#: The repository root: bentofile.yaml and the files it includes live there.
REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 600


class BentoBuildError(SessionrecError):
    """``bentoml build`` failed; the message carries the end of its output."""


def build_bento(bentoml_home: Path, labels: dict[str, str] | None = None, repo_root: Path = REPO_ROOT) -> str:
    """Build the Bento into the store at ``bentoml_home``; returns its tag (``sessionrec-recommender:<version>``).

    ``labels`` are recorded on the Bento (for example the champion's registry version it was built after).
    """
    command = [sys.executable, "-m", "bentoml", "build", str(repo_root), "--output", "tag"]
    for key, value in (labels or {}).items():
        command += ["--label", f"{key}={value}"]
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BentoBuildError(f"bentoml build did not finish in {BUILD_TIMEOUT_S} s") from exc
    tags = [line.removeprefix("__tag__:") for line in done.stdout.splitlines() if line.startswith("__tag__:")]
    if done.returncode != 0 or not tags:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise BentoBuildError(f"bentoml build failed (exit status {done.returncode}):\n{tail}")
    return tags[-1]
