"""Synthetic e-commerce sessions: the demo's embedded dataset and the input of the scale benchmarks.

The data must behave like a real click log where it matters downstream: a long-tailed catalogue, sessions with a
learnable next-item structure (item-to-item successors, repeat views, category drift), a purchase funnel,
realistic lengths and gaps, users who come back, a daily rhythm, and optional drift for monitoring. Everything is
drawn from one seeded numpy Generator, so a configuration names one dataset exactly.

It scales by being *session-parallel*: all sessions advance one step at a time as numpy arrays (sessions sorted
by length, so the live ones are always a prefix), which is a few hundred vectorised steps for any number of
events rather than a Python loop per event or per session.

Same-user sessions are kept at least `MIN_IDLE_MINUTES` apart and gaps inside a session below `MAX_GAP_MINUTES`,
so that sessionizing by the default 30-minute timeout (``SessionConfig.timeout_minutes``) recovers the generated
sessions exactly when the log is written without session ids. Users who cannot hold their share of sessions
inside ``days`` that way (see `MAX_USER_LOAD`) make the generator refuse, saying how many users it needs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from sessionrec.config import CANONICAL_EVENT_TYPES, GeneratorConfig
from sessionrec.ops.errors import SessionrecError

#: ``progress(done_events, total_events)``, called after every simulation step (a CLI hangs a bar on it).
Progress = Callable[[int, int], None]

# Shape of the data that the configuration does not expose: chosen once to look like public click logs.
#: Weights of an item's successors, first to last: skewed, so that "the" next item of an item exists.
SUCCESSOR_WEIGHTS = (0.6, 0.2, 0.12, 0.08)
N_SUCCESSORS = len(SUCCESSOR_WEIGHTS)
#: Share of successors drawn in the item's own category (the rest: another category).
SUCCESSOR_SAME_CATEGORY = 0.85
#: Successors are drawn proportionally to popularity**this: popular items are likelier successors, yet every
#: item keeps successors of its own instead of all pointing at its category's best seller.
SUCCESSOR_POPULARITY_POWER = 0.5
#: Category sizes ~ Dirichlet(this): unequal but every category has a real share.
CATEGORY_SIZE_CONCENTRATION = 2.0
MAX_SESSION_LENGTH = 300
SESSION_LENGTH_SIGMA = 1.0  # lognormal shape of session lengths (heavier tail than a geometric)
GAP_MEDIAN_SECONDS = 30.0
GAP_SIGMA = 1.2  # lognormal: ~12 % of gaps above two minutes, a few above ten
MIN_GAP_SECONDS = 1.0
MAX_GAP_MINUTES = 25.0  # inside a session: always below the 30-minute sessionization timeout
MIN_IDLE_MINUTES = 35.0  # between two sessions of one user: always above it
EXTRA_IDLE_MINUTES = 10.0  # mean of the exponential extra idle a pushed-back session waits (no exact 35 min)
USER_ACTIVITY_SIGMA = 1.0  # lognormal user activity: most users come a few times, some many
#: Share of the time span a user may spend in sessions (plus idle after each): beyond it the user is a bot.
MAX_USER_LOAD = 0.5
#: Relative traffic per hour of the day (UTC used as local time): night trough, evening peak.
HOURLY_TRAFFIC = (
    0.9, 0.6, 0.4, 0.3, 0.25, 0.3, 0.5, 0.8, 1.1, 1.3, 1.4, 1.5,
    1.6, 1.5, 1.45, 1.45, 1.5, 1.6, 1.8, 2.0, 2.2, 2.1, 1.7, 1.3,
)  # fmt: skip
PRICE_MEDIAN = 25.0
CATEGORY_PRICE_SPREAD = 0.8  # sd of the log median price across categories
ITEM_PRICE_SIGMA = (0.2, 0.6)  # range of the per-category lognormal sigma of item prices
CLICK_PROBABILITY = 0.25  # a browsing event is a click rather than a view
CART_PROBABILITY = 0.05  # after a view/click: the same item goes to the cart
PURCHASE_PROBABILITY = 0.35  # after an add_to_cart: the same item is bought
#: Autocorrelation of "on a new item" after the drift: new items are browsed in runs (their successors are new
#: items too) while the long-run share of events on them stays ``drift_new_items``.
NEW_ITEM_PERSISTENCE = 0.6

VIEW, CLICK, ADD_TO_CART, PURCHASE = (
    CANONICAL_EVENT_TYPES.index(name) for name in ("view", "click", "add_to_cart", "purchase")
)
_MS_PER_DAY = 86_400_000
_TEXT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.6fZ"  # microseconds: lossless for the schema's unit
_WRITERS = (".parquet", ".csv", ".tsv", ".jsonl")


class GeneratorError(SessionrecError, ValueError):
    """A generator configuration that cannot produce data, or an output path it cannot write."""


@dataclass(frozen=True)
class _Catalogue:
    """Items of both generations (original, and new at the drift), laid out for fast weighted sampling.

    Items are grouped by (generation, category) in ``order``; group ``g * n_categories + c`` spans positions
    ``bounds[k]:bounds[k + 1]``. ``cum`` holds, per weight table (0: popularity before the drift, 1: after it,
    2: successor weights), the cumulative weights along ``order`` with a leading zero, each table normalised to 1
    and shifted by its index so that the flattened array stays sorted for one `np.searchsorted`.
    """

    n_categories: int
    category: np.ndarray  # int32 per item
    generation: np.ndarray  # int8 per item: 0 original, 1 new at the drift
    price: np.ndarray  # float64 per item
    order: np.ndarray  # int32 item ids by (generation, category)
    bounds: np.ndarray  # int64, 2 * n_categories + 1
    cum: np.ndarray  # float64, 3 * (n_total + 1)
    successors: np.ndarray  # int32 (n_total, N_SUCCESSORS)

    @property
    def n_total(self) -> int:
        return len(self.category)

    def pick(self, table: np.ndarray | int, lo: np.ndarray, hi: np.ndarray, skip_lo: np.ndarray,
             skip_hi: np.ndarray, u: np.ndarray) -> np.ndarray:  # fmt: skip
        """Weighted items among positions [lo, hi) of ``order`` excluding [skip_lo, skip_hi), one per ``u``.

        The exclusion is what "another category" means; it is ignored where it would leave nothing to pick.
        """
        base = np.asarray(table, dtype=np.int64) * (self.n_total + 1)
        cum = self.cum
        start, stop = cum[base + lo], cum[base + hi]
        skip_start = cum[base + skip_lo]
        skipped = cum[base + skip_hi] - skip_start
        skipped = np.where(stop - start - skipped > 0, skipped, 0.0)
        x = start + u * (stop - start - skipped)
        x = np.where(x >= skip_start, x + skipped, x)
        position = np.searchsorted(cum, x, side="right") - 1 - base  # >= lo: x starts at lo's cumulative weight
        return self.order[np.minimum(position, hi - 1)]

    def group(self, generation: np.ndarray, category: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = generation.astype(np.int64) * self.n_categories + category
        return self.bounds[key], self.bounds[key + 1]

    def block(self, generation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = generation.astype(np.int64) * self.n_categories
        return self.bounds[key], self.bounds[key + self.n_categories]


def _drift_active(cfg: GeneratorConfig) -> bool:
    return cfg.drift_start_day is not None and (cfg.drift_new_items > 0 or cfg.drift_popularity_shift > 0)


def _validate(cfg: GeneratorConfig) -> datetime:
    """Cross-field rules the config model cannot express; returns the parsed start instant."""
    if cfg.n_categories > cfg.n_items:
        raise GeneratorError(
            f"n_categories={cfg.n_categories} exceeds n_items={cfg.n_items}: every category needs an item; "
            "lower n_categories or raise n_items"
        )
    total = cfg.follow_probability + cfg.repeat_probability + cfg.category_switch_probability
    if total > 1:
        raise GeneratorError(
            f"follow_probability + repeat_probability + category_switch_probability = {total:.3f} exceeds 1; "
            "they are shares of one choice, lower them"
        )
    if cfg.mean_session_length >= MAX_SESSION_LENGTH / 2:
        raise GeneratorError(
            f"mean_session_length={cfg.mean_session_length} is too long: sessions are capped at "
            f"{MAX_SESSION_LENGTH} events, use a mean below {MAX_SESSION_LENGTH // 2}"
        )
    try:
        start = datetime.fromisoformat(cfg.start)
    except ValueError as exc:
        raise GeneratorError(f"start={cfg.start!r} is not an ISO-8601 instant like 2026-01-01T00:00:00Z") from exc
    return start.replace(tzinfo=timezone.utc) if start.tzinfo is None else start.astimezone(timezone.utc)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Popularity rank**-exponent with the ranks shuffled over the ids (ids carry no popularity)."""
    return rng.permutation(np.arange(1, n + 1, dtype=np.float64)) ** -exponent


