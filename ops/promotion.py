"""The promotion gate: may a challenger replace the champion?

Pure decision logic (no MLflow), so that the rule a release depends on is unit-tested on its own and the registry
only records what it decided. The gate fails closed: a missing measurement (metric, latency, popularity baseline,
dataset fingerprint) is a reason to refuse, never a silent pass, and every reason states the numbers it compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sessionrec.config import PromotionConfig

#: Key under which an evaluation dict names the test split it was measured on.
FINGERPRINT_KEY = "dataset_fingerprint"


@dataclass(frozen=True)
class GateDecision:
    """The verdict, one human-readable reason per check, and the numbers behind them (for registry tags)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)


def _metric(evaluation: dict[str, Any], metric: str) -> float | None:
    value = evaluation.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _same_split(
    challenger: dict[str, Any], others: dict[str, dict[str, Any] | None]
) -> tuple[list[str], dict[str, Any]]:
    """Refusals for every evaluation not measured on the challenger's test split."""
    fingerprint = challenger.get(FINGERPRINT_KEY)
    evidence: dict[str, Any] = {"challenger_fingerprint": fingerprint}
    if not fingerprint:
        missing = f"challenger evaluation has no {FINGERPRINT_KEY}: cannot tell which split it was measured on"
        return [missing], evidence
    refusals = []
    for role, evaluation in others.items():
        if evaluation is None:
            continue
        other = evaluation.get(FINGERPRINT_KEY)
        evidence[f"{role}_fingerprint"] = other
        if other != fingerprint:
            refusals.append(
                f"{role} was measured on test split {other or '(unknown)'} but the challenger on {fingerprint}: "
                f"re-evaluate both on the same split before comparing"
            )
    return refusals, evidence


def decide_promotion(
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    popularity: dict[str, Any] | None,
    policy: PromotionConfig,
    challenger_latency_p99_ms: float | None,
) -> GateDecision:
    """Decide whether ``challenger`` may become champion.

    Each dict is an evaluation (metric name → value, e.g. ``"mrr@20"``) carrying the ``dataset_fingerprint`` of
    its test split. The challenger passes when all of these hold: every evaluation comes from the same split;
    there is no champion, or ``policy.metric`` is at most ``policy.max_relative_drop`` (relative) below the
    champion's; its p99 latency is within ``policy.max_latency_ms``; and it beats the popularity baseline by at
    least ``policy.min_lift_over_popularity`` (absolute).
    """
    metric = policy.metric
    split_refusals, evidence = _same_split(challenger, {"champion": champion, "popularity": popularity})
    evidence.update(
        metric=metric,
        max_relative_drop=policy.max_relative_drop,
        max_latency_ms=policy.max_latency_ms,
        min_lift_over_popularity=policy.min_lift_over_popularity,
    )
    if split_refusals:
        return GateDecision(False, split_refusals, evidence)

    value = _metric(challenger, metric)
    evidence["challenger"] = value
    if value is None:
        return GateDecision(False, [f"challenger evaluation has no finite {metric}: evaluate it first"], evidence)

    checks = [
        _check_champion(value, champion, policy, evidence),
        _check_latency(challenger_latency_p99_ms, policy, evidence),
        _check_popularity(value, popularity, policy, evidence),
    ]
    return GateDecision(all(ok for ok, _ in checks), [reason for _, reason in checks], evidence)


def _check_champion(
    value: float, champion: dict[str, Any] | None, policy: PromotionConfig, evidence: dict[str, Any]
) -> tuple[bool, str]:
    metric = policy.metric
    if champion is None:
        evidence["champion"] = None
        return True, f"no champion yet: challenger {metric}={value:.4f} becomes the first"
    reference = _metric(champion, metric)
    evidence["champion"] = reference
    if reference is None:
        return False, f"champion has no finite {metric} on this split: promote manually or re-evaluate it"
    # `floor` instead of a division keeps a zero champion score well defined.
    floor = reference * (1.0 - policy.max_relative_drop)
    change = (value - reference) / reference if reference else 0.0
    evidence["relative_change"] = change
    verdict = "within" if value >= floor else "beyond"
    return value >= floor, (
        f"{metric}: challenger {value:.4f} vs champion {reference:.4f} ({change:+.2%}), {verdict} the allowed "
        f"drop of {policy.max_relative_drop:.2%} (floor {floor:.4f})"
    )


def _check_latency(latency: float | None, policy: PromotionConfig, evidence: dict[str, Any]) -> tuple[bool, str]:
    evidence["latency_p99_ms"] = latency
    if latency is None or not math.isfinite(latency):
        return False, f"p99 latency not measured: measure it (budget {policy.max_latency_ms:.1f} ms) and retry"
    ok = latency <= policy.max_latency_ms
    verdict = "within" if ok else "over"
    return ok, f"p99 latency {latency:.2f} ms {verdict} the budget of {policy.max_latency_ms:.1f} ms"


def _check_popularity(
    value: float, popularity: dict[str, Any] | None, policy: PromotionConfig, evidence: dict[str, Any]
) -> tuple[bool, str]:
    metric = policy.metric
    baseline = None if popularity is None else _metric(popularity, metric)
    evidence["popularity"] = baseline
    if baseline is None:
        return False, f"no popularity baseline {metric} on this split: evaluate the 'pop' model alongside"
    lift = value - baseline
    evidence["lift_over_popularity"] = lift
    ok = lift >= policy.min_lift_over_popularity
    return ok, (
        f"{metric}: challenger {value:.4f} vs popularity {baseline:.4f}, lift {lift:+.4f} "
        f"{'meets' if ok else 'misses'} the required {policy.min_lift_over_popularity:.4f}"
    )
