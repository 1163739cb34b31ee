"""API keys, the admin token and the per-key rate limit.

Keys and the token come from the settings (``SESSIONREC_API_KEYS`` / ``SESSIONREC_ADMIN_TOKEN`` or the config
file), never from code. Comparisons are constant-time. Logs and metrics name a key by a short hash, never by its
value.

The rate limit is a token bucket per key and per process: ``rate_limit_per_minute`` tokens a minute, bursts of up
to `BURST_SECONDS` of that rate. A server with several worker processes lets each of them take that rate.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import time
from dataclasses import dataclass

from sessionrec.ops.errors import SessionrecError

API_KEY_HEADER = "X-API-Key"
ADMIN_TOKEN_HEADER = "X-Admin-Token"
BURST_SECONDS = 10.0


class ServingAuthError(SessionrecError):
    """The service is configured so that nobody could call it."""


@dataclass(frozen=True)
class Denied:
    status: int  # 401 no/unknown credential, 403 admin disabled, 429 rate limited
    message: str
    retry_after_s: int | None = None


@functools.lru_cache(maxsize=256)  # asked on every request, for the few configured keys
def key_id(key: str) -> str:
    """A stable, non-reversible name for a key, for logs and metrics."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


class Authenticator:
    def __init__(self, api_keys: tuple[str, ...], admin_token: str | None, rate_limit_per_minute: int) -> None:
        if not api_keys:
            raise ServingAuthError(
                "no API keys are configured, so no caller could use the service: set SESSIONREC_API_KEYS "
                "(comma-separated) or serving.api_keys in the config file"
            )
        self._keys = tuple(k.encode("utf-8") for k in api_keys)
        self._admin = admin_token.encode("utf-8") if admin_token else None
        self._rate = rate_limit_per_minute / 60.0
        self._capacity = max(1.0, self._rate * BURST_SECONDS)
        self._buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def check_key(self, key: str | None, now: float | None = None) -> Denied | None:
        """None when ``key`` may make one more request now."""
        if not key:
            return Denied(401, f"missing API key: send it in the {API_KEY_HEADER} header")
        raw = key.encode("utf-8", errors="replace")
        # Compare against every key: the time taken does not tell which prefix matched.
        if not any([hmac.compare_digest(raw, known) for known in self._keys]):
            return Denied(401, f"unknown API key in {API_KEY_HEADER}")
        return self._take(raw, time.monotonic() if now is None else now)

    def _take(self, key: bytes, now: float) -> Denied | None:
        tokens, last = self._buckets.get(key, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self._rate)
            return Denied(429, f"rate limit of {self._rate * 60:.0f} requests a minute per key exceeded", wait)
        self._buckets[key] = (tokens - 1.0, now)
        return None

    def check_admin(self, token: str | None) -> Denied | None:
        if self._admin is None:
            return Denied(403, "admin endpoints are disabled: set SESSIONREC_ADMIN_TOKEN to enable them")
        if not token or not hmac.compare_digest(token.encode("utf-8", errors="replace"), self._admin):
            return Denied(401, f"missing or wrong admin token in the {ADMIN_TOKEN_HEADER} header")
        return None
