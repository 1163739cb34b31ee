"""The serving process's state and operations, independent of the HTTP framework.

`ServingRuntime` owns the session store, the model provider, the rankers, the logs, the control state and the
background loops (registry polling, control-state polling, log flushing). The HTTP layer (`app.py`) only parses,
authenticates and serialises; everything the API *does* is a method here, so it is testable without a server.

Failure policy (the service must always answer): a session store that fails or is slow makes `/recommend` rank
the request's own events and `/events` say ``stored: false``; a model that fails or is slow is replaced by
popularity (`ranking.Ranker`); an unreachable registry leaves the last good models in service. Each of these is
counted in the metrics and visible in `/readyz`. The one refusal is a process that has never loaded a champion:
it answers 503 (`NotReadyError`) until it has one, as its `/readyz` says.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np

from sessionrec.config import Settings
from sessionrec.ops.errors import SessionrecError
from sessionrec.serving.auth import Authenticator, key_id
from sessionrec.serving.feedback import (
    FEEDBACK_SCHEMA,
    REQUEST_SCHEMA,
    SHADOW_SCHEMA,
    ParquetLog,
    RequestMemory,
    utc,
)
from sessionrec.serving.filters import ItemRulesError, ItemTable
from sessionrec.serving.metrics import ServingMetrics
from sessionrec.serving.model_provider import (
    LoadedVersion,
    ModelProvider,
    ModelSource,
    make_servable,
    single_threaded_inference,
)
from sessionrec.serving.ranking import (
    FALLBACK_ERROR,
    FALLBACK_TIMEOUT,
    Ranker,
    Ranking,
    RankRequest,
    ServableModel,
)
from sessionrec.serving.routing import CHALLENGER, CHAMPION, ControlState, RollbackGuard, assign_variant
from sessionrec.serving.session_store import SessionStore, StoredEvent, StoreLimits, open_session_store

log = logging.getLogger(__name__)

#: Threads scoring requests (one native thread each; see `model_provider.single_threaded_inference`).
MODEL_THREADS = 4
#: Share of the latency budget a session-store call may take inside `/recommend` before it is skipped.
STORE_BUDGET_SHARE = 0.4
#: Store timeout of `/events` and the admin calls (no ranking budget to protect there).
STORE_TIMEOUT_S = 1.0
#: Shadow scorings in flight at most; more are skipped (and counted) rather than queued behind live traffic.
MAX_SHADOW_INFLIGHT = 8
#: How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The event loop and
#: the ranking thread hand the GIL back and forth several times per request, and each wait can last that long.
#: Measured with GRU4Rec over 50k items (benchmarks/serve_load.py, plain uvicorn, 2 cores): default 5 ms, 8
#: concurrent clients: 312 req/s, p50 24.7 ms; 0.5 ms: 361 req/s, p50 21.1 ms (one client: p50 4.8 -> 3.2 ms).
GIL_SWITCH_INTERVAL_S = 0.0005
CONTROL_POLL_S = 1.0
HOUSEKEEPING_S = 1.0
STORE_SIZE_EVERY_S = 10.0


class NotReadyError(SessionrecError):
    """No champion has been loaded yet; the message says why (see `/readyz`)."""


def _store_limits(settings: Settings) -> StoreLimits:
    serving = settings.serving
    return StoreLimits(
        serving.max_session_events, float(serving.session_ttl_seconds), serving.session_timeout_minutes * 60
    )


class ServingRuntime:
    def __init__(self, settings: Settings, source: ModelSource, store: SessionStore | None = None) -> None:
        config = settings.serving
        self.settings = settings
        self.config = config
        self.auth = Authenticator(config.api_keys, config.admin_token, config.rate_limit_per_minute)
        self.metrics = ServingMetrics()
        self.table = ItemTable.load(config.blocklist_path, config.availability_path)
        self.provider = ModelProvider(source, self._build)
        self.store = store or open_session_store(
            config.session_store_url, _store_limits(settings), settings.serving_dir
        )
        self.control = ControlState.from_config(config)
        self.guard = RollbackGuard(config)
        # OpenMP's thread count is per calling thread: each ranking thread sets its own (FAISS would otherwise
        # start a team of spinning threads per search, which starves the event loop).
        self._executor = ThreadPoolExecutor(MODEL_THREADS, "rank", initializer=single_threaded_inference)
        self._shadow_executor = ThreadPoolExecutor(1, "shadow", initializer=single_threaded_inference)
        lanes = {"batches_in_flight": config.batches_in_flight, "prefix_items": config.model_prefix_items}
        self.ranker = Ranker(config.candidates, config.latency_budget_ms, self._executor, **lanes)
        self.shadow_ranker = Ranker(config.candidates, config.latency_budget_ms, self._shadow_executor, **lanes)
        logs = settings.serving_dir
        self.request_log = ParquetLog(logs / "requests", REQUEST_SCHEMA)
        self.feedback_log = ParquetLog(logs / "feedback", FEEDBACK_SCHEMA)
        self.shadow_log = ParquetLog(logs / "shadow", SHADOW_SCHEMA)
        self.memory = RequestMemory()
        self.store_error: str | None = None
        self._seen_generation = 0
        self._shadow_inflight = 0
        self._published: dict[str, tuple[str, str]] = {}  # alias -> (name, version) in the metrics
        # Request ids: a random prefix per process and a counter, unique across workers and restarts without a
        # system call per request.
        self._id_prefix = secrets.token_hex(11)
        self._request_counter = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._polled = False

    def _build(self, loaded: LoadedVersion, alias: str) -> ServableModel:
        """Build a servable and score one session with it before it takes traffic: first calls pay for lazy
        initialisation (torch kernels, numpy internals) that would otherwise push the first requests past the
        budget."""
        servable = make_servable(loaded, alias, self.table, self.config)
        single_threaded_inference()  # torch's thread count is process-wide: set it once torch is loaded
        self.ranker.score_batch(servable, [servable.rules.popular_order[:1]])
        return servable

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the shared control state and start the background loops; models load in the background."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        try:
            stored = await asyncio.wait_for(self.store.get_control(), STORE_TIMEOUT_S)
            self.control = ControlState.reconcile(stored, self.config)
            if stored != self.control.to_dict():
                await asyncio.wait_for(self.store.put_control(self.control.to_dict()), STORE_TIMEOUT_S)
        except Exception as exc:
            self._store_failed("reading the control state", exc)
        self._seen_generation = self.control.reload_generation
        self._publish_control()
        self._spawn(self._forever(self.config.registry_poll_seconds, self._refresh, first_wait=False))
        self._spawn(self._forever(CONTROL_POLL_S, self._follow_control))
        self._spawn(self._forever(HOUSEKEEPING_S, self._flush_logs))
        self._spawn(self._forever(STORE_SIZE_EVERY_S, self._count_sessions))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for journal in (self.request_log, self.feedback_log, self.shadow_log):
            await asyncio.to_thread(journal.flush)
        await self.store.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._shadow_executor.shutdown(wait=False, cancel_futures=True)

    @property
    def polled(self) -> bool:
        """The first registry poll has finished (whether or not it found a champion)."""
        return self._polled

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.metrics.errors.labels("background").inc()
            log.error("background task %s failed", task.get_coro(), exc_info=task.exception())

    async def _forever(self, every_s: float, step: Callable[[], Awaitable[None]], first_wait: bool = True) -> None:
        """Run ``step`` every ``every_s`` seconds; a failing step is logged and counted, and the loop goes on."""
        while True:
            if first_wait:
                await asyncio.sleep(every_s)
            first_wait = True
            try:
                await step()
            except Exception:
                self.metrics.errors.labels("background").inc()
                log.exception("background step %s failed", getattr(step, "__name__", step))

    async def _refresh(self, force: bool = False) -> None:
        before = self.provider.current
        await asyncio.to_thread(self.provider.refresh, force)
        if self.provider.current is not before:
            _freeze_long_lived_objects()
        self._publish_models()
        self._polled = True

    async def _follow_control(self) -> None:
        """Follow admin decisions taken on other workers or replicas (they live in the session store)."""
        try:
            stored = await asyncio.wait_for(self.store.get_control(), STORE_TIMEOUT_S)
        except Exception as exc:
            self._store_failed("polling the control state", exc)
            return
        if stored is None:
            return
        state = ControlState.reconcile(stored, self.config)
        if state.canary_share != self.control.canary_share:
            self.guard.reset()
        self.control = state
        self._publish_control()
        if state.reload_generation != self._seen_generation:
            self._seen_generation = state.reload_generation
            await self._reload_rules()
            await self._refresh(force=True)

    async def _flush_logs(self) -> None:
        for journal in (self.request_log, self.feedback_log, self.shadow_log):
            if journal.due():
                try:
                    await asyncio.to_thread(journal.flush)
                except Exception as exc:  # the records stay buffered for the next try
                    self.metrics.errors.labels("log_write").inc()
                    log.error("cannot write %s: %s", journal.directory, exc)

    async def _count_sessions(self) -> None:
        try:
            self.metrics.store_sessions.set(await asyncio.wait_for(self.store.size(time.time()), STORE_TIMEOUT_S))
        except Exception as exc:
            self._store_failed("counting sessions", exc)

    # -- state published to metrics ------------------------------------------------------------------------------

    def _publish_models(self) -> None:
        status = self.provider.status
        self.metrics.registry_up.set(1 if status.registry_reachable else 0)
        current = self.provider.current
        for alias in (CHAMPION, CHALLENGER):
            servable = current.get(alias)
            if servable is None:
                continue
            previous = self._published.get(alias)
            if previous != (servable.name, servable.version):
                self.metrics.set_model(alias, servable.name, servable.version, previous)
                self._published[alias] = (servable.name, servable.version)
            recall = servable.candidates.recall if servable.candidates and servable.candidates.recall else 1.0
            self.metrics.candidate_recall.labels(alias).set(recall)

    def _publish_control(self) -> None:
        self.metrics.canary_share.set(self.control.canary_share)
        self.metrics.shadow_enabled.set(1 if self.control.shadow else 0)

    def _store_failed(self, doing: str, exc: BaseException) -> None:
        self.store_error = f"{doing}: {exc!r}"
        self.metrics.errors.labels("session_store").inc()
        log.warning("session store failed while %s: %r", doing, exc)

    # -- the API ------------------------------------------------------------------------------------------------

    def _events(self, events: list[Any], now: float) -> list[StoredEvent]:
        return [
            StoredEvent(e.item_id, e.event_type, e.timestamp.timestamp() if e.timestamp else now) for e in events
        ]

    async def _session_items(self, session_id: str, events: list[StoredEvent], now: float) -> list[str]:
        call = self.store.append(session_id, events, now) if events else self.store.get(session_id, now)
        try:
            if self.store.waits:  # a store that never suspends cannot be interrupted: no timer for it
                async with asyncio.timeout(self.config.latency_budget_ms / 1000.0 * STORE_BUDGET_SHARE):
                    state = await call
            else:
                state = await call
        except Exception as exc:  # rank with what the request brought rather than fail it
            self._store_failed("reading the session", exc)
            return [event.item_id for event in events]
        self.store_error = None
        return state.items

    async def recommend(self, body: Any, api_key: str, started: float) -> dict[str, Any]:
        """Answer one `/recommend` body (a validated `RecommendRequest`); ``started`` is its arrival
        (`time.perf_counter`), from which the latency budget counts."""
        models = self.provider.current
        if models.champion is None:
            raise NotReadyError(self._not_ready_reason())
        now = time.time()
        session_items = await self._session_items(body.session_id, self._events(body.events, now), now)
        variant = CHAMPION
        if models.challenger is not None and self.control.canary_share > 0:
            variant = assign_variant(body.session_id, self.control.canary_share)
        servable = models.challenger if variant == CHALLENGER else models.champion
        filters = body.filters
        request = RankRequest(
            session_items=session_items,
            k=body.k,
            exclude_items=filters.exclude_items,
            include_categories=filters.include_categories,
            exclude_categories=filters.exclude_categories,
            exclude_seen=filters.exclude_seen,
        )
        ranking = await self.ranker.rank(servable, request, started)
        took_ms = (time.perf_counter() - started) * 1000.0
        request_id = f"{self._id_prefix}{next(self._request_counter):010x}"
        self._account(servable, variant, ranking, took_ms, models.challenger is not None)
        self.memory.remember(request_id, servable.name, servable.version, variant, body.session_id)
        self.request_log.append(
            {
                "request_id": request_id,
                "ts": utc(now),
                "session_id": body.session_id,
                "variant": variant,
                "model_name": servable.name,
                "model_version": servable.version,
                "model_alias": servable.alias,
                "items": [r.item_id for r in ranking.items],
                "scores": [r.score for r in ranking.items],
                "fallback": ranking.fallback,
                "took_ms": took_ms,
                "session_length": len(session_items),
                "api_key_id": key_id(api_key),
                "context": json.dumps(body.context) if body.context else None,
            }
        )
        if self.control.shadow and variant == CHAMPION and models.challenger is not None:
            self._shadow(models.challenger, request, request_id, body.session_id, servable, ranking)
        return {
            "request_id": request_id,
            "items": [{"item_id": r.item_id, "score": r.score, "reason": r.reason} for r in ranking.items],
            "model": {"name": servable.name, "version": servable.version, "alias": servable.alias},
            "variant": variant,
            "fallback": ranking.fallback,
            "took_ms": round(took_ms, 3),
        }

    def _account(
        self, servable: ServableModel, variant: str, ranking: Ranking, took_ms: float, canary: bool
    ) -> None:
        if ranking.fallback is not None:
            self.metrics.fallbacks.labels(ranking.fallback, variant).inc()
        if ranking.fallback == FALLBACK_ERROR:
            self.metrics.errors.labels("model").inc()
        if not canary or self.control.canary_share <= 0:
            return
        failed = ranking.fallback in (FALLBACK_ERROR, FALLBACK_TIMEOUT)
        verdict = self.guard.record(variant, took_ms, ranking.fallback == FALLBACK_ERROR, failed)
        if verdict is not None:
            self._spawn(self._stop_canary(verdict, servable.label))

    async def _stop_canary(self, reason: str, label: str) -> None:
        if self.control.canary_share <= 0:
            return
        log.warning("rollback guard stops the canary of %s: %s", label, reason)
        self.metrics.rollbacks.inc()
        await self._set_control(self.control.changed(canary_share=0.0, stopped_reason=reason))

    def _shadow(
        self,
        challenger: ServableModel,
        request: RankRequest,
        request_id: str,
        session_id: str,
        champion: ServableModel,
        champion_ranking: Ranking,
    ) -> None:
        if self._shadow_inflight >= MAX_SHADOW_INFLIGHT:
            self.metrics.shadow_dropped.inc()
            return
        self._shadow_inflight += 1

        async def run() -> None:
            try:
                started = time.perf_counter()
                ranking = await self.shadow_ranker.rank(challenger, request, started)
                self.shadow_log.append(
                    {
                        "request_id": request_id,
                        "ts": datetime.now(UTC),
                        "session_id": session_id,
                        "champion_version": champion.version,
                        "challenger_version": challenger.version,
                        "champion_items": [r.item_id for r in champion_ranking.items],
                        "challenger_items": [r.item_id for r in ranking.items],
                        "champion_fallback": champion_ranking.fallback,
                        "challenger_fallback": ranking.fallback,
                        "challenger_ms": (time.perf_counter() - started) * 1000.0,
                    }
                )
            finally:
                self._shadow_inflight -= 1

        self._spawn(run())

    async def add_events(self, body: Any) -> dict[str, Any]:
        now = time.time()
        try:
            state = await asyncio.wait_for(
                self.store.append(body.session_id, self._events(body.events, now), now), STORE_TIMEOUT_S
            )
        except Exception as exc:
            self._store_failed("appending events", exc)
            return {"session_id": body.session_id, "session_length": 0, "new_session": False, "stored": False}
        self.store_error = None
        return {
            "session_id": body.session_id,
            "session_length": len(state.items),
            "new_session": state.new_session,
            "stored": True,
        }

    def feedback(self, body: Any) -> dict[str, Any]:
        known = self.memory.recall(body.request_id)
        name, version, variant, session_id = known or (None, None, None, None)
        self.feedback_log.append(
            {
                "request_id": body.request_id,
                "ts": body.timestamp.astimezone(UTC) if body.timestamp else datetime.now(UTC),
                "event_type": body.event_type,
                "item_id": body.item_id,
                "session_id": body.session_id or session_id,
                "model_name": name,
                "model_version": version,
                "variant": variant,
            }
        )
        return {"accepted": True, "attributed": known is not None}

    # -- admin --------------------------------------------------------------------------------------------------

    async def _set_control(self, state: ControlState) -> bool:
        """Apply ``state`` here and share it; False when the store did not take it (other workers keep theirs)."""
        self.control = state
        self.guard.reset()
        self._publish_control()
        try:
            await asyncio.wait_for(self.store.put_control(state.to_dict()), STORE_TIMEOUT_S)
        except Exception as exc:
            self._store_failed("writing the control state", exc)
            return False
        return True

    def control_view(self, shared: bool = True) -> dict[str, Any]:
        state = self.control
        return {
            "canary_share": state.canary_share,
            "shadow": state.shadow,
            "reload_generation": state.reload_generation,
            "stopped_reason": state.stopped_reason,
            "shared": shared,
        }

    async def set_canary(self, share: float | None, shadow: bool | None) -> dict[str, Any]:
        changes: dict[str, Any] = {"stopped_reason": None}
        if share is not None:
            changes["canary_share"] = share
        if shadow is not None:
            changes["shadow"] = shadow
        shared = await self._set_control(self.control.changed(**changes))
        log.info("canary set to share=%s shadow=%s", self.control.canary_share, self.control.shadow)
        return self.control_view(shared)

    async def _reload_rules(self) -> str | None:
        try:
            config = self.config
            self.table = await asyncio.to_thread(ItemTable.load, config.blocklist_path, config.availability_path)
        except ItemRulesError as exc:
            log.error("item rules not reloaded, keeping the previous ones: %s", exc)
            return str(exc)
        return None

    async def reload(self) -> dict[str, Any]:
        """Re-read the business rules and reload both aliases now, here and (through the control state) on every
        other worker."""
        generation = self.control.reload_generation + 1
        self._seen_generation = generation
        await self._set_control(self.control.changed(reload_generation=generation))
        errors: dict[str, str] = {}
        if (rules_error := await self._reload_rules()) is not None:
            errors["item_table"] = rules_error
        await self._refresh(force=True)
        status = self.provider.status
        errors.update(status.load_errors)
        if status.last_error:
            errors["registry"] = status.last_error
        current = self.provider.current
        return {
            "models": {
                alias: (s.version if (s := current.get(alias)) else None) for alias in (CHAMPION, CHALLENGER)
            },
            "errors": errors,
        }

    # -- probes -------------------------------------------------------------------------------------------------

    def _not_ready_reason(self) -> str:
        status = self.provider.status
        if not self._polled:
            return "loading the champion from the model registry"
        if status.last_error:
            return status.last_error
        if status.load_errors:
            return "; ".join(status.load_errors.values())
        return "the model registry has no version with the alias 'champion': promote one"

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        current = self.provider.current
        status = self.provider.status
        detail: dict[str, Any] = {
            "champion": _describe(current.champion, status.loaded_at.get(CHAMPION)),
            "challenger": _describe(current.challenger, status.loaded_at.get(CHALLENGER)),
            "registry": {
                "reachable": status.registry_reachable,
                "last_success": _iso(status.last_success),
                "error": status.last_error,
                "serving_last_good_models": bool(status.last_error) and current.champion is not None,
            },
            "load_errors": dict(status.load_errors),
            "session_store": {"backend": type(self.store).__name__, "error": self.store_error},
            "control": self.control_view(),
        }
        if current.champion is None:
            detail["reason"] = self._not_ready_reason()
        return current.champion is not None, detail


def _freeze_long_lived_objects() -> None:
    """Move everything alive now (modules, the loaded models and indexes) out of the garbage collector's sight.

    A full collection otherwise walks those millions of objects every time one runs under load: pauses of tens of
    milliseconds that land on whatever requests are in flight, the p99. Run after each model load (it is cheap: no
    collection). A replaced version is still freed by reference counting; only reference cycles frozen with it
    stay, a small price for a flat tail."""
    gc.freeze()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def _describe(servable: ServableModel | None, loaded_at: float | None) -> dict[str, Any] | None:
    if servable is None:
        return None
    popularity = servable.rules.popularity
    return {
        "name": servable.name,
        "version": servable.version,
        "items": len(servable.items),
        "loaded_at": _iso(loaded_at),
        "candidates": servable.candidates.describe() if servable.candidates else {"kind": "model top-N"},
        # Constant popularity (e.g. a kNN model and no item table) makes fallbacks serve catalogue order.
        "popularity_informative": bool(len(popularity) and np.ptp(popularity) > 0),
        "blocked_or_unavailable": int(servable.rules.forbidden.sum()),
    }