def _assign_categories(n: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per category first (none is empty), the rest by category share."""
    n_cat = len(shares)
    if n == 0:
        return np.empty(0, dtype=np.int32)
    return rng.permutation(np.concatenate([np.arange(n_cat), _draw(shares, n - n_cat, rng)])).astype(np.int32)


def _build_catalogue(cfg: GeneratorConfig, rng: np.random.Generator) -> _Catalogue:
    n_cat, n_old = cfg.n_categories, cfg.n_items
    drifting = _drift_active(cfg) and cfg.drift_new_items > 0
    n_new = max(n_cat, math.ceil(n_old * cfg.drift_new_items)) if drifting else 0
    shares = rng.dirichlet(np.full(n_cat, CATEGORY_SIZE_CONCENTRATION))
    category = np.concatenate([_assign_categories(n_old, shares, rng), _assign_categories(n_new, shares, rng)])
    generation = np.repeat(np.array([0, 1], dtype=np.int8), [n_old, n_new])

    popularity = np.concatenate([_zipf_weights(n_old, cfg.popularity_exponent, rng),
                                 _zipf_weights(n_new, cfg.popularity_exponent, rng)])  # fmt: skip
    shifted = popularity.copy()
    if _drift_active(cfg):
        # Rotate a share of the original items' popularity mass onto other (randomly chosen) original items.
        shifted[:n_old] = (1 - cfg.drift_popularity_shift) * popularity[:n_old] + (
            cfg.drift_popularity_shift * popularity[:n_old][rng.permutation(n_old)]
        )
    weights = (popularity, shifted, popularity**SUCCESSOR_POPULARITY_POWER)

    order = np.lexsort((np.arange(len(category)), category, generation)).astype(np.int32)
    keys = generation[order].astype(np.int64) * n_cat + category[order]
    bounds = np.searchsorted(keys, np.arange(2 * n_cat + 1), side="left")
    cum = np.concatenate([
        table + np.concatenate([[0.0], np.cumsum(w[order])]) / w.sum() for table, w in enumerate(weights)
    ])  # fmt: skip

    log_median = np.log(PRICE_MEDIAN) + rng.normal(0, CATEGORY_PRICE_SPREAD, n_cat)
    sigma = rng.uniform(*ITEM_PRICE_SIGMA, n_cat)
    price = np.round(np.exp(log_median[category] + sigma[category] * rng.standard_normal(len(category))), 2)
    catalogue = _Catalogue(n_cat, category, generation, np.maximum(price, 0.01), order, bounds, cum,
                           np.empty((0, N_SUCCESSORS), dtype=np.int32))  # fmt: skip
    return replace(catalogue, successors=_successors(catalogue, rng))


def _successors(cat: _Catalogue, rng: np.random.Generator) -> np.ndarray:
    """Each item's successors: never itself, mostly in its own category, always in its own generation."""
    items = np.repeat(np.arange(cat.n_total), N_SUCCESSORS)
    gen, category = cat.generation[items], cat.category[items]
    group_lo, group_hi = cat.group(gen, category)
    block_lo, block_hi = cat.block(gen)
    position = np.empty(cat.n_total, dtype=np.int64)
    position[cat.order] = np.arange(cat.n_total)
    position = position[items]
    # Same category: any item of the group but the item itself; otherwise the block minus the whole group.
    same = rng.random(len(items)) < SUCCESSOR_SAME_CATEGORY
    lo, hi = np.where(same, group_lo, block_lo), np.where(same, group_hi, block_hi)
    skip_lo, skip_hi = np.where(same, position, group_lo), np.where(same, position + 1, group_hi)
    picked = cat.pick(2, lo, hi, skip_lo, skip_hi, rng.random(len(items)))
    return picked.reshape(cat.n_total, N_SUCCESSORS).astype(np.int32)


def _mean_capped_length(mu: float) -> float:
    """E[min(1 + floor(X), cap)] for X ~ lognormal(mu, SESSION_LENGTH_SIGMA) = 1 + sum_k P(X >= k)."""
    scale = SESSION_LENGTH_SIGMA * math.sqrt(2)
    return 1 + sum(0.5 * math.erfc((math.log(k) - mu) / scale) for k in range(1, MAX_SESSION_LENGTH))


def _session_lengths(cfg: GeneratorConfig, rng: np.random.Generator) -> np.ndarray:
    """Skewed lengths with mean ``mean_session_length`` summing to exactly ``n_events``, longest first."""
    low, high = -20.0, 20.0  # bisection on the lognormal location: the mean is monotone in it
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _mean_capped_length(mid) < cfg.mean_session_length else (low, mid)
    chunks: list[np.ndarray] = []
    total = 0
    while total < cfg.n_events:
        size = math.ceil((cfg.n_events - total) / cfg.mean_session_length * 1.05) + 16
        chunk = np.minimum(1 + np.floor(rng.lognormal(low, SESSION_LENGTH_SIGMA, size)), MAX_SESSION_LENGTH)
        chunks.append(chunk.astype(np.int64))
        total += int(chunks[-1].sum())
    lengths = np.concatenate(chunks)
    cumulative = np.cumsum(lengths)
    n_sessions = int(np.searchsorted(cumulative, cfg.n_events, side="left")) + 1
    lengths = lengths[:n_sessions]
    lengths[-1] -= cumulative[n_sessions - 1] - cfg.n_events
    return -np.sort(-lengths)


@dataclass(frozen=True)
class _Schedule:
    """When each session happens and whose it is; offsets and times in CSR layout (longest session first)."""

    offsets: np.ndarray  # int64, n_sessions + 1
    start_ms: np.ndarray  # int64 per session, from cfg.start
    user: np.ndarray  # int64 per session
    event_ms: np.ndarray  # int64 per event, from cfg.start


def _schedule(cfg: GeneratorConfig, lengths: np.ndarray, rng: np.random.Generator) -> _Schedule:
    n_sessions, n_events = len(lengths), int(lengths.sum())
    offsets = np.zeros(n_sessions + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    gaps = np.clip(rng.lognormal(math.log(GAP_MEDIAN_SECONDS), GAP_SIGMA, n_events), MIN_GAP_SECONDS,
                   MAX_GAP_MINUTES * 60)  # fmt: skip
    gaps = np.round(gaps * 1000).astype(np.int64)
    gaps[offsets[:-1]] = 0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[offsets[:-1]], lengths)  # time since the session's first event
    idle = round(MIN_IDLE_MINUTES * 60_000)
    extra_idle = np.ceil(rng.exponential(EXTRA_IDLE_MINUTES * 60_000, n_sessions)).astype(np.int64)
    span = elapsed[offsets[1:] - 1] + idle + extra_idle  # a session plus the idle time its user needs after it

    horizon = cfg.days * _MS_PER_DAY
    cap = MAX_USER_LOAD * horizon / span.mean()  # expected sessions one user can hold
    if n_sessions > cap * cfg.n_users:
        raise GeneratorError(
            f"{cfg.n_events} events make {n_sessions} sessions, which do not fit {cfg.n_users} users in "
            f"{cfg.days} days (about {cap:.0f} sessions per user at most, {MIN_IDLE_MINUTES:g} min apart): "
            "raise n_users to at least "
            f"{math.ceil(n_sessions / cap)} or raise days"
        )
    activity = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, cfg.n_users)
    user = _draw(_capped_shares(activity, n_sessions, cap), n_sessions, rng)
    day = rng.integers(0, cfg.days, n_sessions)
    hour = _draw(np.asarray(HOURLY_TRAFFIC), n_sessions, rng)
    wanted = day * _MS_PER_DAY + hour * 3_600_000 + rng.integers(0, 3_600_000, n_sessions)

    # A user's sessions never overlap nor come within `idle` of each other. Forward: a session starts at its
    # wanted time or, if the user's previous session (plus its idle) is not over, right after it; with `before` the
    # spans of the user's earlier sessions that is before + running max(wanted - before), a cumulative max per
    # user. Backward: no session may end past the horizon, so each start is capped by `latest`, the schedule
    # packed against the end. Both respect the spacing, so their minimum does too; it fits whenever the user's
    # spans fit the horizon, which the cap above makes all but certain (otherwise the log runs a little longer).
    plan = (
        pl.DataFrame({"user": user, "wanted": wanted, "span": span})
        .with_row_index("session")
        .sort("user", "wanted", "session")
        .with_columns(
            before=(pl.col("span").cum_sum() - pl.col("span")).over("user"),
            latest=(horizon - 1 + idle - pl.col("span").cum_sum(reverse=True)).over("user"),
        )
        .with_columns(start=pl.col("before") + (pl.col("wanted") - pl.col("before")).cum_max().over("user"))
        .with_columns(
            start=pl.when(pl.col("latest").min().over("user") >= 0)
            .then(pl.min_horizontal("start", "latest"))
            .otherwise("start")
        )
        .sort("session")
    )
    start = plan["start"].to_numpy()
    return _Schedule(offsets, start, user, np.repeat(start, lengths) + elapsed)


