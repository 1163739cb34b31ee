"""Session stores: the same behaviour from the in-memory, SQLite and real Redis backends.

Redis is the CI's server at 127.0.0.1:6379 (started by .ci/run); each run uses its own key prefix and deletes it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionrec.serving.session_store import (
    MemorySessionStore,
    RedisSessionStore,
    SessionStore,
    SessionStoreError,
    SqliteSessionStore,
    StoredEvent,
    StoreLimits,
    open_session_store,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
LIMITS = StoreLimits(max_events=5, ttl_s=3600.0, timeout_s=1800.0)
T0 = 1_700_000_000.0


def _redis_answers() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis at {REDIS_URL} does not answer ({exc}); start it as .ci/run does (see shared/services.md)"
        )


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SessionStore]:
    if request.param == "memory":
        made: SessionStore = MemorySessionStore(LIMITS)
    elif request.param == "sqlite":
        made = SqliteSessionStore(tmp_path / "sessions.db", LIMITS)
    else:
        _redis_answers()
        made = RedisSessionStore(REDIS_URL, LIMITS, prefix=f"sessionrec-test-{uuid.uuid4().hex}:")
    yield made
    if isinstance(made, RedisSessionStore):
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{made.prefix}*"))
        if keys:
            client.delete(*keys)
        assert not list(client.scan_iter(match=f"{made.prefix}*"))


def _run(store: SessionStore, body: Coroutine[Any, Any, None]) -> None:
    """Run a test body and close the store in one event loop (the Redis client belongs to the loop it ran on)."""

    async def main() -> None:
        try:
            await body
        finally:
            await store.close()

    asyncio.run(main())


def _events(*items: str, at: float = T0) -> list[StoredEvent]:
    return [StoredEvent(item, "click", at) for item in items]


def test_append_read_and_length_bound(store: SessionStore) -> None:
    async def run() -> None:
        first = await store.append("s1", _events("a", "b"), T0)
        assert first.items == ["a", "b"] and first.new_session
        second = await store.append("s1", _events("c", "d", "e", "f"), T0 + 10)
        assert second.items == ["b", "c", "d", "e", "f"]  # the oldest dropped at 5 events
        assert not second.new_session
        read = await store.get("s1", T0 + 20)
        assert read.items == second.items and not read.new_session
        assert (await store.get("other", T0)).items == []
        assert await store.size(T0 + 20) == 1

    _run(store, run())


def test_inactivity_timeout_starts_a_new_session(store: SessionStore) -> None:
    async def run() -> None:
        await store.append("s1", _events("a", "b"), T0)
        assert (await store.get("s1", T0 + LIMITS.timeout_s - 1)).items == ["a", "b"]
        # Past the timeout the id starts afresh: a read sees nothing, an append keeps only the new event.
        assert (await store.get("s1", T0 + LIMITS.timeout_s + 1)).new_session
        fresh = await store.append("s1", _events("c"), T0 + LIMITS.timeout_s + 1)
        assert fresh.items == ["c"] and fresh.new_session

    _run(store, run())


def test_reads_do_not_prolong_a_session(store: SessionStore) -> None:
    async def run() -> None:
        await store.append("s1", _events("a"), T0)
        await store.get("s1", T0 + LIMITS.timeout_s - 1)
        assert (await store.get("s1", T0 + LIMITS.timeout_s + 1)).items == []

    _run(store, run())


def test_concurrent_appends_lose_no_event(store: SessionStore) -> None:
    async def run() -> None:
        wide = StoreLimits(max_events=100, ttl_s=3600.0, timeout_s=1800.0)
        store.limits = wide
        await asyncio.gather(*(store.append("s1", _events(f"i{n}"), T0) for n in range(40)))
        assert sorted((await store.get("s1", T0)).items) == sorted(f"i{n}" for n in range(40))

    _run(store, run())


def test_control_state_round_trip(store: SessionStore) -> None:
    async def run() -> None:
        assert await store.get_control() is None
        await store.put_control({"canary_share": 0.25, "shadow": True})
        assert await store.get_control() == {"canary_share": 0.25, "shadow": True}

    _run(store, run())


def test_memory_store_expires_by_ttl() -> None:
    store = MemorySessionStore(StoreLimits(max_events=5, ttl_s=60.0, timeout_s=30.0))

    async def run() -> None:
        await store.append("old", _events("a"), T0)
        await store.append("new", _events("b"), T0 + 50)
        assert await store.size(T0 + 70) == 1  # "old" is past its TTL and gone

    _run(store, run())


def test_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_session_store(None, LIMITS, tmp_path), SqliteSessionStore)
    assert (tmp_path / "sessions.db").is_file()
    assert isinstance(open_session_store("memory://", LIMITS, tmp_path), MemorySessionStore)
    assert isinstance(open_session_store(f"sqlite:///{tmp_path}/x.db", LIMITS, tmp_path), SqliteSessionStore)
    with pytest.raises(SessionStoreError, match="memory://, sqlite:///<path> or redis://"):
        open_session_store("postgres://x", LIMITS, tmp_path)
    with pytest.raises(SessionStoreError, match="sqlite:///<path"):
        open_session_store("sqlite://", LIMITS, tmp_path)


def test_a_per_process_store_is_refused_for_several_workers() -> None:
    from pydantic import ValidationError

    from sessionrec.config import ServingConfig

    with pytest.raises(ValidationError, match="memory:// session store: each process would keep its own"):
        ServingConfig(session_store_url="memory://", workers=2)
    assert ServingConfig(session_store_url="memory://", workers=1).workers == 1
