"""Load benchmark of the recommendation service over loopback.

What one run measures, on the same machine and in the same run, so the figures can be compared:

1. ``ranking``: the in-process ranking call alone (`Ranker.rank`, no HTTP): one request at a time, and 64 at a
   time (the adaptive batching path).
2. ``echo``: a bare Starlette echo endpoint under uvicorn (one process): this machine's ceiling for a Python HTTP
   service.
3. ``bentoml``: the service as deployed (`server.serve_command`: ``bentoml serve``), models loaded from a real
   MLflow registry, driven at fixed concurrency levels per endpoint: ``/recommend`` (sessions replayed event by
   event, so the server-side session grows as in a real visit), ``/events`` and ``/feedback``.
4. ``uvicorn`` (``--compare-uvicorn``): the same app under plain uvicorn, to show what the BentoML layer costs.
5. ``ann``: recall@100 of the HNSW index versus exact search, on real session embeddings, and the search time of
   both (for a model with embeddings).

Data: ``--data synthetic`` (default) generates sessions over a ``--items`` catalogue (default 50,000: the target's
size) with `ops.generate` and replays held-out sessions; ``--data yoochoose`` trains on the YOOCHOOSE 100k slice
and replays its test sessions (a real dataset, ~3k items). The model (default ``gru4rec``, a small config bounded
by ``--train-seconds``) is fitted, logged and promoted to champion in a temporary registry.

The load client is asyncio over raw keep-alive HTTP/1.1 connections (one per virtual user): cheaper per request
than an HTTP library, which matters because it shares the 2 cores with the server. Each level is bounded by
``--seconds`` and ``--max-requests``. Results print as a table and go to ``--out`` as JSON.

    .venv/bin/python benchmarks/serve_load.py --concurrency 16 64 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from sessionrec.config import GeneratorConfig, Settings
from sessionrec.ops.evaluation import item_popularity
from sessionrec.ops.models.base import FitReport, Prefixes, SessionModel
from sessionrec.ops.models.registry import create_model
from sessionrec.ops.sessiondata import ItemIndex, SessionData, read_split_tsv

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SESSIONREC_SHARED_DATA", REPO.parent / "shared" / "data"))
YOOCHOOSE = SHARED / "yoochoose" / "session-rec"
KEY, ADMIN = "bench-key", "bench-admin"
START_TIMEOUT_S = 180


# -- servers run as child processes (`python serve_load.py _echo PORT` / `_app PORT SETTINGS`) --------------------


def _echo_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    return Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])])


def _child(argv: list[str]) -> None:
    import uvicorn

    if argv[0] == "_echo":
        uvicorn.run(_echo_app(), host="127.0.0.1", port=int(argv[1]), log_level="warning", access_log=False)
    else:
        from sessionrec.serving.app import RecommenderApp
        from sessionrec.serving.model_provider import RegistrySource

        settings = Settings.model_validate_json(Path(argv[2]).read_text())
        source = RegistrySource(settings.tracking_uri, settings.tracking.registered_model)
        app = RecommenderApp(settings, lambda: source)
        uvicorn.run(app, host="127.0.0.1", port=int(argv[1]), log_level="warning", access_log=False)


# -- data and model ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    index: ItemIndex
    train: SessionData
    replay: list[list[str]]  # held-out sessions (item ids), replayed event by event
    items: pl.DataFrame | None  # item table (item_id, category, popularity) when the data has categories


def synthetic(n_items: int, n_events: int, seed: int) -> Workload:
    from sessionrec.ops.generate import generate_events

    events = generate_events(GeneratorConfig(n_events=n_events, n_items=n_items, n_users=n_events // 10, days=7,
                                             seed=seed))
    frame = events.select(
        pl.col("session_id").alias("SessionId"),
        pl.col("item_id").alias("ItemId"),
        (pl.col("timestamp").dt.epoch("ms") / 1000.0).alias("Time"),
    )
    sessions = frame["SessionId"].unique(maintain_order=True)
    held_out = set(sessions.tail(max(1, len(sessions) // 20)).to_list())
    train_frame = frame.filter(~pl.col("SessionId").is_in(held_out))
    # The whole catalogue, including items nobody clicked in the training window (they still can be served).
    index = ItemIndex.from_items(pl.Series([f"i{i}" for i in range(n_items)]))
    train, _ = SessionData.from_frame(train_frame, index)
    replay = (
        frame.filter(pl.col("SessionId").is_in(held_out)).group_by("SessionId", maintain_order=True)
        .agg(pl.col("ItemId"))["ItemId"].to_list()
    )
    # Item table: the category of every item, popularity counted on the training sessions only.
    trained = events.filter(~pl.col("session_id").is_in(held_out)).group_by("item_id").len("popularity")
    items = (
        events.group_by("item_id").agg(pl.col("category").first())
        .join(trained, on="item_id", how="left")
        .with_columns(pl.col("popularity").cast(pl.Float64))
    )
    return Workload(f"synthetic, {n_items:,} items", index, train, [s for s in replay if len(s) >= 2], items)


def yoochoose() -> Workload:
    frame = read_split_tsv(YOOCHOOSE / "yoochoose-clicks-100k_train_full.txt")
    index = ItemIndex.from_items(frame["ItemId"])
    train, _ = SessionData.from_frame(frame, index)
    test = read_split_tsv(YOOCHOOSE / "yoochoose-clicks-100k_test.txt")
    replay = test.group_by("SessionId", maintain_order=True).agg(pl.col("ItemId"))["ItemId"].to_list()
    sessions = [s for s in replay if len(s) >= 2]
    return Workload(f"YOOCHOOSE 100k slice, {len(index):,} items", index, train, sessions, None)


def fit(name: str, data: Workload, train_seconds: float) -> SessionModel:
    overrides = {}
    if name == "gru4rec":
        overrides = {"layers": (64,), "n_sample": 512, "max_epochs": 1, "progress": False, "device": "cpu",
                     "max_seconds": train_seconds}
    model = create_model(name, **overrides)
    model.fit(data.train)
    return model


def register(model: SessionModel, data: Workload, settings: Settings) -> None:
    from sessionrec.integrations.mlflow_registry import Registry
    from sessionrec.integrations.mlflow_tracking import TrackingStore

    from sessionrec.serving.candidates import model_candidate_index

    store = TrackingStore(settings.tracking_uri, settings.artifacts_dir, settings.tracking.experiment)
    evaluation = {"dataset_fingerprint": "serve-load-benchmark"}
    popular = np.argsort(-item_popularity(data.train), kind="stable")
    candidates = model_candidate_index(model, popular, settings.serving.ann_threshold_items)
    run = store.log_training_run(model, data.index, FitReport(), evaluation, {}, {"fingerprint": "serve-load"}, {},
                                 candidates=candidates)
    registry = Registry(settings.tracking_uri, settings.tracking.registered_model)
    registry.promote(registry.register(run, evaluation, "serve-load-benchmark"), "serve_load benchmark")


# -- load client --------------------------------------------------------------------------------------------------


@dataclass
class Level:
    target: str
    endpoint: str
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    fallbacks: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, float | int | str]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "target": self.target, "endpoint": self.endpoint, "concurrency": self.concurrency,
            "requests": self.requests, "rps": self.requests / self.seconds if self.seconds else 0.0,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "error_rate": self.errors / max(self.requests, 1),
            "fallback_rate": self.fallbacks / max(self.requests, 1),
        }


def _request(path: str, body: dict, headers: str = f"X-API-Key: {KEY}\r\n") -> bytes:
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(payload)}\r\n\r\n")
    return head.encode() + payload


class Replayer:
    """Bodies for one virtual user: it replays sessions event by event under fresh session ids (``run`` keeps the
    ids of different levels apart, so that no level continues the sessions of another)."""

    def __init__(self, endpoint: str, sessions: list[list[str]], user: int, run: str) -> None:
        self.endpoint, self.sessions, self.user, self.run = endpoint, sessions, user, run
        self.rng = random.Random(user)
        self.visit = 0
        self._start()

    def _start(self) -> None:
        self.session = self.sessions[self.rng.randrange(len(self.sessions))]
        self.position = 0
        self.visit += 1

    def next(self) -> bytes:
        if self.position >= len(self.session):
            self._start()
        session_id = f"bench-{self.run}-{self.user}-{self.visit}"
        item = self.session[self.position]
        self.position += 1
        if self.endpoint == "/recommend":
            return _request("/recommend", {"session_id": session_id, "events": [{"item_id": item}], "k": 20})
        if self.endpoint == "/events":
            return _request("/events", {"session_id": session_id, "events": [{"item_id": item}]})
        if self.endpoint == "/feedback":
            return _request("/feedback", {"request_id": f"{session_id}-{self.position}", "event_type": "click",
                                          "item_id": item})
        return _request("/echo", {"session_id": session_id, "events": [{"item_id": item}], "k": 20})


async def _user(
    port: int, replayer: Replayer, level: Level, deadline: float, budget: list[int], delay: float
) -> None:
    await asyncio.sleep(delay)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            request = replayer.next()
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            level.latencies_ms.append((time.perf_counter() - started) * 1000.0)
            level.requests += 1
            if not head[9:10] == b"2":
                level.errors += 1
            elif replayer.endpoint == "/recommend" and b'"fallback":null' not in body:
                level.fallbacks += 1
    except (OSError, asyncio.IncompleteReadError):
        level.errors += 1
    finally:
        writer.close()


async def drive(target: str, port: int, endpoint: str, sessions: list[list[str]], concurrency: int, seconds: float,
                max_requests: int, ramp_seconds: float = 0.0) -> Level:
    """``concurrency`` virtual users, each on its own keep-alive connection; they start one after the other over
    ``ramp_seconds`` (as a client pool grows with traffic). Opened in one burst, the connections of a multi-worker
    server all land on whichever worker process accepts first (asyncio accepts every pending connection at once)."""
    level = Level(target, endpoint, concurrency)
    started = time.perf_counter()
    budget = [max_requests]
    run = f"{os.getpid()}.{time.monotonic_ns()}"
    await asyncio.gather(*(_user(port, Replayer(endpoint, sessions, u, run), level, started + seconds, budget,
                                 ramp_seconds * u / concurrency)
                           for u in range(concurrency)))
    level.seconds = time.perf_counter() - started
    return level


# -- measurements -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {START_TIMEOUT_S} s")


def _wait_all_workers(port: int) -> None:
    """With several worker processes /readyz answers from one of them: wait until 50 recommendations in a row, each
    on a new connection (so that the kernel hands them to different workers), are served (a worker still loading
    answers 503)."""
    import httpx

    body = {"session_id": "warm-up", "k": 5}
    deadline, in_a_row = time.monotonic() + START_TIMEOUT_S, 0
    with httpx.Client() as client:
        while in_a_row < 50:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not all become ready")
            headers = {"X-API-Key": KEY, "Connection": "close"}
            status = client.post(f"http://127.0.0.1:{port}/recommend", json=body, headers=headers).status_code
            in_a_row = in_a_row + 1 if status == 200 else 0
            if status != 200:
                time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def in_process_ranking(model: SessionModel, data: Workload, settings: Settings, n: int) -> dict[str, float]:
    from sessionrec.serving.model_provider import LoadedVersion, make_servable, single_threaded_inference
    from sessionrec.serving.ranking import Ranker, RankRequest

    table = _item_table(data, settings)
    servable = make_servable(LoadedVersion(model, data.index, "bench"), "champion", table, settings.serving)
    rng = random.Random(0)
    requests = []
    for _ in range(n):
        session = data.replay[rng.randrange(len(data.replay))]
        requests.append(RankRequest(session[: rng.randint(1, len(session))], k=20))
    with ThreadPoolExecutor(4, initializer=single_threaded_inference) as executor:
        ranker = Ranker(settings.serving.candidates, settings.serving.latency_budget_ms, executor)

        async def run() -> tuple[list[float], float, float]:
            for request in requests[:50]:  # warm-up
                await ranker.rank(servable, request)
            times = []
            for request in requests:
                started = time.perf_counter()
                await ranker.rank(servable, request)
                times.append((time.perf_counter() - started) * 1000.0)
            started = time.perf_counter()
            for lo in range(0, len(requests), 64):
                await asyncio.gather(*(ranker.rank(servable, r) for r in requests[lo : lo + 64]))
            batched = len(requests) / (time.perf_counter() - started)
            return times, 1000.0 / float(np.mean(times)), batched

        times, sequential, batched = asyncio.run(run())
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "calls_per_s_sequential": sequential, "calls_per_s_64_concurrent": batched,
            "candidates": servable.candidates.describe() if servable.candidates else {"kind": "model top-N"}}


def ann_recall(model: SessionModel, data: Workload, n_queries: int = 500) -> dict[str, float | int] | None:
    """Exact versus the HNSW index the service would build (tuned as `make_servable` tunes it), on real replayed
    session prefixes: recall@100 and single-query search time."""
    from sessionrec.serving.candidates import REQUIRED_RECALL, exact_index, hnsw_index, recall_at, single_threaded
    from sessionrec.serving.candidates import ANN_TUNING_QUERIES

    vectors = model.item_embeddings()
    if vectors is None:
        return None
    single_threaded()
    popular = np.argsort(-item_popularity(data.train), kind="stable")[:ANN_TUNING_QUERIES]
    tuning = model.session_embeddings(Prefixes([np.array([i]) for i in popular], np.zeros(len(popular))))
    rng = random.Random(1)
    prefixes = []
    while len(prefixes) < n_queries:
        session = data.replay[rng.randrange(len(data.replay))]
        codes, _ = data.index.encode(session[: rng.randint(1, len(session))])
        if len(codes):
            prefixes.append(codes)
    queries = np.asarray(model.session_embeddings(Prefixes(prefixes, np.zeros(len(prefixes)))), dtype=np.float32)
    exact = exact_index(vectors)
    started = time.perf_counter()
    ann = hnsw_index(vectors, np.asarray(tuning), exact=exact)
    build_s = time.perf_counter() - started

    def per_query_ms(index) -> float:
        started = time.perf_counter()
        for row in queries:
            index.search(row[None, :], 100)
        return (time.perf_counter() - started) * 1000.0 / len(queries)

    replayed = recall_at(ann, exact, queries)
    return {"items": len(vectors), "dimensions": int(vectors.shape[1]), **ann.params,
            "recall_at_100_tuning": ann.recall, "recall_at_100_replayed_sessions": replayed,
            "meets_required_recall": replayed >= REQUIRED_RECALL,
            "hnsw_build_s": build_s, "exact_search_ms": per_query_ms(exact), "hnsw_search_ms": per_query_ms(ann)}


def _item_table(data: Workload, settings: Settings):
    from sessionrec.serving.filters import ItemTable

    if data.items is None:
        return ItemTable()
    path = settings.serving_dir / "items.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    data.items.write_parquet(path)
    return ItemTable.load(None, path)


# -- the run -----------------------------------------------------------------------------------------------------


def _drive_all(
    target: str, port: int, endpoints: list[str], data: Workload, args: argparse.Namespace
) -> list[Level]:
    import uvloop

    levels = []
    for endpoint in endpoints:
        for concurrency in args.concurrency:
            level = uvloop.run(
                drive(target, port, endpoint, data.replay, concurrency, args.seconds, args.max_requests,
                      args.ramp_seconds)
            )
            levels.append(level)
            row = level.summary()
            print(f"  {target:8s} {endpoint:10s} c={concurrency:<4d} {row['rps']:8.0f} req/s"
                  f"  p50 {row['p50_ms']:6.1f}"
                  f"  p95 {row['p95_ms']:6.1f}  p99 {row['p99_ms']:6.1f} ms  errors {row['error_rate']:.2%}"
                  f"  fallbacks {row['fallback_rate']:.2%}", flush=True)
    return levels


def _spawn(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_echo", "_app"):
        _child(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["synthetic", "yoochoose"], default="synthetic")
    parser.add_argument("--items", type=int, default=50_000, help="catalogue size of the synthetic data")
    parser.add_argument("--events", type=int, default=200_000, help="synthetic events generated")
    parser.add_argument("--model", default="gru4rec")
    parser.add_argument("--train-seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=8.0, help="per level")
    parser.add_argument("--max-requests", type=int, default=50_000, help="per level")
    parser.add_argument("--ramp-seconds", type=float, default=1.0,
                        help="the virtual users of a level start one after the other over this time")
    parser.add_argument("--store", default=None, help="session store URL (default: SQLite under the temp home)")
    parser.add_argument("--ann-threshold", type=int, default=None,
                        help="serving.ann_threshold_items (catalogues this large get the HNSW index)")
    parser.add_argument("--candidates", type=int, default=None, help="serving.candidates")
    parser.add_argument("--workers", type=int, default=None,
                        help="server worker processes (default: serving.workers)")
    parser.add_argument("--compare-uvicorn", action="store_true", help="also drive the app under plain uvicorn")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args(argv)

    from sessionrec.serving.server import serve_command, serve_environment

    started = time.perf_counter()
    data = synthetic(args.items, args.events, seed=7) if args.data == "synthetic" else yoochoose()
    model = fit(args.model, data, args.train_seconds)
    print(f"{data.name}: {data.train.n_events:,} training events, {len(data.replay):,} sessions to replay; "
          f"{args.model} fitted ({time.perf_counter() - started:.0f} s)", flush=True)
    results: dict = {"data": data.name, "model": args.model, "cpus": os.cpu_count(), "levels": []}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        serving = {"api_keys": (KEY,), "admin_token": ADMIN, "rate_limit_per_minute": 100_000_000,
                   "session_store_url": args.store}
        if args.workers:
            serving["workers"] = args.workers
        serving.update({key: value for key, value in (("ann_threshold_items", args.ann_threshold),
                                                      ("candidates", args.candidates)) if value is not None})
        settings = Settings(home=Path(tmp), serving=serving)
        _item_table(data, settings)
        if data.items is not None:
            item_table = settings.serving_dir / "items.parquet"
            settings = Settings(home=Path(tmp), serving={**serving, "availability_path": item_table})
        register(model, data, settings)
        results["ranking"] = in_process_ranking(model, data, settings, n=2_000)
        ranking = results["ranking"]
        print(f"  in-process ranking: p50 {ranking['p50_ms']:.2f} ms, p99 {ranking['p99_ms']:.2f} ms, "
              f"{ranking['calls_per_s_sequential']:.0f} calls/s one at a time, "
              f"{ranking['calls_per_s_64_concurrent']:.0f} calls/s 64 at a time", flush=True)
        results["ann"] = ann_recall(model, data)
        if results["ann"]:
            print(f"  ANN: {json.dumps(results['ann'])}", flush=True)

        port = _free_port()
        echo = _spawn([sys.executable, __file__, "_echo", str(port)])
        try:
            _wait_ready(f"http://127.0.0.1:{port}/echo", echo)
            results["levels"] += [lv.summary() for lv in _drive_all("echo", port, ["/echo"], data, args)]
        finally:
            _stop(echo)

        port = _free_port()
        env = serve_environment(settings, Path(tmp) / "settings.json")
        server = _spawn(serve_command(settings, port), env)
        try:
            _wait_ready(f"http://127.0.0.1:{port}/readyz", server)
            _wait_all_workers(port)
            endpoints = ["/recommend", "/events", "/feedback"]
            results["levels"] += [lv.summary() for lv in _drive_all("bentoml", port, endpoints, data, args)]
        finally:
            _stop(server)

        if args.compare_uvicorn:
            port = _free_port()
            plain = _spawn([sys.executable, __file__, "_app", str(port), str(Path(tmp) / "settings.json")])
            try:
                _wait_ready(f"http://127.0.0.1:{port}/readyz", plain)
                levels = _drive_all("uvicorn", port, ["/recommend"], data, args)
                results["levels"] += [lv.summary() for lv in levels]
            finally:
                _stop(plain)

    echo_rps = {row["concurrency"]: row["rps"] for row in results["levels"] if row["target"] == "echo"}
    results["ratios"] = {
        f"{row['target']} /recommend vs echo, c={row['concurrency']}": row["rps"] / echo_rps[row["concurrency"]]
        for row in results["levels"]
        if row["endpoint"] == "/recommend" and echo_rps.get(row["concurrency"])
    }
    served = [row["rps"] for row in results["levels"]
              if row["target"] == "bentoml" and row["endpoint"] == "/recommend"]
    results["ratios"]["ranking alone (64 at a time) vs bentoml /recommend best"] = (
        results["ranking"]["calls_per_s_64_concurrent"] / max(served, default=float("nan"))
    )
    for name, ratio in results["ratios"].items():
        print(f"  ratio {name}: {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
