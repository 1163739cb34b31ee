"""The neural session models (GRU4Rec, SASRec) and their training loop, on CPU with small planted data.

The planted data follow a hidden first-order pattern (item -> fixed successor 90% of the time, a popular item
otherwise), which popularity cannot see: a model that learns sequences must beat it by far on held-out sessions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sessionrec.ops.device import DeviceError, resolve_device
from sessionrec.ops.evaluation import evaluate, iter_prefix_batches, metrics_from_ranks, ranks_from_scores
from sessionrec.ops.models.base import Prefixes
from sessionrec.ops.models.gru4rec import GRU4Rec, GRU4RecConfig, session_parallel_schedule
from sessionrec.ops.models.registry import create_model, load_model, save_model
from sessionrec.ops.models.sasrec import SASRec, SASRecConfig, training_windows
from sessionrec.ops.sessiondata import ItemIndex, SessionData
from sessionrec.ops.training import TrainingError, concat_sessions, tune

N_ITEMS = 50

SMALL = {
    "gru4rec": GRU4RecConfig(
        progress=False, layers=(32,), batch_size=16, n_sample=16, max_epochs=6, patience=2, device="cpu"
    ),
    "sasrec": SASRecConfig(
        progress=False, hidden=32, blocks=1, heads=1, inner=64, max_len=10, batch_size=32, max_epochs=6,
        dropout=0.1, learning_rate=0.005, device="cpu",
    ),
}  # fmt: skip
CLASSES = {"gru4rec": GRU4Rec, "sasrec": SASRec}


def planted(n_sessions: int, seed: int, start: float = 0.0, max_length: int = 8) -> SessionData:
    rng = np.random.default_rng(seed)
    successor = np.random.default_rng(123).permutation(N_ITEMS)  # the same hidden pattern for every split
    popularity = 1.0 / np.arange(1, N_ITEMS + 1)
    popularity /= popularity.sum()
    lengths = rng.integers(3, max_length + 1, n_sessions)
    items = []
    for length in lengths:
        current = rng.choice(N_ITEMS, p=popularity)
        items.append(current)
        for _ in range(length - 1):
            current = successor[current] if rng.random() < 0.9 else rng.choice(N_ITEMS, p=popularity)
            items.append(current)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    return SessionData(
        session_ids=np.array([f"{seed}-{i}" for i in range(n_sessions)], dtype=object),
        offsets=offsets,
        items=np.array(items, dtype=np.int64),
        times=start + np.repeat(np.arange(n_sessions) * 60.0, lengths) + within,
        n_items=N_ITEMS,
    )


@pytest.fixture(scope="module")
def splits() -> tuple[SessionData, SessionData, SessionData]:
    return planted(800, seed=1), planted(150, seed=2, start=1e6), planted(200, seed=3, start=2e6)


@pytest.fixture(scope="module")
def fitted(splits) -> dict[str, tuple]:
    train, valid, _ = splits
    out = {}
    for name, cls in CLASSES.items():
        model = cls(SMALL[name])
        out[name] = (model, model.fit(train, valid))
    return out


def prefixes_of(data: SessionData, limit: int = 300) -> Prefixes:
    return next(iter_prefix_batches(data, batch_size=limit)).prefixes


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_learns_planted_pattern_far_above_popularity(name, splits, fitted):
    train, _, test = splits
    model, report = fitted[name]
    popularity = np.bincount(train.items, minlength=N_ITEMS).astype(float)
    pop_ranks = np.concatenate(
        [ranks_from_scores(np.tile(popularity, (len(b.targets), 1)), b.targets) for b in iter_prefix_batches(test)]
    )
    baseline = metrics_from_ranks(pop_ranks, (20,))["mrr@20"]
    metrics = evaluate(model, test, train)
    assert baseline < 0.25
    assert metrics["mrr@20"] > 0.75, metrics["mrr@20"]
    assert report.best_valid_mrr > 0.75
    assert report.device == "cpu" and report.events_per_second > 0
    assert report.best_epoch == 1 + int(np.argmax([e["valid_mrr@20"] for e in report.epochs]))
    assert all(math.isfinite(e["loss"]) and e["train_seconds"] > 0 for e in report.epochs)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_embeddings_reproduce_scores(name, splits, fitted):
    model, _ = fitted[name]
    prefixes = prefixes_of(splits[2])
    prefixes = Prefixes(items=[*prefixes.items, np.zeros(0, dtype=np.int64)], times=np.append(prefixes.times, 0.0))
    scores = model.score(prefixes)
    sessions, items = model.session_embeddings(prefixes), model.item_embeddings()
    assert scores.shape == (len(prefixes), N_ITEMS) and scores.dtype == np.float32
    assert items.shape[0] == N_ITEMS and sessions.shape == (len(prefixes), items.shape[1])
    np.testing.assert_allclose(sessions @ items.T, scores, rtol=1e-5, atol=1e-5)
    # a prefix longer than anything seen in training is fine too
    long = Prefixes(items=[np.tile(np.arange(N_ITEMS), 3)], times=np.zeros(1))
    assert np.isfinite(model.score(long)).all()


def test_gru4rec_fused_session_vectors_equal_the_step_by_step_recurrence(splits, fitted):
    """Serving runs one fused `nn.GRU` pass per layer; evaluation and training step the cells one item at a time:
    both must give the same states, also for an empty prefix and for prefixes of very different lengths."""
    model, _ = fitted["gru4rec"]
    net = model.network
    prefixes = [*prefixes_of(splits[2], limit=40).items, np.zeros(0, dtype=np.int64), np.arange(N_ITEMS)]
    fused = model.session_embeddings(Prefixes(items=prefixes, times=np.zeros(len(prefixes))))
    with torch.inference_mode():
        for row, prefix in zip(fused, prefixes):
            hidden = [torch.zeros(1, size) for size in SMALL["gru4rec"].layers]
            state = hidden[-1]
            for item in prefix:
                state = net.recur(net.inputs(net.table, torch.tensor([int(item)])), hidden)
            np.testing.assert_allclose(row[:-1], state[0].numpy(), rtol=1e-5, atol=1e-6)
            assert row[-1] == 1.0  # the bias column


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_save_load_round_trip_gives_identical_scores(name, splits, fitted, tmp_path):
    model, _ = fitted[name]
    prefixes = prefixes_of(splits[2])
    save_model(model, tmp_path / name)
    loaded = load_model(tmp_path / name)
    assert type(loaded) is type(model) and loaded.params() == model.params()
    np.testing.assert_array_equal(loaded.score(prefixes), model.score(prefixes))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_unknown_items_are_the_callers_job(name, splits, fitted):
    """The caller encodes with ItemIndex.encode (unknown items dropped); an index -1 reaching the model is an
    error, never a silent embedding row."""
    model, _ = fitted[name]
    index = ItemIndex.from_items([str(i) for i in range(N_ITEMS)])
    encoded, unknown = index.encode(["3", "never-seen", "7"])
    assert unknown == 1 and encoded.tolist() == [3, 7]
    assert model.score(Prefixes(items=[encoded], times=np.zeros(1))).shape == (1, N_ITEMS)
    with pytest.raises(TrainingError, match="ItemIndex.encode"):
        model.score(Prefixes(items=[np.array([3, -1, 7])], times=np.zeros(1)))
    with pytest.raises(TrainingError, match="outside the catalogue"):
        model.score(Prefixes(items=[np.array([N_ITEMS])], times=np.zeros(1)))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_same_seed_same_weights_other_seed_other_weights(name, splits):
    train = splits[0]
    config = dataclasses.replace(SMALL[name], max_epochs=2)
    prefixes = prefixes_of(splits[2], 50)
    first, second = CLASSES[name](config), CLASSES[name](config)
    first.fit(train)
    second.fit(train)
    for key, value in first.network.state_dict().items():
        assert torch.equal(value, second.network.state_dict()[key]), key
    np.testing.assert_array_equal(first.score(prefixes), second.score(prefixes))
    other = CLASSES[name](dataclasses.replace(config, seed=7))
    other.fit(train)
    assert not np.array_equal(other.score(prefixes), first.score(prefixes))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_interrupted_run_resumes_to_the_uninterrupted_result(name, splits, tmp_path, monkeypatch):
    train, valid, test = splits
    config = dataclasses.replace(SMALL[name], max_epochs=4, patience=10)
    straight = CLASSES[name](dataclasses.replace(config, checkpoint_dir=str(tmp_path / "straight")))
    straight_report = straight.fit(train, valid)

    resumable = dataclasses.replace(config, checkpoint_dir=str(tmp_path / "resumed"))
    interrupted = CLASSES[name](resumable)
    real_epoch, calls = interrupted._train_epoch, []

    def crash_in_third_epoch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args)

    monkeypatch.setattr(interrupted, "_train_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(train, valid)

    resumed = CLASSES[name](resumable)
    report = resumed.fit(train, valid)
    assert [e["loss"] for e in report.epochs] == [e["loss"] for e in straight_report.epochs]
    assert report.best_epoch == straight_report.best_epoch
    for key, value in straight.network.state_dict().items():
        assert torch.equal(value, resumed.network.state_dict()[key]), key

    finished = CLASSES[name](resumable)  # a finished run is restored without training again
    monkeypatch.setattr(finished, "_train_epoch", lambda *args: pytest.fail("trained again"))
    finished.fit(train, valid)
    np.testing.assert_array_equal(finished.score(prefixes_of(test, 50)), straight.score(prefixes_of(test, 50)))

    changed = CLASSES[name](dataclasses.replace(resumable, learning_rate=0.01))
    with pytest.raises(TrainingError, match="other data or hyper-parameters"):
        changed.fit(train, valid)


def test_refit_retrains_on_train_and_valid_for_the_best_epoch_count(splits):
    train, valid, _ = splits
    model = GRU4Rec(dataclasses.replace(SMALL["gru4rec"], max_epochs=3, refit=True))
    report = model.fit(train, valid)
    refit = [e for e in report.epochs if e["refit"] == 1.0]
    assert len(refit) == report.best_epoch
    full_targets = int((concat_sessions(train, valid).lengths() - 1).sum())
    assert all(e["events"] == full_targets for e in refit)


def test_time_budget_stops_training(splits):
    config = dataclasses.replace(SMALL["sasrec"], max_epochs=50, patience=50, max_seconds=0.5, batch_size=2)
    model = SASRec(config)
    report = model.fit(splits[0], splits[1])
    assert len(report.epochs) < 50 and report.epochs[-1].get("out_of_time") == 1.0


def test_gru4rec_unique_row_loss_equals_the_official_formulation(splits):
    """The step scores unique rows with log-mass column weights; this must equal the official loss over the
    ``batch targets + samples`` columns with duplicates (cross-entropy with logQ; BPR-max with ELU)."""
    train = splits[0]
    for loss in ("cross-entropy", "bpr-max"):
        config = dataclasses.replace(
            SMALL["gru4rec"], loss=loss, bpreg=0.5, final_act="elu" if loss == "bpr-max" else "linear", n_sample=40
        )
        model = GRU4Rec(config)
        model._device, model.n_items = torch.device("cpu"), N_ITEMS
        torch.manual_seed(0)
        model.network = model._build(N_ITEMS)
        with torch.no_grad():
            model.network.table[:, -1].normal_()  # non-zero output biases
        prep, _ = model._prepare(train)
        steps = prep.positions.shape[0]
        for lo in (0, steps - 3):  # full batches, then the end of the epoch with idle slots
            torch.manual_seed(1)
            unique, _, labels, weight, offset = model._chunk(prep, lo, lo + 3)
            torch.manual_seed(1)
            positions = prep.positions[lo : lo + 3]
            idle = positions < 0
            targets = prep.items[positions + 1].masked_fill(idle, 0)
            draws = torch.rand(3, config.n_sample)
            samples = torch.searchsorted(prep.cdf, draws, right=True).clamp(max=N_ITEMS - 1)
            slots = positions.shape[1]
            for t in range(3):
                session = torch.cat([torch.randn(slots, 32), torch.ones(slots, 1)], dim=1)
                scores = session @ model.network.table[torch.cat([targets[t], samples[t]])].T
                unique_scores = session @ model.network.table[unique[t]].T
                valid = ~idle[t]
                own = torch.eye(slots, scores.shape[1], dtype=torch.bool)
                if loss == "cross-entropy":
                    log_q = torch.cat([prep.log_q_target[targets[t]], prep.log_q_sample[samples[t]]])
                    idle_column = torch.cat([idle[t], idle[t].new_zeros(40)])[None]
                    scores = (scores - log_q).masked_fill(idle_column, -math.inf)
                    official = -torch.log_softmax(scores, dim=1)[own][valid].sum()
                    ours = torch.nn.functional.cross_entropy(unique_scores + weight[t], labels[t], reduction="sum")
                    ours = ours + offset[t]
                else:
                    scores = torch.nn.functional.elu(scores, 0.5)
                    negative = ~own & torch.cat([~idle[t], idle[t].new_ones(40)])[None]
                    weights = torch.softmax(scores.masked_fill(~negative, -math.inf), dim=1)
                    target = scores[own][:, None]
                    per_row = -torch.log((torch.sigmoid(target - scores) * weights).sum(1) + 1e-24)
                    official = (per_row + 0.5 * (scores.square() * weights).sum(1))[valid].sum()
                    ours = model._bpr_max_loss(torch.nn.functional.elu(unique_scores, 0.5), labels[t], weight[t])
                torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-4)


def test_session_parallel_schedule_visits_every_transition_once():
    data = planted(40, seed=5)
    positions, resets = session_parallel_schedule(data, batch_size=8)
    used = positions[positions >= 0]
    session_of = np.repeat(np.arange(data.n_sessions), data.lengths())
    expected = np.flatnonzero(np.diff(session_of, append=-1) == 0)  # events followed by one of their session
    assert sorted(used.tolist()) == expected.tolist()
    starts = set(data.offsets[:-1].tolist())
    assert all((positions[resets] >= 0)) and set(positions[resets].tolist()) == starts
    continuing = ~resets[1:] & (positions[1:] >= 0)
    assert (positions[1:][continuing] == positions[:-1][continuing] + 1).all()


def test_sasrec_windows_cover_every_target_once():
    data = planted(30, seed=6, max_length=30)
    starts, lengths = training_windows(data, max_len=7)
    assert lengths.max() <= 8 and lengths.min() >= 2
    targets = np.concatenate([np.arange(s + 1, s + n) for s, n in zip(starts, lengths)])
    session_of = np.repeat(np.arange(data.n_sessions), data.lengths())
    expected = np.flatnonzero(np.diff(session_of, prepend=-1) == 0)  # events preceded by one of their session
    assert sorted(targets.tolist()) == expected.tolist()


def test_registry_builds_the_neural_models_with_overrides():
    model = create_model("gru4rec", layers=[64], batch_size=32)
    assert isinstance(model, GRU4Rec) and model.config.layers == (64,) and model.params()["batch_size"] == 32
    assert isinstance(create_model("sasrec"), SASRec)
    with pytest.raises(ValueError, match="constrained_embedding"):
        GRU4RecConfig(constrained_embedding=False)
    with pytest.raises(ValueError, match="multiple of heads"):
        SASRecConfig(hidden=30, heads=4)


def test_bad_training_input_gets_a_clear_error(splits):
    single = SessionData(
        session_ids=np.array(["a", "b"], dtype=object),
        offsets=np.array([0, 1, 2]),
        items=np.array([0, 1]),
        times=np.array([0.0, 1.0]),
        n_items=N_ITEMS,
    )
    with pytest.raises(TrainingError, match="no session of two or more events"):
        GRU4Rec(SMALL["gru4rec"]).fit(single)
    other_catalogue = dataclasses.replace(splits[1], n_items=N_ITEMS + 1)
    with pytest.raises(TrainingError, match="same ItemIndex"):
        SASRec(SMALL["sasrec"]).fit(splits[0], other_catalogue)
    with pytest.raises(TrainingError, match="not fitted"):
        SASRec(SMALL["sasrec"]).score(prefixes_of(splits[2], 5))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            GRU4Rec(dataclasses.replace(SMALL["gru4rec"], device="cuda")).fit(planted(20, seed=9))


def test_tune_returns_the_best_trials_config(splits):
    train, valid, _ = splits
    seen = []
    base = dataclasses.replace(SMALL["sasrec"], max_epochs=2)
    best = tune("sasrec", train, valid, n_trials=2, base=base, on_trial=lambda *trial: seen.append(trial))
    assert isinstance(best, SASRecConfig) and len(seen) == 2
    best_trial = max(seen, key=lambda trial: trial[1])
    assert best.hidden == best_trial[2]["hidden"] and best.max_epochs == 2 and not best.progress
    with pytest.raises(TrainingError, match="not a neural model"):
        tune("pop", train, valid, n_trials=1)
