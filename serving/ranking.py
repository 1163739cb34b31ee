"""The ranking path of one request, as plain Python: session → candidates → model scores → filters → backfill.

1. The session's item ids are encoded with the model's `ItemIndex`; unknown ids are dropped and counted.
2. Candidates: for a model with embeddings, FAISS top-N over the item embeddings plus the N most popular items,
   all re-scored exactly by the model (``session_embedding @ item_embedding``); for a model without embeddings
   (session kNN, popularity, hybrids), the model's own top-N over the full catalogue plus the N most popular.
3. Business filters (`filters.RequestFilter`) on the candidates; best scores first, popularity breaking ties.
4. Backfill from popularity (the session's last category first) so that ``k`` items come back whenever the
   catalogue allows.

Steps 1-4 run in batches on a worker thread (`_Lane`, adaptive batching) under each request's deadline.
Fallbacks: a model that raises or does not answer in time is replaced by popularity (the session's last category
first) and the response says why; a session without any known item never reaches the model. Nothing here raises
because of the model. A batch that overruns cannot be interrupted; it finishes in the background and the results
of requests that gave up are dropped. A model that hangs delays only its own lane, and the requests queued behind
it still time out into the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from sessionrec.config import ServingConfig
from sessionrec.ops.models.base import Prefixes, SessionModel
from sessionrec.ops.sessiondata import ItemIndex
from sessionrec.serving.candidates import CandidateIndex
from sessionrec.serving.filters import IndexedRules, ItemTable, RequestFilter

log = logging.getLogger(__name__)

#: Fallback reasons (the ``fallback`` field of a response and a metrics label).
FALLBACK_EMPTY = "empty_session"  # no item of the session is known to the model
FALLBACK_TIMEOUT = "timeout"  # the model did not answer within the latency budget
FALLBACK_ERROR = "model_error"  # the model raised

#: Reasons of single items.
REASON_MODEL = "model"
REASON_POPULAR = "popular"
REASON_CATEGORY = "category_popular"

#: Sessions scored in one model call at most.
MAX_BATCH = 64
#: Defaults of the per-deployment settings (`ServingConfig`: one place for them).
_DEFAULTS = ServingConfig()

#: Share of the budget kept for answering after the ranking thread (and for the popularity fallback when that
#: thread is late), at most 5 ms.
_FINISH_SHARE = 0.1
_FINISH_MAX_S = 0.005


@dataclass(frozen=True, eq=False)  # identity semantics: one object per loaded version (and weak-referenceable)
class ServableModel:
    """One registered model version ready to serve: the model, its catalogue and everything derived from them."""

    name: str
    version: str
    alias: str
    model: SessionModel
    items: ItemIndex
    table: ItemTable
    rules: IndexedRules
    candidates: CandidateIndex | None  # None: the model has no embeddings, its dense scores are used

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version} ({self.alias})"


@dataclass(frozen=True)
class RankRequest:
    session_items: Sequence[str]  # item ids of the session, oldest first (request events included)
    k: int
    exclude_items: Sequence[str] = ()
    include_categories: Sequence[str] = ()
    exclude_categories: Sequence[str] = ()
    exclude_seen: bool = True


class Recommendation(NamedTuple):  # a tuple: built 20 times per request, 5x cheaper than a frozen dataclass
    item_id: str
    score: float
    reason: str


@dataclass(frozen=True)
class Ranking:
    items: list[Recommendation]
    fallback: str | None
    n_unknown: int  # session items unknown to the model


@dataclass(frozen=True)
class _Prepared:
    """A request as the model's indices: its known session items, how many were unknown, its filter."""

    codes: np.ndarray
    n_unknown: int
    request_filter: RequestFilter


