"""Canary assignment (sticky, monotone, the configured share), the shared control state and the rollback guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sessionrec.config import ServingConfig
from sessionrec.ops.sessiondata import read_split_tsv
from sessionrec.serving.routing import CHALLENGER, CHAMPION, ControlState, RollbackGuard, assign_variant


@pytest.fixture(scope="module")
def session_ids(shared_data: Path) -> list[str]:
    """Real session ids (YOOCHOOSE numbers: sequential, so a poor hash would show a bias)."""
    frame = read_split_tsv(shared_data / "yoochoose/session-rec/yoochoose-clicks-100k_train_full.txt")
    return frame["SessionId"].unique(maintain_order=True).to_list()


def test_share_is_respected(session_ids: list[str]) -> None:
    n = len(session_ids)
    for share in (0.05, 0.2, 0.5):
        observed = np.mean([assign_variant(s, share) == CHALLENGER for s in session_ids])
        assert abs(observed - share) < 4 * np.sqrt(share * (1 - share) / n), (share, observed)
    assert {assign_variant(s, 0.0) for s in session_ids} == {CHAMPION}
    assert {assign_variant(s, 1.0) for s in session_ids} == {CHALLENGER}


def test_assignment_is_sticky_and_monotone(session_ids: list[str]) -> None:
    small = {s for s in session_ids if assign_variant(s, 0.1) == CHALLENGER}
    assert small == {s for s in session_ids if assign_variant(s, 0.1) == CHALLENGER}
    larger = {s for s in session_ids if assign_variant(s, 0.3) == CHALLENGER}
    assert small < larger  # raising the share only moves champion sessions over


def test_control_state_follows_admin_until_the_config_changes() -> None:
    config = ServingConfig(canary_share=0.1)
    fresh = ControlState.reconcile(None, config)
    assert (fresh.canary_share, fresh.shadow) == (0.1, False)
    admin = fresh.changed(canary_share=0.4, shadow=True, reload_generation=3)
    kept = ControlState.reconcile(admin.to_dict(), config)
    assert (kept.canary_share, kept.shadow, kept.reload_generation) == (0.4, True, 3)
    reseeded = ControlState.reconcile(admin.to_dict(), ServingConfig(canary_share=0.2))
    assert (reseeded.canary_share, reseeded.shadow, reseeded.reload_generation) == (0.2, False, 3)
    # A state written by another version of the service is replaced by the configuration, not a crash.
    assert ControlState.reconcile({"canary_share": 0.9, "colour": "red"}, config).canary_share == 0.1


def _feed(guard: RollbackGuard, variant: str, n: int, latency: float, error_every: int = 0) -> str | None:
    verdict = None
    for i in range(n):
        error = bool(error_every) and i % error_every == 0
        verdict = guard.record(variant, latency, error, error) or verdict
    return verdict


def test_guard_stops_a_worse_challenger() -> None:
    config = ServingConfig(rollback_min_requests=200, rollback_error_rate_margin=0.02, rollback_p99_margin_ms=25)
    guard = RollbackGuard(config)
    assert _feed(guard, CHAMPION, 300, 5.0) is None
    assert _feed(guard, CHALLENGER, 150, 5.0, error_every=5) is None  # too few challenger requests to judge
    verdict = _feed(guard, CHALLENGER, 100, 5.0, error_every=5)
    assert verdict is not None and "error rate" in verdict

    guard.reset()
    _feed(guard, CHAMPION, 300, 5.0)
    verdict = _feed(guard, CHALLENGER, 300, 60.0)
    assert verdict is not None and "p99 latency" in verdict


def test_guard_leaves_an_equal_challenger_alone() -> None:
    guard = RollbackGuard(ServingConfig(rollback_min_requests=200))
    rng = np.random.default_rng(0)
    for _ in range(1_000):
        for variant in (CHAMPION, CHALLENGER):
            assert guard.record(variant, float(rng.gamma(4.0, 2.0)), False, bool(rng.random() < 0.01)) is None
