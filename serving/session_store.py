"""Server-side sessions: the events of each session id, bounded in length, expiring, restarted after inactivity.

Three backends behind one async interface, chosen by URL (`open_session_store`):

* ``memory://``: a dict in the process. Fast, lost on restart, and private to one worker process: only for a
  single-worker server and tests.
* ``sqlite:///path`` (the default, under the state directory): survives restarts and is shared by the worker
  processes of one machine. Calls run inline on the event loop: a transaction takes tens of microseconds, far less
  than handing it to a thread, and a database locked by another process fails fast (`SQLITE_BUSY_S`) into the
  caller's store-failure path instead of stalling the loop.
* ``redis://host:port/db``: production; shared by every replica. An append is one Lua script (atomic: read the
  last activity, reset on timeout, push, trim, expire), so concurrent requests of one session never lose an event.

Semantics shared by all three: an append or a read more than ``timeout_s`` after the session's last event starts a
new, empty session under the same id; a session keeps its newest ``max_events`` events; an untouched session is
deleted after ``ttl_s``. Only events count as activity; reading a session does not prolong it.

The store also holds the small *control state* (canary share, shadow switch, reload generation) so that every
worker process and replica follows one admin decision (see `routing.ControlState`).
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sessionrec.ops.errors import SessionrecError

#: Key prefix of the Redis backend; tests pass their own to stay apart.
DEFAULT_REDIS_PREFIX = "sessionrec:"
#: SQLite: purge expired sessions once per this many appends.
_PURGE_EVERY = 1000
#: SQLite: how long a call waits for another process's write lock before it fails.
SQLITE_BUSY_S = 0.05


class SessionStoreError(SessionrecError):
    """The session store URL is unusable, or the store does not answer."""


@dataclass(frozen=True)
class StoreLimits:
    max_events: int
    ttl_s: float
    timeout_s: float


@dataclass(frozen=True)
class StoredEvent:
    item_id: str
    event_type: str
    timestamp: float  # unix seconds

    def encode(self) -> str:
        """Tab-separated: ids and event types never contain whitespace (the API's id rules), and reading the item
        back is one split, which matters for sessions of hundreds of events read on every request."""
        return f"{self.item_id}\t{self.event_type}\t{self.timestamp!r}"


def _item_of(raw: str | bytes) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return raw.split("\t", 1)[0]


@dataclass(frozen=True)
class SessionState:
    session_id: str
    items: list[str]  # item ids of the session's events, oldest first
    new_session: bool  # no live session existed under this id (never seen, expired or timed out)


class SessionStore(ABC):
    """Append-and-read access to sessions; ``now`` is unix seconds (passed in, so tests control time)."""

    #: Whether a call can suspend waiting for another process (the network): only then does a caller's timeout
    #: have anything to interrupt. The in-process stores answer inline.
    waits: bool = False

    def __init__(self, limits: StoreLimits) -> None:
        self.limits = limits

    @abstractmethod
    async def append(self, session_id: str, events: Sequence[StoredEvent], now: float) -> SessionState:
        """Add ``events`` (oldest first) and return the session after the append."""

    @abstractmethod
    async def get(self, session_id: str, now: float) -> SessionState:
        """The live session (empty and ``new_session`` when there is none)."""

    @abstractmethod
    async def size(self, now: float) -> int:
        """Number of live (unexpired) sessions."""

    @abstractmethod
    async def get_control(self) -> dict[str, Any] | None: ...

    @abstractmethod
    async def put_control(self, value: dict[str, Any]) -> None: ...

    async def close(self) -> None:
        return None


class MemorySessionStore(SessionStore):
    """Sessions in an `OrderedDict` ordered by last activity: with one TTL for all, the oldest entries are the
    first to expire, so expiry pops from the front in amortised O(1)."""

    def __init__(self, limits: StoreLimits) -> None:
        super().__init__(limits)
        self._sessions: OrderedDict[str, tuple[float, deque[str]]] = OrderedDict()
        self._control: dict[str, Any] | None = None

    def _expire(self, now: float) -> None:
        while self._sessions:
            last_seen, _ = next(iter(self._sessions.values()))
            if now - last_seen <= self.limits.ttl_s:
                break
            self._sessions.popitem(last=False)

    def _live(self, session_id: str, now: float) -> deque[str] | None:
        entry = self._sessions.get(session_id)
        if entry is None or now - entry[0] > min(self.limits.timeout_s, self.limits.ttl_s):
            return None
        return entry[1]

    async def append(self, session_id: str, events: Sequence[StoredEvent], now: float) -> SessionState:
        self._expire(now)
        live = self._live(session_id, now)
        new = live is None
        if events:
            if live is None:
                live = deque(maxlen=self.limits.max_events)
            live.extend(event.encode() for event in events)
            self._sessions[session_id] = (now, live)
            self._sessions.move_to_end(session_id)
        return SessionState(session_id, [_item_of(raw) for raw in live or ()], new)

    async def get(self, session_id: str, now: float) -> SessionState:
        live = self._live(session_id, now)
        return SessionState(session_id, [_item_of(raw) for raw in live or ()], live is None)

    async def size(self, now: float) -> int:
        self._expire(now)
        return len(self._sessions)

    async def get_control(self) -> dict[str, Any] | None:
        return self._control

    async def put_control(self, value: dict[str, Any]) -> None:
        self._control = dict(value)


class SqliteSessionStore(SessionStore):
    def __init__(self, path: Path, limits: StoreLimits) -> None:
        super().__init__(limits)
        self._appends = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=SQLITE_BUSY_S, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS sessions "
                "(id TEXT PRIMARY KEY, last_seen REAL NOT NULL, events TEXT NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS sessions_last_seen ON sessions (last_seen)")
            self._db.execute("CREATE TABLE IF NOT EXISTS control (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise SessionStoreError(f"cannot open the SQLite session store {path}: {exc}") from exc

    def _live(self, session_id: str, now: float) -> list[str] | None:
        """The session's encoded events, or None when there is no live session."""
        row = self._db.execute("SELECT last_seen, events FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None or now - row[0] > min(self.limits.timeout_s, self.limits.ttl_s):
            return None
        return row[1].split("\n") if row[1] else []

    async def append(self, session_id: str, events: Sequence[StoredEvent], now: float) -> SessionState:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            live = self._live(session_id, now)
            raw = ((live or []) + [event.encode() for event in events])[-self.limits.max_events :]
            if events:
                self._db.execute(
                    "INSERT INTO sessions (id, last_seen, events) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE "
                    "SET last_seen = excluded.last_seen, events = excluded.events",
                    (session_id, now, "\n".join(raw)),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._appends += 1
        if self._appends % _PURGE_EVERY == 0:
            self._db.execute("DELETE FROM sessions WHERE last_seen < ?", (now - self.limits.ttl_s,))
        return SessionState(session_id, [_item_of(r) for r in raw], live is None)

    async def get(self, session_id: str, now: float) -> SessionState:
        live = self._live(session_id, now)
        return SessionState(session_id, [_item_of(r) for r in live or ()], live is None)

    async def size(self, now: float) -> int:
        query = "SELECT COUNT(*) FROM sessions WHERE last_seen >= ?"
        return self._db.execute(query, (now - self.limits.ttl_s,)).fetchone()[0]

    async def get_control(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value FROM control WHERE key = 'control'").fetchone()
        return json.loads(row[0]) if row else None

    async def put_control(self, value: dict[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO control (key, value) VALUES ('control', ?)", (json.dumps(value),))

    async def close(self) -> None:
        self._db.close()


# KEYS: events list, last-activity key, index of live sessions. ARGV: now, timeout, max events, ttl, events...
# Without events it only reads (and drops a timed-out session, which a later append would drop anyway).
_APPEND_LUA = """
local now, timeout, maxlen, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local last = redis.call('GET', KEYS[2])
local new = 0
if (not last) or (now - tonumber(last) > timeout) then
  redis.call('DEL', KEYS[1])
  new = 1
end
if #ARGV > 4 then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 5))
  redis.call('LTRIM', KEYS[1], -maxlen, -1)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
  redis.call('ZADD', KEYS[3], now, KEYS[1])
end
return {new, redis.call('LRANGE', KEYS[1], 0, -1)}
"""


class RedisSessionStore(SessionStore):
    waits = True

    def __init__(self, url: str, limits: StoreLimits, prefix: str = DEFAULT_REDIS_PREFIX) -> None:
        import redis.asyncio as aioredis

        super().__init__(limits)
        self.prefix = prefix
        self._redis = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._script = self._redis.register_script(_APPEND_LUA)
        self._index = f"{prefix}live"

    def _keys(self, session_id: str) -> list[str]:
        return [f"{self.prefix}s:{session_id}", f"{self.prefix}t:{session_id}", self._index]

    async def _call(self, session_id: str, events: Sequence[StoredEvent], now: float) -> SessionState:
        timeout = min(self.limits.timeout_s, self.limits.ttl_s)
        args = [now, timeout, self.limits.max_events, int(self.limits.ttl_s), *(e.encode() for e in events)]
        new, raw = await self._script(keys=self._keys(session_id), args=args)
        return SessionState(session_id, [_item_of(r) for r in raw], bool(new))

    async def append(self, session_id: str, events: Sequence[StoredEvent], now: float) -> SessionState:
        return await self._call(session_id, events, now)

    async def get(self, session_id: str, now: float) -> SessionState:
        return await self._call(session_id, (), now)

    async def size(self, now: float) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(self._index, "-inf", f"({now - self.limits.ttl_s}")
            pipe.zcard(self._index)
            _, count = await pipe.execute()
        return int(count)

    async def get_control(self) -> dict[str, Any] | None:
        raw = await self._redis.get(f"{self.prefix}control")
        return json.loads(raw) if raw else None

    async def put_control(self, value: dict[str, Any]) -> None:
        await self._redis.set(f"{self.prefix}control", json.dumps(value))

    async def close(self) -> None:
        await self._redis.aclose()


def open_session_store(
    url: str | None, limits: StoreLimits, default_dir: Path, redis_prefix: str = DEFAULT_REDIS_PREFIX
) -> SessionStore:
    """The store for ``url``: ``None`` → SQLite file ``sessions.db`` in ``default_dir``; ``memory://``;
    ``sqlite:///path``; ``redis://`` / ``rediss://``."""
    if url is None:
        return SqliteSessionStore(default_dir / "sessions.db", limits)
    scheme = urlparse(url).scheme
    if scheme == "memory":
        return MemorySessionStore(limits)
    if scheme == "sqlite":
        path = url.removeprefix("sqlite:///")
        if not path or url == path:
            raise SessionStoreError(f"session store URL {url!r}: write sqlite:///<path to the database file>")
        return SqliteSessionStore(Path(path), limits)
    if scheme in ("redis", "rediss", "unix"):
        return RedisSessionStore(url, limits, redis_prefix)
    raise SessionStoreError(
        f"unknown session store URL {url!r}: use memory://, sqlite:///<path> or redis://host:port/db "
        f"(serving.session_store_url or SESSIONREC_SESSION_STORE_URL)"
    )