def _capped_shares(activity: np.ndarray, n_sessions: int, cap: float) -> np.ndarray:
    """Expected sessions per user: proportional to activity, but none above ``cap`` (water-filling: what the
    busiest users cannot take goes to the others in proportion). Needs ``n_sessions <= cap * len(activity)``."""
    ranked = np.sort(activity)[::-1]
    rest = np.cumsum(ranked[::-1])[::-1]  # activity of the users from rank j on
    capped = np.arange(len(ranked))
    level = (n_sessions - capped * cap) / rest  # sessions per unit of activity when the top j users are capped
    first = int(np.argmax(level * ranked <= cap))
    return np.minimum(level[first] * activity, cap)


def _draw(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices drawn with probability proportional to ``weights``."""
    cumulative = np.cumsum(weights)
    return np.minimum(np.searchsorted(cumulative, rng.random(n) * cumulative[-1], side="right"), len(weights) - 1)


def _simulate(
    cfg: GeneratorConfig, cat: _Catalogue, lengths: np.ndarray, offsets: np.ndarray, post_drift: np.ndarray,
    rng: np.random.Generator, progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Items and event types of every event, all sessions advancing one step at a time.

    Sessions are sorted longest first, so the sessions still running at step t are the prefix ``[:active[t]]``.
    """
    n_sessions, n_events = len(lengths), int(offsets[-1])
    items = np.empty(n_events, dtype=np.int32)
    types = np.empty(n_events, dtype=np.int8)
    table = post_drift.astype(np.int64)  # weight table: popularity before or after the drift
    p_new = np.where(post_drift, cfg.drift_new_items, 0.0)
    stay_new = 1 - (1 - p_new) * (1 - NEW_ITEM_PERSISTENCE)
    enter_new = p_new * (1 - NEW_ITEM_PERSISTENCE)
    successor_cum = np.cumsum(SUCCESSOR_WEIGHTS) / sum(SUCCESSOR_WEIGHTS)
    follow = cfg.follow_probability
    repeat = follow + cfg.repeat_probability
    switch = repeat + cfg.category_switch_probability
    active = np.searchsorted(-lengths, -np.arange(int(lengths[0])), side="left")

    u = rng.random((3, n_sessions))
    gen = (u[0] < p_new).astype(np.int8)
    lo, hi = cat.block(gen)
    current = cat.pick(table, lo, hi, lo, lo, u[1])
    kind = np.where(u[2] < CLICK_PROBABILITY, CLICK, VIEW).astype(np.int8)
    items[offsets[:-1]], types[offsets[:-1]] = current, kind
    done = n_sessions
    if progress is not None:
        progress(done, n_events)

    for step in range(1, len(active)):
        k = int(active[step])
        cur, prev = current[:k], kind[:k]
        u = rng.random((6, k))
        to_cart = ((prev == VIEW) | (prev == CLICK)) & (u[0] < CART_PROBABILITY)
        to_purchase = (prev == ADD_TO_CART) & (u[0] < PURCHASE_PROBABILITY)
        choice = u[1]
        switching = (choice >= repeat) & (choice < switch)
        gen = (u[2] < np.where(cat.generation[cur] == 1, stay_new[:k], enter_new[:k])).astype(np.int8)
        group_lo, group_hi = cat.group(gen, cat.category[cur])
        block_lo, block_hi = cat.block(gen)
        # One weighted draw serves both "another category" (the generation's block minus the current category)
        # and "a popular item of the current category", and replaces a follow/repeat of the wrong generation.
        fallback = cat.pick(
            table[:k],
            np.where(switching, block_lo, group_lo),
            np.where(switching, block_hi, group_hi),
            group_lo,
            np.where(switching, group_hi, group_lo),
            u[3],
        )
        successor = cat.successors[cur, np.searchsorted(successor_cum, u[4], side="right")]
        nxt = np.where(choice < follow, successor, np.where(choice < repeat, cur, fallback))
        nxt = np.where(cat.generation[nxt] != gen, fallback, nxt)
        funnel = to_cart | to_purchase
        nxt = np.where(funnel, cur, nxt)
        browse = np.where(u[5] < CLICK_PROBABILITY, CLICK, VIEW)
        now = np.where(to_cart, ADD_TO_CART, np.where(to_purchase, PURCHASE, browse)).astype(np.int8)
        current[:k], kind[:k] = nxt, now
        positions = offsets[:k] + step
        items[positions], types[positions] = nxt, now
        done += k
        if progress is not None:
            progress(done, n_events)
    return items, types


def generate_events(cfg: GeneratorConfig, progress: Progress | None = None) -> pl.DataFrame:
    """Exactly ``cfg.n_events`` events in log order (by timestamp, sessions interleaved), deterministic by seed.

    Columns: event_id, session_id (null for every row unless ``cfg.with_session_ids``), user_id, item_id,
    timestamp (UTC), event_type, category, price. ``progress`` is called with (events simulated, total) after
    each simulation step; building the frame afterwards takes roughly another half of the simulation's time.
    """
    start = _validate(cfg)
    rng = np.random.default_rng(cfg.seed)
    cat = _build_catalogue(cfg, rng)
    lengths = _session_lengths(cfg, rng)
    plan = _schedule(cfg, lengths, rng)
    # A session belongs to the regime of its start, so that new items never show up before the drift day.
    post_drift = np.zeros(len(lengths), dtype=bool)
    if _drift_active(cfg):
        post_drift = plan.start_ms >= cfg.drift_start_day * _MS_PER_DAY
    items, types = _simulate(cfg, cat, lengths, plan.offsets, post_drift, rng, progress)

    # Log order: by time; events of one session never tie (gaps >= 1 s), sessions tie-break stably. (Polars
    # sorts on all cores, numpy's stable argsort on one.)
    order = pl.DataFrame({"ms": plan.event_ms}).select(pl.arg_sort_by("ms", maintain_order=True)).to_series()
    order = order.to_numpy()
    session = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)[order]
    items = items[order]
    session_rank = np.empty(len(lengths), dtype=np.int64)  # session ids number the sessions by start time
    session_rank[np.argsort(plan.start_ms, kind="stable")] = np.arange(len(lengths))
    epoch_ms = pl.Series(plan.event_ms[order] + round(start.timestamp() * 1000))
    return pl.DataFrame({
        "event_id": _ids("e", cfg.n_events, 10),
        "session_id": (
            _ids("s", len(lengths), 9).gather(session_rank[session])
            if cfg.with_session_ids
            else pl.repeat(None, cfg.n_events, dtype=pl.String, eager=True)
        ),
        "user_id": _ids("u", cfg.n_users).gather(plan.user[session]),
        "item_id": _ids("i", cat.n_total).gather(items),
        "timestamp": epoch_ms.cast(pl.Datetime("ms")).dt.replace_time_zone("UTC").cast(pl.Datetime("us", "UTC")),
        "event_type": pl.Series(CANONICAL_EVENT_TYPES).gather(types[order]),
        "category": _ids("c", cfg.n_categories).gather(cat.category[items]),
        "price": cat.price[items],
    })  # fmt: skip


