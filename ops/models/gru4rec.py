"""GRU4Rec (Hidasi et al., ICLR 2016 / CIKM 2018) with the training details of the official implementation
(github.com/hidasib/GRU4Rec_PyTorch_Official), whose absence costs third-party ports most of their accuracy:

* session-parallel mini-batches: each of the ``batch_size`` slots walks through one session at a time (sessions
  ordered by start time); a slot whose session ends takes the next session and its hidden state is reset;
  gradients flow through one step only (the hidden state is carried, detached);
* the loss scores each slot's target against the other slots' targets and ``n_sample`` extra negatives drawn
  in proportion to ``popularity ** sample_alpha`` (shared by the batch); cross-entropy with logQ correction
  (``logq``) or BPR-max with score regularisation (``bpreg``);
* constrained embedding: the input embedding *is* the output embedding (plus a per-item output bias);
* dropout on the input embedding and on the hidden state (the dropped-out state is what is carried on);
* Adagrad with momentum (the official ``IndexedAdagradM``): item rows are updated only when they occur in the
  step (as inputs, targets or samples), so an item's accumulators are untouched while it is absent;
* Glorot-uniform initialisation per gate, zero biases (the official "compatibility mode", its default).

Speed (the official code trains at ~2.3k events/s on a 2-core CPU): everything per step that does not depend on
the weights -- the session-parallel schedule, negative samples, the unique item rows of each step and their
positions, the logQ terms -- is computed ahead, in vectorised chunks on the device; the step itself gathers the
rows it needs from one table, runs one GRU step and one matrix product, and writes the updated rows back.

The final activation (``final_act``) is strictly increasing, so it never changes a ranking: `score` returns the
pre-activation logits ``[h, 1] @ [W, b].T``, which is exactly what serving's inner-product index computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from sessionrec.ops.device import autocast, to_device
from sessionrec.ops.sessiondata import SessionData
from sessionrec.ops.training import EpochMeter, NeuralSessionModel, TrainConfig

if TYPE_CHECKING:
    import optuna
    import torch

#: Steps whose negative samples and row indices are prepared in one vectorised batch.
_CHUNK_STEPS = 128
#: Score-matrix elements held at once during validation (bounds memory for large catalogues).
_SCORE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class GRU4RecConfig(TrainConfig):
    """The official tuned rsc15 setting (paramfiles/rsc15_xe_shared_100_best.py: cross-entropy, constrained
    embedding, one layer of 100, dropout 0/0.4, Adagrad lr 0.2 with momentum 0.2, negatives with alpha 0.5,
    logQ 1.0, 10 epochs) except two values chosen on the validation day of the YOOCHOOSE 100k slice (never on
    its test day), for CPU speed: ``batch_size`` 128 instead of 32 (per-step overhead dominates on a CPU, so
    an epoch took ~3 s instead of ~5 s at 64 and ~10 s at 32, for the same best validation MRR@20, 0.341 at 64
    and 128) and ``n_sample`` 1024 instead of 2048 (the output layer's cost halves; best validation MRR@20
    0.349 vs 0.341 at batch 128). ``cuda_batch_size`` is the batch on a GPU, where a step is bound by kernel
    launches, not by its rows: on an H100 with 10M generated events, 4096 trained 1.60M events/s and 2048
    0.82M, with the same best validation MRR@20 (0.503 and 0.504)."""

    loss: Literal["cross-entropy", "bpr-max"] = "cross-entropy"
    layers: tuple[int, ...] = (100,)
    constrained_embedding: bool = True
    embedding: int = 0  # input embedding size when not constrained
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.4
    learning_rate: float = 0.2
    momentum: float = 0.2
    n_sample: int = 1024
    sample_alpha: float = 0.5
    logq: float = 1.0  # cross-entropy only
    bpreg: float = 0.0  # bpr-max only
    final_act: Literal["linear", "elu", "tanh"] = "linear"
    elu_param: float = 0.5
    adagrad_eps: float = 1e-6
    max_epochs: int = 10
    patience: int = 2
    batch_size: int = 128
    cuda_batch_size: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"layers must be one or more positive sizes, got {self.layers}")
        if not self.constrained_embedding and self.embedding < 1:
            raise ValueError(
                "without constrained_embedding an input embedding size is needed: set embedding > 0 "
                "(or constrained_embedding=True, the tuned default)"
            )
        for name in ("dropout_p_embed", "dropout_p_hidden"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.n_sample < 0 or self.sample_alpha < 0 or self.logq < 0 or self.bpreg < 0:
            raise ValueError("n_sample, sample_alpha, logq and bpreg must be >= 0")
        if self.adagrad_eps <= 0 or self.elu_param <= 0:
            raise ValueError("adagrad_eps and elu_param must be positive")


def session_parallel_schedule(data: SessionData, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The official session-parallel order as arrays: ``positions[t, slot]`` is the event index of the input
    of step ``t`` (its target is the next event), -1 for a slot with nothing left to do at the end of the
    epoch; ``resets[t, slot]`` marks a slot starting a new session at step ``t``. Sessions of length >= 2 are
    taken in order of their first event's time; a freed slot takes the next one (lowest slot first)."""
    lengths = data.lengths()
    sessions = np.flatnonzero(lengths >= 2)
    starts = data.offsets[sessions]
    order = np.argsort(data.times[starts], kind="stable")
    starts, ends = starts[order], starts[order] + lengths[sessions][order]
    slots = min(batch_size, len(starts))
    pos, end = starts[:slots].copy(), ends[:slots].copy()
    active, reset = np.ones(slots, dtype=bool), np.ones(slots, dtype=bool)
    next_session = slots
    positions, resets = [], []
    while active.any():
        positions.append(np.where(active, pos, -1))
        resets.append(reset)
        pos = pos + 1
        done = np.flatnonzero(active & (pos >= end - 1))
        reset = np.zeros(slots, dtype=bool)
        if len(done):
            take = min(len(done), len(starts) - next_session)
            refill = done[:take]
            pos[refill] = starts[next_session : next_session + take]
            end[refill] = ends[next_session : next_session + take]
            reset[refill] = True
            next_session += take
            active[done[take:]] = False
    return np.stack(positions), np.stack(resets)


