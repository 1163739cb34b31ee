"""Candidate retrieval over a neural model's item embeddings with FAISS.

A neural model's score is ``session_embedding @ item_embeddings.T`` (see `SessionModel.item_embeddings`), so the
top candidates are a maximum-inner-product search. Below ``ann_threshold`` items an exact flat index answers in
well under a millisecond; above it an HNSW graph does, its search breadth (``efSearch``) raised step by step until
recall@100 against the exact index reaches the target on the given session embeddings (the service uses
single-item sessions of popular items; benchmarks/serve_load.py checks replayed sessions). The recall reached is
kept on the index, so that `/readyz` and the benchmark report what the service actually runs with.

FAISS uses OpenMP threads per query by default; one query per request is faster single-threaded, and the service
runs many requests in parallel, so every ranking thread sets one thread (`single_threaded`; the setting belongs
to the thread that makes it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sessionrec.ops.errors import SessionrecError
from sessionrec.ops.models.base import Prefixes, SessionModel

#: HNSW graph degree and build breadth: standard values for d <= 256 (FAISS wiki, "Indexing 1M vectors").
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
#: Search breadths tried, smallest first; the first that meets the recall target is kept.
EF_SEARCH_STEPS = (64, 96, 128, 192, 256, 512, 1024, 2048)
RECALL_AT = 100
#: Single-item sessions of this many popular items are the queries the ANN index is tuned on.
ANN_TUNING_QUERIES = 256
#: Files of a saved index (`CandidateIndex.save`).
INDEX_FILE = "index.faiss"
META_FILE = "candidates.json"
#: The requirement is recall@100 >= 0.95 on real sessions. The service tunes on single-item sessions of popular
#: items, which are easier queries (GRU4Rec, 50k items: 0.962 on them, 0.9505 on replayed multi-item sessions at
#: the same efSearch), so it asks for a margin on them.
REQUIRED_RECALL = 0.95
DEFAULT_RECALL_TARGET = 0.97


@dataclass
class CandidateIndex:
    """The FAISS index of one model version plus the vectors, for exact re-scoring of merged candidates."""

    index: object  # faiss.Index
    vectors: np.ndarray  # float32 (n_items, d), C-contiguous
    kind: str  # "exact" or "hnsw"
    params: dict[str, int] = field(default_factory=dict)
    recall: float | None = None  # recall@RECALL_AT vs exact, measured when the ANN index was tuned

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` item indices and inner products per query row (``-1`` pads when fewer items exist)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self.index.search(queries, min(n, len(self.vectors)))  # type: ignore[attr-defined]
        return ids, scores

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "items": len(self.vectors), **self.params, "recall_at_100": self.recall}

    def save(self, directory: Path) -> None:
        """The index as FAISS writes it, and what it is. Logged with the model version it belongs to, so that every
        server process loads it instead of building it (HNSW over 50k items: ~20 s of CPU per process)."""
        import faiss

        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        meta = {"kind": self.kind, "params": self.params, "recall": self.recall, "shape": list(self.vectors.shape)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path, vectors: np.ndarray) -> "CandidateIndex":
        """The index saved in ``directory`` over ``vectors`` (the model's item embeddings, which it must match)."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        meta = json.loads((directory / META_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE))
        if tuple(meta["shape"]) != vectors.shape or (index.ntotal, index.d) != vectors.shape:
            raise SessionrecError(
                f"the candidate index in {directory} covers {index.ntotal} items of {index.d} dimensions, the model "
                f"has {vectors.shape[0]} of {vectors.shape[1]}: they come from different trainings"
            )
        if meta["kind"] == "hnsw":
            index.hnsw.efSearch = int(meta["params"]["efSearch"])
        return cls(index=index, vectors=vectors, kind=meta["kind"], params=meta["params"], recall=meta["recall"])


def single_threaded() -> None:
    import faiss

    faiss.omp_set_num_threads(1)


def exact_index(vectors: np.ndarray) -> CandidateIndex:
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return CandidateIndex(index=index, vectors=vectors, kind="exact")


def recall_at(ann: CandidateIndex, exact: CandidateIndex, queries: np.ndarray, n: int = RECALL_AT) -> float:
    """Share of the exact top-``n`` that the ANN index also returns, averaged over ``queries``."""
    truth, _ = exact.search(queries, n)
    found, _ = ann.search(queries, n)
    hits = [len(np.intersect1d(t[t >= 0], f[f >= 0])) / max((t >= 0).sum(), 1) for t, f in zip(truth, found)]
    return float(np.mean(hits)) if hits else 1.0


def hnsw_index(
    vectors: np.ndarray,
    queries: np.ndarray,
    target: float = DEFAULT_RECALL_TARGET,
    exact: CandidateIndex | None = None,
) -> CandidateIndex:
    """An HNSW index whose ``efSearch`` is the smallest step reaching ``target`` recall on ``queries``; the
    largest step when none does (its recall is recorded either way, so a shortfall is visible)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    exact = exact or exact_index(vectors)
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    ann = CandidateIndex(index=index, vectors=vectors, kind="hnsw")
    for ef in EF_SEARCH_STEPS:
        index.hnsw.efSearch = ef
        ann.params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": ef}
        ann.recall = recall_at(ann, exact, queries)
        if ann.recall >= target:
            break
    return ann


def index_kind(n_items: int, ann_threshold: int) -> str:
    return "exact" if n_items < ann_threshold else "hnsw"


def build_candidate_index(
    vectors: np.ndarray, ann_threshold: int, queries: np.ndarray, target: float = DEFAULT_RECALL_TARGET
) -> CandidateIndex:
    """Exact below ``ann_threshold`` items, HNSW tuned on ``queries`` (session embeddings) at or above it."""
    if index_kind(len(vectors), ann_threshold) == "exact":
        return exact_index(vectors)
    return hnsw_index(vectors, queries, target)


def model_candidate_index(model: SessionModel, popular: np.ndarray, ann_threshold: int) -> CandidateIndex | None:
    """The candidate index over ``model``'s item embeddings (None for a model without them), an ANN index tuned on
    single-item sessions of the most ``popular`` items (item indices, most popular first)."""
    vectors = model.item_embeddings()
    if vectors is None:
        return None
    probes = np.asarray(popular[:ANN_TUNING_QUERIES], dtype=np.int64)
    queries = model.session_embeddings(Prefixes([np.array([i]) for i in probes], np.full(len(probes), time.time())))
    return build_candidate_index(vectors, ann_threshold, np.asarray(queries))