def _ids(prefix: str, n: int, width: int = 1) -> pl.Series:
    """``prefix`` + 0..n-1, zero-padded to ``width`` digits: built once per id, then gathered per event."""
    digits = pl.int_range(n, dtype=pl.Int64).cast(pl.String).str.pad_start(width, "0")
    return pl.select(pl.concat_str(pl.lit(prefix), digits)).to_series()


def write_events(frame: pl.DataFrame, path: Path) -> Path:
    """Write events in the format named by the extension (.parquet, .csv, .tsv, .jsonl) and return the path.

    Text formats carry timestamps as ISO-8601 UTC strings (``2026-01-01T08:00:00.123000Z``), which every reader
    parses unambiguously. The file appears complete or not at all (written beside it, then renamed), so that a
    crashed run never leaves a truncated file for ingestion to pick up.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITERS:
        raise GeneratorError(
            f"cannot write {path}: unknown extension {path.suffix!r}; use one of {', '.join(_WRITERS)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        if suffix == ".parquet":
            frame.write_parquet(partial)
        else:
            text = frame.with_columns(pl.col(pl.Datetime).dt.strftime(_TEXT_TIME_FORMAT))
            if suffix == ".jsonl":
                text.write_ndjson(partial)
            else:
                text.write_csv(partial, separator="\t" if suffix == ".tsv" else ",")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return path
