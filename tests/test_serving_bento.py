"""The service as deployed: `serve()` (what `sessionrec serve` runs: a real `bentoml serve` child process)
answering from models registered in a real MLflow registry, and the Bento that `bentoml build` makes.

Both models are fitted on a YOOCHOOSE slice and logged, registered and promoted through the project's registry
API, exactly as training does. The server runs on a free loopback port with a bounded start-up wait and is
stopped with SIGTERM (it must exit on it) or killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from sessionrec.config import Settings
from sessionrec.integrations.mlflow_registry import Registry
from sessionrec.integrations.mlflow_tracking import TrackingStore
from sessionrec.ops.models.base import SessionModel
from sessionrec.ops.models.registry import create_model
from sessionrec.ops.sessiondata import ItemIndex, SessionData, read_split_tsv
from sessionrec.serving.packaging import build_bento

TRAIN = "yoochoose/session-rec/yoochoose-clicks-100k_train_full.txt"
KEY, ADMIN = "bento-key", "bento-admin"
START_TIMEOUT_S = 120
FORBIDDEN = ("dagster", "great_expectations", "great-expectations", "evidently")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Release:
    """Fit, log, register and promote models into the registry of ``settings`` (as the training assets do)."""

    def __init__(self, settings: Settings, shared_data: Path) -> None:
        frame = read_split_tsv(shared_data / TRAIN).head(20_000)
        self.index = ItemIndex.from_items(frame["ItemId"])
        self.train, _ = SessionData.from_frame(frame, self.index)
        self.sessions = [self.index.decode(self.train.session(s)[0]) for s in range(50)]
        self.store = TrackingStore(settings.tracking_uri, settings.artifacts_dir, settings.tracking.experiment)
        self.registry = Registry(settings.tracking_uri, settings.tracking.registered_model)

    def promote(self, name: str) -> int:
        model: SessionModel = create_model(name)
        report = model.fit(self.train)
        evaluation = {"mrr@20": 0.1, "dataset_fingerprint": "yoochoose-slice"}
        dataset = {"fingerprint": "yoochoose-slice"}
        run = self.store.log_training_run(model, self.index, report, evaluation, {}, dataset, {})
        version = self.registry.register(run, evaluation, "yoochoose-slice")
        self.registry.promote(version, f"test release of {name}")
        return version


@pytest.fixture(scope="module")
def release(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Release]:
    settings = Settings(
        home=tmp_path_factory.mktemp("bento-home"),
        serving={"api_keys": (KEY,), "admin_token": ADMIN, "registry_poll_seconds": 600.0},
    )
    made = Release(settings, shared_data)
    made.promote("pop")
    return settings, made


@pytest.fixture(scope="module")
def server(release: tuple[Settings, Release]) -> Iterator[str]:
    """`serve(settings, port)` in a child process, as the CLI calls it."""
    settings, _ = release
    port = _free_port()
    code = (
        "import sys; from sessionrec.config import Settings; from sessionrec.serving.server import serve; "
        "serve(Settings.model_validate_json(sys.stdin.read()), int(sys.argv[1]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    process.stdin.write(settings.model_dump_json())
    process.stdin.close()
    url = f"http://127.0.0.1:{port}"
    try:
        # Each request is a new connection, which any worker process may take: ready means every one answers.
        _until_every_worker(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, process)
        yield url
        process.send_signal(signal.SIGTERM)  # serve() must stop its bentoml child on SIGTERM
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _until_every_worker(check: Callable[[], bool], process: subprocess.Popen | None = None, in_a_row: int = 20) -> None:
    """Wait until ``check`` (one request on a new connection) holds ``in_a_row`` times in a row: the server's
    worker processes (2 by default) each load models and follow admin decisions on their own."""
    deadline, passed = time.monotonic() + START_TIMEOUT_S, 0
    while passed < in_a_row:
        assert process is None or process.poll() is None, f"the server exited:\n{process.stdout.read()[-3000:]}"
        try:
            passed = passed + 1 if check() else 0
        except httpx.TransportError:
            passed = 0
        assert time.monotonic() < deadline, "the server's workers did not all get there in time"
        if not passed:
            time.sleep(0.2)


def _recommend(url: str, session: list[str], k: int = 10) -> httpx.Response:
    body = {"session_id": f"s-{len(session)}", "events": [{"item_id": i} for i in session], "k": k}
    return httpx.post(f"{url}/recommend", json=body, headers={"X-API-Key": KEY}, timeout=10)


def test_served_from_the_registry_and_hot_reloaded(server: str, release: tuple[Settings, Release]) -> None:
    _, made = release
    answer = _recommend(server, made.sessions[0])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == {"name": "pop", "version": "1", "alias": "champion"} and body["fallback"] is None
    assert len(body["items"]) == 10 and not {i["item_id"] for i in body["items"]} & set(made.sessions[0])
    # Our probes and metrics answer, not BentoML's built-in ones.
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json()["detail"]["champion"]["version"] == "1"
    assert "sessionrec_request_latency_seconds_bucket" in httpx.get(f"{server}/metrics").text
    assert "/recommend" in httpx.get(f"{server}/openapi.json").json()["paths"]
    assert httpx.post(f"{server}/recommend", json={"session_id": "s"}).status_code == 401

    made.promote("vsknn")  # a new champion in the registry
    reload = httpx.post(f"{server}/admin/reload", headers={"X-Admin-Token": ADMIN}, timeout=120)
    assert reload.status_code == 200 and reload.json()["models"]["champion"] == "2", reload.text
    # The worker that took the reload tells the others through the shared control state; they follow within
    # seconds, and no request fails meanwhile (each is answered by the old model or the new one).
    answers: list[dict] = []

    def serves_v2() -> bool:
        answer = _recommend(server, made.sessions[0])
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
        return answers[-1]["model"]["version"] == "2"

    _until_every_worker(serves_v2)
    after = answers[-1]
    assert after["model"] == {"name": "vsknn", "version": "2", "alias": "champion"} and after["fallback"] is None
    assert {a["model"]["version"] for a in answers} <= {"1", "2"}


def test_bento_carries_only_what_serving_needs(tmp_path: Path) -> None:
    tag = build_bento(tmp_path / "bentoml", labels={"model_version": "7"})
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    manifest = (bento / "bento.yaml").read_text()
    assert "model_version: '7'" in manifest and "service: serving.bento_entry:Recommender" in manifest
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().lower()
    assert "bentoml==" in requirements and "faiss-cpu==" in requirements
    assert not [p for p in FORBIDDEN if p in requirements]
    src = bento / "src"
    assert (src / "serving" / "ranking.py").is_file() and not (src / "assets").exists()
    # The Bento's code imports and builds its service with Dagster, GX and Evidently made unimportable.
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {FORBIDDEN!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, '.')\n"
        "from serving.bento_entry import Recommender\n"
        "import sessionrec\n"
        "from sessionrec.ops.models.registry import MODEL_NAMES, model_class\n"
        "[model_class(name) for name in MODEL_NAMES]  # every model the registry may hold can be loaded\n"
        "print(Recommender.name, sessionrec.__path__[0])\n"
    )
    env = {**os.environ, "SESSIONREC_HOME": str(tmp_path / "home"), "SESSIONREC_API_KEYS": KEY}
    done = subprocess.run([sys.executable, "-c", blocker], cwd=src, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    service_name, package_root = done.stdout.split()
    assert service_name == "sessionrec-recommender" and Path(package_root) == src  # the Bento's copy, not the repo
    assert json.loads((bento / "apis" / "schema.json").read_text())["name"] == "sessionrec-recommender"
