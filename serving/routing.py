"""Canary routing, the shared control state and the automatic rollback guard.

* `assign_variant`: a session is served by the challenger when the hash of its id falls below the canary share.
  The hash makes the choice sticky (a session never flips between models mid-way) and monotone (raising the share
  only moves champion sessions to the challenger, never back).
* `ControlState`: the canary share, the shadow switch and the reload generation, kept in the session store so that
  every worker process and replica follows one admin decision. It starts from the configuration; an admin change
  holds until the configured values themselves change (then the new configuration wins).
* `RollbackGuard`: compares the challenger's error rate, fallback rate and p99 latency with the champion's over a
  sliding window of requests, and names the first margin the challenger exceeds; the service then stops the
  canary (share 0) and records why.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from sessionrec.config import ServingConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
VARIANTS = (CHAMPION, CHALLENGER)
_HASH_SPACE = 2**64
#: Requests per variant the guard remembers; old ones slide out so that a recovered model is judged afresh.
GUARD_WINDOW = 5_000
#: The guard re-judges after this many challenger requests (p99 needs a sort of the window).
GUARD_EVERY = 50


def assign_variant(session_id: str, canary_share: float) -> str:
    digest = hashlib.blake2b(session_id.encode("utf-8"), digest_size=8).digest()
    return CHALLENGER if int.from_bytes(digest, "big") < canary_share * _HASH_SPACE else CHAMPION


@dataclass(frozen=True)
class ControlState:
    canary_share: float
    shadow: bool
    reload_generation: int = 0
    stopped_reason: str | None = None  # why the rollback guard stopped the canary (cleared by an admin change)
    seeded_from: tuple[float, bool] = (0.0, False)  # the configured (share, shadow) this state descends from
    updated_at: float = field(default_factory=time.time)

    @classmethod
    def from_config(cls, config: ServingConfig, reload_generation: int = 0) -> "ControlState":
        return cls(
            canary_share=config.canary_share,
            shadow=config.shadow,
            reload_generation=reload_generation,
            seeded_from=(config.canary_share, config.shadow),
        )

    @classmethod
    def reconcile(cls, stored: dict[str, Any] | None, config: ServingConfig) -> "ControlState":
        """The state to run with: the stored one, unless the configuration changed since it was seeded."""
        if stored is None:
            return cls.from_config(config)
        try:
            known = {f.name for f in fields(cls)}
            state = cls(**{k: v for k, v in stored.items() if k in known})
            state = replace(state, seeded_from=tuple(state.seeded_from))
        except (TypeError, ValueError):  # written by another version of the service: start from the configuration
            return cls.from_config(config)
        if state.seeded_from != (config.canary_share, config.shadow):
            return cls.from_config(config, state.reload_generation)
        return state

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def changed(self, **changes: Any) -> "ControlState":
        return replace(self, **changes, updated_at=time.time())


@dataclass
class _Window:
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=GUARD_WINDOW))
    error: deque[bool] = field(default_factory=lambda: deque(maxlen=GUARD_WINDOW))
    fallback: deque[bool] = field(default_factory=lambda: deque(maxlen=GUARD_WINDOW))

    def add(self, latency_ms: float, error: bool, fallback: bool) -> None:
        self.latency_ms.append(latency_ms)
        self.error.append(error)
        self.fallback.append(fallback)

    def __len__(self) -> int:
        return len(self.latency_ms)

    def rates(self) -> tuple[float, float, float]:
        """Error rate, fallback rate, p99 latency (ms)."""
        return (
            float(np.mean(self.error)),
            float(np.mean(self.fallback)),
            float(np.percentile(np.fromiter(self.latency_ms, dtype=np.float64), 99)),
        )


class RollbackGuard:
    """Judges the canary; one per process (each process sees a sample of the traffic, which is enough to compare
    two variants that share it by session hash)."""

    def __init__(self, config: ServingConfig) -> None:
        self.min_requests = config.rollback_min_requests
        self.error_margin = config.rollback_error_rate_margin
        self.fallback_margin = config.rollback_fallback_rate_margin
        self.p99_margin_ms = config.rollback_p99_margin_ms
        self.reset()

    def reset(self) -> None:
        self._windows = {variant: _Window() for variant in VARIANTS}
        self._since_judged = 0

    def record(self, variant: str, latency_ms: float, error: bool, fallback: bool) -> str | None:
        """Count one request; returns the reason to stop the canary when the challenger is worse by a margin."""
        self._windows[variant].add(latency_ms, error, fallback)
        if variant != CHALLENGER:
            return None
        self._since_judged += 1
        if self._since_judged < GUARD_EVERY:
            return None
        self._since_judged = 0
        return self.verdict()

    def verdict(self) -> str | None:
        champion, challenger = self._windows[CHAMPION], self._windows[CHALLENGER]
        if min(len(champion), len(challenger)) < self.min_requests:
            return None
        (c_err, c_fb, c_p99), (x_err, x_fb, x_p99) = champion.rates(), challenger.rates()
        if x_err - c_err > self.error_margin:
            return (
                f"challenger error rate {x_err:.3f} exceeds the champion's {c_err:.3f} by more than "
                f"{self.error_margin}"
            )
        if x_fb - c_fb > self.fallback_margin:
            return (
                f"challenger fallback rate {x_fb:.3f} exceeds the champion's {c_fb:.3f} by more than "
                f"{self.fallback_margin}"
            )
        if x_p99 - c_p99 > self.p99_margin_ms:
            return (
                f"challenger p99 latency {x_p99:.1f} ms exceeds the champion's {c_p99:.1f} ms by more than "
                f"{self.p99_margin_ms} ms"
            )
        return None
