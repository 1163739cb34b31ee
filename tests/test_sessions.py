"""Sessionizer: unit cases and properties (hypothesis) — no event lost or duplicated except by the documented
rules, order preserved within a session, timeouts respected, output independent of input row order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionrec.config import SessionConfig
from sessionrec.ops.schema import EVENT_SCHEMA
from sessionrec.ops import sessions as sessions_module
from sessionrec.ops.sessions import length_histogram, session_summary, sessionize

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def events(rows: list[tuple[str | None, str | None, str, int]]) -> pl.DataFrame:
    """rows: (session_id, user_id, item_id, seconds after T0), in arrival order."""
    return pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(len(rows))],
            "session_id": [r[0] for r in rows],
            "user_id": [r[1] for r in rows],
            "item_id": [r[2] for r in rows],
            "timestamp": [T0 + timedelta(seconds=r[3]) for r in rows],
            "event_type": ["view"] * len(rows),
            "category": [None] * len(rows),
            "price": [None] * len(rows),
            "source": ["t"] * len(rows),
            "source_line": list(range(1, len(rows) + 1)),
            "seq": list(range(len(rows))),
        },
        schema=EVENT_SCHEMA,
    )


def test_given_sessions_are_ordered_with_stable_ties() -> None:
    result = sessionize(events([("a", None, "x", 10), ("a", None, "y", 0), ("a", None, "z", 10)]), SessionConfig())
    assert result.events["item_id"].to_list() == ["y", "x", "z"]  # tie at 10 s keeps arrival order
    assert result.events["position"].to_list() == [0, 1, 2]
    assert result.stats["late_reordered"] == 1


def test_derived_sessions_split_on_timeout() -> None:
    cfg = SessionConfig(timeout_minutes=30)
    rows = [(None, "u", "a", 0), (None, "u", "b", 29 * 60), (None, "u", "c", 29 * 60 + 30 * 60 + 1),
            (None, "v", "d", 5)]
    result = sessionize(events(rows), cfg)
    assert result.events.group_by("session_id", maintain_order=True).agg("item_id").sort("session_id").rows() == [
        ("u#0", ["a", "b"]), ("u#1", ["c"]), ("v#0", ["d"])]
    assert result.stats["sessions_derived"] == 3


def test_late_events_beyond_allowed_lateness_are_quarantined() -> None:
    cfg = SessionConfig(allowed_lateness_minutes=10)
    rows = [("a", None, "x", 3600), ("a", None, "y", 3600 - 5 * 60), ("a", None, "z", 3600 - 20 * 60)]
    result = sessionize(events(rows), cfg)
    assert result.events["item_id"].to_list() == ["y", "x"]
    assert result.late["reason"].to_list() == ["late_event"]
    assert result.late["source_line"].to_list() == [3]
    assert (result.stats["late_reordered"], result.stats["late_quarantined"]) == (1, 1)


def test_summary_and_histogram() -> None:
    result = sessionize(events([("a", None, "x", 0), ("a", None, "y", 60), ("b", None, "x", 5)]), SessionConfig())
    summary = session_summary(result.events).sort("session_id")
    assert summary["length"].to_list() == [2, 1]
    assert summary["duration_seconds"].to_list() == [60, 0]
    assert length_histogram(summary)["1"] == 1 and length_histogram(summary)["2"] == 1


row_strategy = st.tuples(
    st.one_of(st.none(), st.sampled_from(["s1", "s2", "s3"])),
    st.sampled_from(["u1", "u2"]),
    st.sampled_from(["i1", "i2", "i3", "i4"]),
    st.integers(min_value=0, max_value=6 * 3600),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(row_strategy, min_size=1, max_size=40), perm_seed=st.integers(0, 10_000),
       lateness=st.sampled_from([0, 30, 600]))
def test_sessionizer_properties(rows, perm_seed, lateness) -> None:
    cfg = SessionConfig(timeout_minutes=30, allowed_lateness_minutes=lateness)
    frame = events(rows)
    result = sessionize(frame, cfg)
    # Nothing lost or duplicated: every event is in a session or quarantined as late, exactly once.
    out_ids = result.events["event_id"].to_list() + [r.split('"event_id":"')[1].split('"')[0]
                                                      for r in result.late["raw"].to_list()]
    assert sorted(out_ids) == sorted(frame["event_id"].to_list())
    # Independent of the input's row order (arrival order is the `seq` column, a property of the events).
    shuffled = sessionize(frame.sample(fraction=1.0, shuffle=True, seed=perm_seed), cfg)
    assert shuffled.events.equals(result.events)
    assert sorted(shuffled.late["raw"].to_list()) == sorted(result.late["raw"].to_list())
    for _, group in result.events.group_by("session_id"):
        group = group.sort("position")
        ts = group["timestamp"].to_list()
        # Order inside a session: by time, positions 0..n-1.
        assert ts == sorted(ts)
        assert group["position"].to_list() == list(range(group.height))
        # Derived sessions respect the timeout: no gap above it inside, and one user per session.
        if "#" in group["session_id"][0]:
            gaps = [(b - a).total_seconds() for a, b in zip(ts, ts[1:])]
            assert all(g <= 30 * 60 for g in gaps)
            assert group["user_id"].n_unique() == 1
    # Consecutive derived sessions of a user are separated by more than the timeout.
    derived = result.events.filter(pl.col("session_id").str.contains("#"))
    spans = derived.group_by("session_id").agg(pl.col("user_id").first(), pl.col("timestamp").min().alias("lo"),
                                               pl.col("timestamp").max().alias("hi")).sort(["user_id", "lo"])
    for (u1, _, hi), (u2, lo, _) in zip(spans.select("user_id", "lo", "hi").rows(),
                                        spans.select("user_id", "lo", "hi").rows()[1:]):
        if u1 == u2:
            assert (lo - hi).total_seconds() > 30 * 60
    # Late events are exactly those further behind than allowed.
    assert all("late_event" == r for r in result.late["reason"].to_list())
    # The fast paths (hashed keys, packed sort key) agree with the exact key and a plain two-column sort.
    exact = sessions_module._sessionize(frame, cfg, "sessionize", sessions_module._exact_key())
    assert exact is not None and exact.events.equals(result.events) and exact.late.equals(result.late)
    big_seq = sessionize(frame.with_columns(pl.col("seq") + 2**40), cfg)
    assert big_seq.events.equals(result.events) and big_seq.stats == result.stats


@pytest.mark.parametrize("late", [False, True])
def test_a_hash_shared_by_two_session_keys_falls_back_to_the_exact_key(monkeypatch, late: bool) -> None:
    rows = [("a", None, "x", 100), (None, "a", "y", 50 if late else 150), ("b", None, "z", 120),
            (None, "u", "w", 130), ("a", None, "v", 140)]
    expected = sessionize(events(rows), SessionConfig())
    monkeypatch.setattr(sessions_module, "_hashed_key", lambda: pl.lit(7, dtype=pl.UInt64))  # every key collides
    assert sessions_module._sessionize(events(rows), SessionConfig(), "s", sessions_module._hashed_key()) is None
    result = sessionize(events(rows), SessionConfig())
    assert result.events.equals(expected.events) and result.stats == expected.stats
    assert result.events.group_by("session_id").len().height == 4  # a, b, a#0 (user a), u#0
