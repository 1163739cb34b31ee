"""`serve`: run the recommendation service locally (what ``sessionrec serve --port PORT`` calls).

It runs the same BentoML service the Bento runs, as a ``bentoml serve`` child process, so that a local server
behaves like a deployed one. The settings travel to the worker processes as a JSON file readable only by the
user (it holds the API keys), removed when the server stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from sessionrec.config import Settings
from sessionrec.ops.errors import SessionrecError
SERVICE = "sessionrec.serving.service:Recommender"
#: Names the settings file of the worker processes (read by `service.settings_from_environment`).
SETTINGS_FILE_ENV = "SESSIONREC_SETTINGS_FILE"


def serve_command(settings: Settings, port: int) -> list[str]:
    host = settings.serving.host
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]


def serve_environment(settings: Settings, settings_file: Path) -> dict[str, str]:
    """The child's environment: the settings file, BentoML's state under the project's, no telemetry."""
    settings_file.write_text(settings.model_dump_json(), encoding="utf-8")
    settings_file.chmod(0o600)
    return {
        **os.environ,
        SETTINGS_FILE_ENV: str(settings_file),
        "BENTOML_HOME": str(settings.home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def serve(settings: Settings, port: int) -> None:
    """Serve until interrupted (Ctrl-C stops the server cleanly)."""
    if not settings.serving.api_keys:
        raise SessionrecError(
            "no API keys configured: set SESSIONREC_API_KEYS (comma-separated) or serving.api_keys in the "
            "config file"
        )
    settings.serving_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sessionrec-serve-") as tmp:
        env = serve_environment(settings, Path(tmp) / "settings.json")
        process = subprocess.Popen(serve_command(settings, port), env=env)
        # A SIGTERM to this process (a supervisor stopping `sessionrec serve`) stops the server too.
        previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())
        try:
            returncode = process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child as well (same process group): let it finish
            returncode = process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if returncode not in (0, -signal.SIGINT, -signal.SIGTERM, 130):
        raise SessionrecError(f"the recommendation server exited with status {returncode}; see its log above")