def _row_unique(ids: "torch.Tensor", pad: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per row of ``ids`` (values in ``[0, pad)``): the distinct values, padded with ``pad`` to
    ``min(row width, pad)`` columns, and each element's position among them. Fixed shapes and no host
    synchronisation, unlike ``torch.unique`` per step."""
    import torch

    ordered, order = ids.sort(dim=1)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = new.cumsum(dim=1) - 1
    inverse = torch.empty_like(ids).scatter_(1, order, rank)
    unique = torch.full_like(ids, pad).scatter_(1, rank, ordered)  # equal values write equal entries
    return unique[:, : min(ids.shape[1], pad)], inverse  # at most `pad` distinct values: the rest is padding


def _network(n_items: int, cfg: GRU4RecConfig) -> "torch.nn.Module":
    import torch
    from torch import nn

    class GRU4RecNet(nn.Module):
        """One table of item rows ``[output embedding (H) | output bias (1) | input embedding (E, optional)]``
        plus a scratch row at index ``n_items`` (the padding of a step's unique rows), and the GRU layers."""

        def __init__(self) -> None:
            super().__init__()
            self.hidden = cfg.layers[-1]
            self.input_size = self.hidden if cfg.constrained_embedding else cfg.embedding
            own_input = 0 if cfg.constrained_embedding else cfg.embedding
            self.input_from = 0 if cfg.constrained_embedding else self.hidden + 1
            # Updated row-wise by AdagradMomentum, never by autograd: each step differentiates a gathered copy.
            self.table = nn.Parameter(torch.zeros(n_items + 1, self.hidden + 1 + own_input), requires_grad=False)
            sizes = (self.input_size, *cfg.layers)
            self.cells = nn.ModuleList(nn.GRUCell(sizes[i], sizes[i + 1]) for i in range(len(cfg.layers)))
            self._fused: list[nn.GRU] = []
            self._fused_for: tuple[int, ...] = ()
            with torch.no_grad():
                self.table[:n_items, : self.hidden].copy_(_glorot(n_items, self.hidden))
                if own_input:
                    self.table[:n_items, self.input_from :].copy_(_glorot(n_items, own_input))
                for cell in self.cells:
                    for weight, fan_in in ((cell.weight_ih, cell.input_size), (cell.weight_hh, cell.hidden_size)):
                        weight.copy_(torch.cat([_glorot(cell.hidden_size, fan_in) for _ in range(3)]))
                    cell.bias_ih.zero_()
                    cell.bias_hh.zero_()

        def inputs(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return rows.index_select(0, index)[:, self.input_from : self.input_from + self.input_size]

        def outputs(self, rows: torch.Tensor) -> torch.Tensor:
            """The ``[W | b]`` part of table rows."""
            return rows if rows.shape[1] == self.hidden + 1 else rows[:, : self.hidden + 1]

        def fused(self) -> list[nn.GRU]:
            """The cells as single-layer `nn.GRU`s that share their parameters: one fused pass over a whole packed
            batch per layer instead of a Python step per item. Kept while the cells' parameter storage is the same
            (training updates it in place; a move to another device replaces it, and they are built again)."""
            storage = tuple(p.data_ptr() for cell in self.cells for p in cell.parameters())
            if self._fused_for != storage:
                layers = []
                for cell in self.cells:
                    gru = nn.GRU(cell.input_size, cell.hidden_size, batch_first=True, device="meta")  # no init
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        setattr(gru, f"{name}_l0", getattr(cell, name))
                    layers.append(gru)
                self._fused, self._fused_for = layers, storage  # a plain list: not submodules, not in state_dict
            return self._fused

        def recur(self, x: torch.Tensor, hidden: list[torch.Tensor], dropout: float = 0.0) -> torch.Tensor:
            """One step of all layers; ``hidden`` is updated in place (with the dropped-out states)."""
            for i, cell in enumerate(self.cells):
                x = cell(x, hidden[i])
                if dropout:
                    x = nn.functional.dropout(x, dropout, training=True)
                hidden[i] = x
            return x

    return GRU4RecNet()


def _glorot(fan_out: int, fan_in: int) -> "torch.Tensor":
    import torch

    sigma = math.sqrt(6.0 / (fan_out + fan_in))
    return torch.rand(fan_out, fan_in) * (2 * sigma) - sigma


class AdagradMomentum:
    """The official ``IndexedAdagradM``: ``acc += g^2; mom = momentum * mom - lr * g / sqrt(acc + eps);
    p += mom``, applied to the dense GRU weights every step and to the item table row by row, for the rows a
    step touched only (their accumulators and momentum live beside them in one ``(rows, 2, width)`` tensor, so
    one gather and one scatter serve both)."""

    def __init__(self, table: "torch.Tensor", dense: list["torch.Tensor"], lr: float, momentum: float, eps: float):
        import torch

        self.table, self.dense = table, dense
        self.lr, self.momentum, self.eps = lr, momentum, eps
        self.state = {
            "table": torch.zeros(table.shape[0], 2, table.shape[1], device=table.device),
            "acc": [torch.zeros_like(p) for p in dense],
            "mom": [torch.zeros_like(p) for p in dense],
        }

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state["table"].copy_(state["table"])
        for key in ("acc", "mom"):
            for mine, saved in zip(self.state[key], state[key], strict=True):
                mine.copy_(saved)

    def step(self, rows: "torch.Tensor", row_grad: "torch.Tensor") -> None:
        import torch

        with torch.no_grad():
            state = self.state["table"].index_select(0, rows)
            acc, mom = state[:, 0], state[:, 1]
            acc.addcmul_(row_grad, row_grad)
            mom.mul_(self.momentum).addcdiv_(row_grad, (acc + self.eps).sqrt_(), value=-self.lr)
            self.state["table"].index_copy_(0, rows, state)
            self.table.index_add_(0, rows, mom)
            grads = [p.grad for p in self.dense]
            accs, moms = self.state["acc"], self.state["mom"]
            # torch's multi-tensor ops: four weight tensors updated in a handful of kernels (as torch.optim does)
            torch._foreach_addcmul_(accs, grads, grads)
            denom = torch._foreach_add(accs, self.eps)
            torch._foreach_sqrt_(denom)
            torch._foreach_mul_(moms, self.momentum)
            torch._foreach_addcdiv_(moms, grads, denom, value=-self.lr)
            torch._foreach_add_(self.dense, moms)
            for p in self.dense:
                p.grad = None


@dataclass
class _Prepared:
    positions: "torch.Tensor"  # (steps, slots) input event index, -1 idle
    keep: "torch.Tensor"  # (steps, slots, 1) 0.0 where the hidden state is reset before the step
    step_events: np.ndarray  # examples per step (host, for the meter)
    items: "torch.Tensor"  # event item indices, plus a trailing 0 so that position + 1 is always valid
    cdf: "torch.Tensor"  # cumulative sampling distribution (popularity ** alpha)
    log_q_target: "torch.Tensor"  # log popularity (logQ of the in-batch targets)
    log_q_sample: "torch.Tensor"  # log popularity ** alpha (logQ of the sampled negatives)


class GRU4Rec(NeuralSessionModel):
    """GRU4Rec; see the module docstring. Hyper-parameters: `GRU4RecConfig`."""

    name: ClassVar[str] = "gru4rec"
    config_class: ClassVar[type[GRU4RecConfig]] = GRU4RecConfig
    config: GRU4RecConfig

    @classmethod
    def search_space(cls, trial: "optuna.Trial") -> dict[str, Any]:
        return {
            "layers": (trial.suggest_categorical("hidden", [64, 100, 160, 256]),),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.5, log=True),
            "momentum": trial.suggest_float("momentum", 0.0, 0.6),
            "dropout_p_hidden": trial.suggest_float("dropout_p_hidden", 0.0, 0.6),
            "dropout_p_embed": trial.suggest_float("dropout_p_embed", 0.0, 0.5),
            "sample_alpha": trial.suggest_float("sample_alpha", 0.0, 1.0),
            "n_sample": trial.suggest_categorical("n_sample", [512, 1024, 2048]),
            "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128]),
        }

    # ------------------------------------------------------------------------------------------- training

    def _build(self, n_items: int) -> "torch.nn.Module":
        return _network(n_items, self.config)

    def _make_optimizer(self, network: "torch.nn.Module") -> AdagradMomentum:
        cfg = self.config
        return AdagradMomentum(
            network.table, list(network.cells.parameters()), cfg.learning_rate, cfg.momentum, cfg.adagrad_eps
        )

    def _prepare(self, train: SessionData) -> tuple[_Prepared, int]:
        positions, resets = session_parallel_schedule(train, self.effective_batch_size)
        popularity = np.bincount(train.items, minlength=train.n_items).astype(np.float64)
        weights = popularity**self.config.sample_alpha * (popularity > 0)
        cdf = np.cumsum(weights) / weights.sum()
        cdf[-1] = 1.0
        with np.errstate(divide="ignore"):
            log_q = np.log(popularity), np.log(weights)
        device = self.device
        prepared = _Prepared(
            positions=to_device(positions, device),
            keep=to_device((~resets).astype(np.float32)[:, :, None], device),
            step_events=(positions >= 0).sum(axis=1),
            items=to_device(np.append(train.items, 0), device),
            cdf=to_device(cdf.astype(np.float32), device),
            log_q_target=to_device(log_q[0].astype(np.float32), device),
            log_q_sample=to_device(log_q[1].astype(np.float32), device),
        )
        return prepared, int(prepared.step_events.sum())

    def _chunk(self, prep: _Prepared, lo: int, hi: int) -> tuple["torch.Tensor", ...]:
        """Everything steps ``lo:hi`` need besides the weights, for all steps at once.

        A step's output columns are the slots' targets followed by the shared samples, duplicates included (as
        in the official code). They are scored through the step's *unique* rows instead: a softmax over columns
        equals one over unique items whose logits carry ``log sum(exp(column term))`` of their columns (the
        column terms being -logQ, or 0, and -inf for an idle slot's target). So the step needs one gather of
        table rows and no per-column copy. Returns the unique rows, the input and target positions among them
        (target -100 when the slot is idle), the per-row column weight (log mass for cross-entropy, the column
        count for BPR-max) and the constant that turns the unique-row cross-entropy back into the official one.
        """
        import torch

        cfg, n = self.config, self.n_items
        positions = prep.positions[lo:hi]
        idle = positions < 0
        slots = positions.shape[1]
        inputs = prep.items[positions.clamp(min=0)]
        targets = prep.items[positions + 1].masked_fill(idle, 0)  # idle: position -1 + 1 = 0, any valid row
        draws = torch.rand(hi - lo, cfg.n_sample, device=positions.device)
        samples = torch.searchsorted(prep.cdf, draws, right=True).clamp_(max=n - 1)
        unique, inverse = _row_unique(torch.cat([inputs, targets, samples], dim=1), pad=n)
        input_at, column_at = inverse[:, :slots], inverse[:, slots:]
        if cfg.loss == "cross-entropy" and cfg.logq > 0:
            log_q = torch.cat([prep.log_q_target[targets], prep.log_q_sample[samples]], dim=1).double()
            terms = log_q.mul_(-cfg.logq)
        else:
            terms = torch.zeros(column_at.shape, dtype=torch.float64, device=positions.device)
        terms[:, :slots].masked_fill_(idle, -math.inf)
        mass = torch.zeros(unique.shape, dtype=torch.float64, device=positions.device)
        mass.scatter_add_(1, column_at, terms.exp())
        target_at = column_at[:, :slots]
        if cfg.loss == "cross-entropy":
            log_mass = mass.log()
            offset = (log_mass.gather(1, target_at) - terms[:, :slots]).masked_fill_(idle, 0.0).sum(dim=1)
            column_weight = log_mass.float()
        else:
            offset = torch.zeros(hi - lo, dtype=torch.float64, device=positions.device)
            column_weight = mass.float()  # exp(0) per valid column: the count
        return unique, input_at, target_at.masked_fill(idle, -100), column_weight, offset.float()

    def _train_epoch(self, prep: _Prepared, optimizer: AdagradMomentum, meter: EpochMeter) -> None:
        import torch

        cfg, net, device = self.config, self.network, self.device
        slots = prep.positions.shape[1]
        hidden = [torch.zeros(slots, size, device=device) for size in cfg.layers]
        ones = torch.ones(slots, 1, device=device)
        cross_entropy = cfg.loss == "cross-entropy"
        for lo in range(0, prep.positions.shape[0], _CHUNK_STEPS):
            hi = min(lo + _CHUNK_STEPS, prep.positions.shape[0])
            with torch.no_grad():
                unique, input_at, labels, column_weight, offset = self._chunk(prep, lo, hi)
            for t in range(hi - lo):
                keep = prep.keep[lo + t]
                hidden = [h * keep for h in hidden]
                rows = net.table.index_select(0, unique[t]).requires_grad_()
                with autocast(device):
                    x = net.inputs(rows, input_at[t])
                    if cfg.dropout_p_embed:
                        x = torch.nn.functional.dropout(x, cfg.dropout_p_embed, training=True)
                    session = torch.cat([net.recur(x, hidden, cfg.dropout_p_hidden), ones], dim=1)
                    if cross_entropy and cfg.final_act == "linear":
                        logits = torch.addmm(column_weight[t], session, net.outputs(rows).T)
                    else:
                        logits = self._activate(session @ net.outputs(rows).T)
                    if cross_entropy:
                        logits = logits if cfg.final_act == "linear" else logits + column_weight[t]
                        loss = torch.nn.functional.cross_entropy(logits.float(), labels[t], reduction="sum")
                    else:
                        loss = self._bpr_max_loss(logits.float(), labels[t], column_weight[t])
                (loss / slots).backward()
                optimizer.step(unique[t], rows.grad)
                hidden = [h.detach() for h in hidden]
                if not meter.step(loss + offset[t], int(prep.step_events[lo + t])):
                    return

    def _activate(self, scores: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self.config.final_act == "elu":
            return torch.nn.functional.elu(scores, self.config.elu_param)
        if self.config.final_act == "tanh":
            return torch.tanh(scores)
        return scores

    def _bpr_max_loss(
        self, scores: "torch.Tensor", labels: "torch.Tensor", counts: "torch.Tensor"
    ) -> "torch.Tensor":
        """BPR-max: ``-log sum_j softmax(r)_j sigmoid(r_target - r_j) + bpreg * sum_j softmax(r)_j r_j^2`` over
        the negative columns ``j`` (all but the row's own target column), on unique rows weighted by counts."""
        import torch

        valid = labels >= 0
        own = labels.clamp(min=0)[:, None]
        negatives = counts.expand_as(scores).scatter_add(1, own, -valid[:, None].to(counts.dtype))
        weights = torch.softmax(scores + negatives.log(), dim=1)
        target = scores.gather(1, own)
        ranking = torch.log((torch.sigmoid(target - scores) * weights).sum(dim=1) + 1e-24)
        regulariser = (scores.square() * weights).sum(dim=1)
        return ((-ranking + self.config.bpreg * regulariser) * valid).sum()

    # -------------------------------------------------------------------------------------------- scoring

    def _item_matrix(self) -> "torch.Tensor":
        return self.network.outputs(self.network.table[: self.n_items]).detach().float()

    def _padded(self, sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, "torch.Tensor"]:
        """Sequences sorted by decreasing length (order, lengths) and as a zero-padded matrix on the device."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        matrix = np.zeros((len(sequences), max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
        for row, index in enumerate(order):
            matrix[row, : lengths[index]] = sequences[index]
        return order, lengths[order], to_device(matrix, self.device)

    def _session_vectors(self, prefixes: list[np.ndarray]) -> "torch.Tensor":
        """The last hidden state of each prefix, from one fused GRU pass per layer over the packed batch (what the
        service calls per request batch: a Python loop over time steps cost ~10x more there). An empty prefix gets
        the zero state."""
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence

        net, device = self.network, self.device
        out = torch.zeros(len(prefixes), net.hidden + 1, device=device)
        out[:, -1] = 1.0
        order, lengths, matrix = self._padded(prefixes)
        running = int((lengths > 0).sum())  # sorted longest first: the empty prefixes are the last rows
        if running:
            steps = matrix.shape[1]
            x = net.inputs(net.table, matrix[:running].reshape(-1)).reshape(running, steps, net.input_size)
            sequence = pack_padded_sequence(x, torch.from_numpy(lengths[:running]), batch_first=True)
            for gru in net.fused():
                sequence, state = gru(sequence)
            out[to_device(order[:running], device), :-1] = state[-1]
        return out

    def _position_vectors(self, data: SessionData) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        import torch

        net, device = self.network, self.device
        sessions = [data.session(s)[0] for s in np.flatnonzero(data.lengths() >= 2)]
        per_batch = max(1, _SCORE_ELEMENTS // self.n_items)
        for lo in range(0, len(sessions), per_batch):
            _, lengths, matrix = self._padded(sessions[lo : lo + per_batch])
            hidden = [torch.zeros(len(lengths), size, device=device) for size in self.config.layers]
            for t in range(int(lengths.max()) - 1):
                with_target = int((lengths > t + 1).sum())
                hidden = [h[:with_target] for h in hidden]
                state = net.recur(net.inputs(net.table, matrix[:with_target, t]), hidden)
                vectors = torch.cat([state, torch.ones(with_target, 1, device=device)], dim=1)
                yield vectors, matrix[:with_target, t + 1]
