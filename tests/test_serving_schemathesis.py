"""Schemathesis against the service's own OpenAPI document, over real HTTP: no 5xx, no schema violation.

The app runs under uvicorn on a free loopback port (in a thread), serving a popularity champion and an SKNN
challenger fitted on a YOOCHOOSE slice; every operation is exercised with generated valid and invalid requests,
authenticated with an API key and the admin token (schemathesis also checks that requests without them are
refused). Hypothesis is driven directly, one operation and generation mode at a time, rather than through
schemathesis's pytest plugin (whose fixture loader does not run under pytest 9).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from sessionrec.config import Settings
from sessionrec.ops.models.registry import create_model
from sessionrec.ops.sessiondata import ItemIndex, SessionData, read_split_tsv
from sessionrec.serving.app import RecommenderApp
from sessionrec.serving.model_provider import LoadedVersion, StaticSource

KEY, ADMIN = "schema-key", "schema-admin"
MAX_EXAMPLES = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    frame = read_split_tsv(shared_data / "yoochoose/session-rec/yoochoose-clicks-100k_train_full.txt").head(5_000)
    index = ItemIndex.from_items(frame["ItemId"])
    train, _ = SessionData.from_frame(frame, index)
    champion, challenger = create_model("pop"), create_model("sknn")
    champion.fit(train)
    challenger.fit(train)
    source = StaticSource({"champion": LoadedVersion(champion, index, "1"),
                           "challenger": LoadedVersion(challenger, index, "2")})
    settings_ = Settings(
        home=tmp_path_factory.mktemp("schemathesis"),
        serving={"api_keys": (KEY,), "admin_token": ADMIN, "session_store_url": "memory://", "workers": 1,
                 "rate_limit_per_minute": 10_000_000, "latency_budget_ms": 2_000.0},
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(RecommenderApp(settings_, lambda: source), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the service did not become ready in 60 s"
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def test_api_conforms_to_its_schema(base_url: str) -> None:
    """Every operation, with valid and with invalid requests (schemathesis's default checks on each answer)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 9
    for operation in operations:
        # Operations without a body have no invalid input to generate.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(operation.body) else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                case.call_and_validate(base_url=base_url, headers={"X-API-Key": KEY, "X-Admin-Token": ADMIN})

            check()