class _Lane:
    """Ranking for one `ServableModel`: adaptive batching on worker threads.

    A request queues and waits on a future. While fewer than ``batches_in_flight`` batches run, the queue goes to
    the executor as one batch at once: at low load a batch is a single request (no added wait); under load every
    request that arrived while the running batches ran is ranked together, so the thread hand-over and the model
    call are paid once per batch. The whole numeric path (encoding, model, candidates, filters, backfill) runs on
    those threads, so the event loop only parses and answers. The batches in flight are bounded per model, so a
    slow challenger never holds up the champion.
    """

    def __init__(self, ranker: "Ranker", servable: ServableModel) -> None:
        self.ranker = ranker
        self.servable = servable
        self.queue: list[tuple[RankRequest, asyncio.Future]] = []
        self.running = 0  # batches on the executor now

    async def rank(self, request: RankRequest, timeout: float) -> Ranking:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self.queue.append((request, future))
        self._dispatch(loop)
        # On timeout the future fails with TimeoutError and its batch result is dropped. A timer on our own future
        # costs a fraction of `asyncio.timeout`, which cancels and un-cancels the whole task (~5% of a request).
        timer = loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self.queue and self.running < self.ranker.batches_in_flight:
            # Requests that timed out while queued are dropped: they are not ranked.
            batch = [entry for entry in self.queue[: self.ranker.max_batch] if not entry[1].done()]
            del self.queue[: self.ranker.max_batch]
            if batch:
                self.running += 1
                work = self.ranker.executor.submit(self.ranker.rank_batch, self.servable, [r for r, _ in batch])
                work.add_done_callback(
                    lambda done, batch=batch: loop.call_soon_threadsafe(self._deliver, loop, batch, done)
                )

    def _deliver(self, loop: asyncio.AbstractEventLoop, batch: list, done: Future) -> None:
        self.running -= 1
        error = RuntimeError("ranking cancelled: shutting down") if done.cancelled() else done.exception()
        results = done.result() if error is None else None
        for i, (_, future) in enumerate(batch):
            if not future.done():
                if results is None:
                    future.set_exception(error)
                else:
                    future.set_result(results[i])
        if self.queue:
            self._dispatch(loop)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class Ranker:
    """Ranks requests against a `ServableModel` under a latency budget.

    ``n_candidates`` is the size of each candidate source (ANN or model top-N, and popularity); ``executor`` runs
    the batches (a small thread pool shared by all models of the process); ``max_batch`` bounds a batch and
    ``batches_in_flight`` the batches of one model running at once (the search and the network release the GIL, so
    a second batch can use a second core; with as many server processes as cores, one each measured best);
    ``prefix_items`` is how many of the most recent session items the model encodes.
    """

    def __init__(
        self,
        n_candidates: int,
        budget_ms: float,
        executor: Executor,
        max_batch: int = MAX_BATCH,
        batches_in_flight: int = _DEFAULTS.batches_in_flight,
        prefix_items: int = _DEFAULTS.model_prefix_items,
    ) -> None:
        self.n_candidates = n_candidates
        self.budget_s = budget_ms / 1000.0
        self.executor = executor
        self.max_batch = max_batch
        self.batches_in_flight = batches_in_flight
        self.prefix_items = prefix_items
        self._lanes: weakref.WeakKeyDictionary[ServableModel, _Lane] = weakref.WeakKeyDictionary()

    def _lane(self, servable: ServableModel) -> _Lane:
        lane = self._lanes.get(servable)
        if lane is None:
            lane = self._lanes[servable] = _Lane(self, servable)
        return lane

    async def rank(self, servable: ServableModel, request: RankRequest, started: float | None = None) -> Ranking:
        """Rank within the budget counted from ``started`` (a `time.perf_counter` value; default now)."""
        started = time.perf_counter() if started is None else started
        reserve = min(_FINISH_MAX_S, self.budget_s * _FINISH_SHARE)
        remaining = started + self.budget_s - reserve - time.perf_counter()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await self._lane(servable).rank(request, remaining)
        except TimeoutError:
            return self.fallback(servable, request, FALLBACK_TIMEOUT)
        except Exception as exc:  # any model failure becomes the popularity answer, never an error response
            log.warning("model %s failed, serving popularity: %r", servable.label, exc, exc_info=True)
            return self.fallback(servable, request, FALLBACK_ERROR)

    @staticmethod
    def _prepare(servable: ServableModel, request: RankRequest) -> _Prepared:
        codes, n_unknown = servable.items.encode(list(request.session_items))
        excluded = servable.items.encode(list(request.exclude_items))[0]
        if request.exclude_seen:
            excluded = np.concatenate([excluded, codes])
        request_filter = servable.rules.request_filter(
            excluded, request.include_categories, request.exclude_categories
        )
        return _Prepared(codes, n_unknown, request_filter)

    def rank_batch(self, servable: ServableModel, requests: list[RankRequest]) -> list[Ranking]:
        """Rank a batch (on a worker thread): one model call for every session with a known item; sessions
        without one get popularity. Raises when the model does, for the whole batch."""
        prepared = [self._prepare(servable, request) for request in requests]
        scored = [i for i, p in enumerate(prepared) if len(p.codes)]
        n = self._pool_size([requests[i] for i in scored], [prepared[i] for i in scored])
        sessions = [prepared[i].codes[-self.prefix_items :] for i in scored]
        ranked = self.score_batch(servable, sessions, n) if scored else []
        candidates = dict(zip(scored, ranked))
        out = []
        for i, (request, prep) in enumerate(zip(requests, prepared)):
            if i not in candidates:
                out.append(self._popular_ranking(servable, request, prep, FALLBACK_EMPTY))
                continue
            pool, scores = candidates[i]
            keep = prep.request_filter.allowed(pool) & np.isfinite(scores)  # a NaN score is no evidence
            pool, scores = pool[keep], scores[keep]
            best = np.lexsort((-servable.rules.popularity[pool], -scores))[: request.k]
            chosen = [(int(item), float(score), REASON_MODEL) for item, score in zip(pool[best], scores[best])]
            chosen += self._popular(servable, request, prep.request_filter, request.k - len(chosen), pool[best])
            out.append(Ranking(self._decode(servable, chosen), None, prep.n_unknown))
        return out

    def _pool_size(self, requests: list[RankRequest], prepared: list[_Prepared]) -> int:
        """Candidates per source: twice what the largest answer needs plus what its filter removes, at most
        ``n_candidates``. Category filters can remove any share of the candidates: they get ``n_candidates``. The
        ANN search time grows with this number (HNSW searches at least this breadth)."""
        if any(r.include_categories or r.exclude_categories for r in requests):
            return self.n_candidates
        need = max((2 * r.k + len(p.request_filter.excluded) for r, p in zip(requests, prepared)), default=1)
        return min(self.n_candidates, need)

    def fallback(self, servable: ServableModel, request: RankRequest, reason: str) -> Ranking:
        """The popularity answer to ``request`` (the session's last category first), saying ``reason``."""
        return self._popular_ranking(servable, request, self._prepare(servable, request), reason)

    def _popular_ranking(
        self, servable: ServableModel, request: RankRequest, prep: _Prepared, reason: str
    ) -> Ranking:
        chosen = self._popular(servable, request, prep.request_filter, request.k, np.zeros(0, dtype=np.int64))
        return Ranking(self._decode(servable, chosen), reason, prep.n_unknown)

    def score_batch(
        self, servable: ServableModel, sessions: list[np.ndarray], n: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The model stage for a batch of encoded sessions: per session, the candidate item indices (unique; ``n``
        from each source, default ``n_candidates``) and their model scores."""
        n = self.n_candidates if n is None else n
        prefixes = Prefixes(items=sessions, times=np.full(len(sessions), time.time()))
        popular = servable.rules.popular_order[:n]
        if servable.candidates is not None:
            embeddings = np.asarray(servable.model.session_embeddings(prefixes), dtype=np.float32)
            found, _ = servable.candidates.search(embeddings, n)
            out = []
            for row, embedding in zip(found, embeddings):
                pool = np.unique(np.concatenate([row[row >= 0], popular]))
                out.append((pool, servable.candidates.vectors[pool] @ embedding))
            return out
        scores = np.asarray(servable.model.score(prefixes), dtype=np.float64)
        n = min(n, scores.shape[1])
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n] if n < scores.shape[1] else None
        out = []
        for i, row in enumerate(scores):
            pool = np.unique(np.concatenate([top[i] if top is not None else np.arange(len(row)), popular]))
            out.append((pool, row[pool]))
        return out

    def _popular(
        self,
        servable: ServableModel,
        request: RankRequest,
        request_filter: RequestFilter,
        n: int,
        taken: np.ndarray,
    ) -> list[tuple[int, float, str]]:
        """Up to ``n`` popular items not in ``taken``: the session's last category first, then any."""
        if n <= 0:
            return []
        out: list[tuple[int, float, str]] = []
        popularity = servable.rules.popularity
        category = _last_category(servable.table, request.session_items)
        for order, reason in ((servable.rules.category_popular(category), REASON_CATEGORY),
                              (servable.rules.popular_order, REASON_POPULAR)):
            picked = request_filter.take_popular(order, n - len(out), taken)
            out += [(int(i), float(popularity[i]), reason) for i in picked]
            taken = np.concatenate([taken, picked])
            if len(out) >= n:
                break
        return out

    @staticmethod
    def _decode(servable: ServableModel, chosen: list[tuple[int, float, str]]) -> list[Recommendation]:
        ids = servable.items.decode(np.asarray([c[0] for c in chosen], dtype=np.int64))
        return [Recommendation(item_id, score, reason) for item_id, (_, score, reason) in zip(ids, chosen)]


def _last_category(table: ItemTable, session_items: Sequence[str]) -> str | None:
    """Category of the most recent session item that has one (known to the model or not)."""
    for item in reversed(session_items):
        category = table.category_of(item)
        if category is not None:
            return category
    return None
