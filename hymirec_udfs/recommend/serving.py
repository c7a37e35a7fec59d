"""What serving computes, shared by the ``recommend`` stage and the MLflow pyfunc: the item
index (ranking vectors of a catalog under a model), an executor's mapped view of it, and
the scoring of a batch of users (interests, then top-K from the index).

Costs at 10M items x 2048-d: the index is 80 GB of float32 on disk, written one chunk of
:data:`INDEX_CHUNK` rows at a time and memory-mapped (copy-on-write) by each worker;
exact scoring streams it in ``recommend.chunk_items`` chunks per batch of users.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from hymirec_udfs.core.choices import Retrieval
from hymirec_udfs.core.config import Config

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

INDEX_CHUNK = 65536
_WORKER_CACHE: dict[str, Any] = {}


def write_item_index(loaded: Any, catalog: Any, directory: Path, *, retrieval: str, nlist: int, nprobe: int,
                     meta: dict[str, Any]) -> Path:
    """Today's item index for a model: ranking vectors of every catalog item, ids, meta,
    and (ANN) the faiss index. Written under ``<directory>.partial`` and renamed; reused
    when complete. Memory: one chunk of :data:`INDEX_CHUNK` rows."""
    import shutil

    import torch
    from numpy.lib.format import open_memmap

    from hymirec_udfs.recommend.retrieval import AnnIndex

    if (directory / "meta.json").is_file():
        return directory
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    n, dim = catalog.n_items, catalog.dim
    vectors = open_memmap(partial / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    model = loaded.model
    with torch.inference_mode():
        for lo in range(0, n, INDEX_CHUNK):
            hi = min(lo + INDEX_CHUNK, n)
            content = torch.from_numpy(np.asarray(catalog.embeddings[1 + lo : 1 + hi], dtype=np.float32))
            known = np.maximum(loaded.store.lookup(catalog.item_ids[lo:hi]), 0)
            vectors[lo:hi] = model.ranking_vectors(content, torch.from_numpy(known)).numpy()
    vectors.flush()
    try:  # the catalog's ids, in the index's row order: a hard link, no copy
        os.link(Path(catalog.path) / "item_ids.arrow", partial / "item_ids.arrow")
    except OSError:
        shutil.copy2(Path(catalog.path) / "item_ids.arrow", partial / "item_ids.arrow")
    if retrieval == Retrieval.ANN:
        AnnIndex(vectors, nlist=nlist, nprobe=nprobe).save(str(partial / "ann.faiss"))
    del vectors
    (partial / "meta.json").write_text(json.dumps({**meta, "n_items": n, "dim": dim, "retrieval": retrieval},
                                                  indent=2, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)
    return directory


class ItemIndex:
    """An executor's view of the item index: mapped vectors, ids, lookup, faiss index."""

    def __init__(self, directory: str, nprobe: int) -> None:
        import pandas as pd
        import pyarrow as pa

        root = Path(directory)
        self.vectors = np.load(root / "vectors.npy", mmap_mode="c")  # copy-on-write: torch views it, no copy
        with pa.memory_map(str(root / "item_ids.arrow")) as source:
            self.ids = np.asarray(pa.ipc.open_file(source).read_all().column(0).to_pylist(), dtype=object)
        self.position = pd.Index(self.ids)
        self.ann = None
        if (root / "ann.faiss").is_file():
            from hymirec_udfs.recommend.retrieval import AnnIndex

            self.ann = AnnIndex.load(str(root / "ann.faiss"), nprobe=nprobe)

    def rows(self, ids: list[str]) -> np.ndarray:
        found = self.position.get_indexer(np.asarray(ids, dtype=object))
        return np.unique(found[found >= 0])


def _worker(checkpoint: str, index_dir: str, nprobe: int, store_path: Optional[str] = None
            ) -> tuple[Any, ItemIndex]:
    from hymirec_udfs.evaluation.offline import _load_model

    if index_dir not in _WORKER_CACHE:
        _WORKER_CACHE.clear()  # one index per worker: an older date's is dropped
        _WORKER_CACHE[index_dir] = ItemIndex(index_dir, nprobe)
    return _load_model(checkpoint, store_path), _WORKER_CACHE[index_dir]


def score_batch(loaded: Any, index: ItemIndex, users: list[str], histories: list[list[str]], cfg: Config
                ) -> "pd.DataFrame":
    """Interests and top-K of a batch of users (one output row per user).

    History items the model does not know (added after it was trained) are left out of
    its input (counted in ``unknown_history``); a user with none left gets no rows
    (``skipped`` = True), never interests computed from nothing.
    """
    import pandas as pd
    import torch

    from hymirec_udfs.core.devices import auto_device
    from hymirec_udfs.recommend.retrieval import exact_topk

    rc = cfg.recommend
    store, model = loaded.store, loaded.model
    known_rows, unknown = [], []
    for history in histories:
        idx = store.lookup(list(history))
        unknown.append(int((idx <= 0).sum()))
        known_rows.append(idx[idx > 0])
    keep = np.array([len(r) > 0 for r in known_rows], dtype=bool)

    def pad(rows: list[np.ndarray], width: int) -> torch.Tensor:
        out = np.zeros((len(rows), max(1, width)), dtype=np.int64)
        for i, r in enumerate(rows):
            r = r[-width:]
            out[i, out.shape[1] - len(r):] = r
        return torch.from_numpy(out)

    live = [r for r, k in zip(known_rows, keep) if k]
    interests = np.zeros((0, 1, index.vectors.shape[1]), np.float32)
    if live:
        with torch.inference_mode():
            out = [model(pad(live[i:i + rc.batch_users], loaded.max_long), pad(live[i:i + rc.batch_users],
                                                                                  loaded.max_recent))
                   for i in range(0, len(live), rc.batch_users)]
        interests = torch.cat(out).float().numpy()
    live_hist = [h for h, k in zip(histories, keep) if k]
    exclude = [index.rows(list(h)) for h in live_hist] if rc.exclude_history else None
    if len(live) == 0:
        rows_idx = np.zeros((0, rc.top_k), np.int64)
        scores = np.zeros((0, rc.top_k), np.float32)
        which = np.zeros((0, rc.top_k), np.int32)
    elif index.ann is not None:
        rows_idx, scores, which = index.ann.topk(interests, rc.top_k, exclude, per_interest_quota=rc.per_interest_quota)
    else:
        rows_idx, scores, which = exact_topk(interests, index.vectors, rc.top_k, exclude,
                                             per_interest_quota=rc.per_interest_quota, chunk_items=rc.chunk_items,
                                             device=auto_device("auto"))
    records = []
    live_pos = 0
    for user, ok, n_unknown in zip(users, keep, unknown):
        if not ok:
            records.append((user, None, None, None, None, n_unknown, True))
            continue
        valid = rows_idx[live_pos] >= 0
        records.append((user, [v.tolist() for v in interests[live_pos]],
                        index.ids[rows_idx[live_pos][valid]].tolist(), scores[live_pos][valid].tolist(),
                        which[live_pos][valid].tolist(), n_unknown, False))
        live_pos += 1
    return pd.DataFrame.from_records(records, columns=["user_id", "interests", "items", "scores", "which",
                                                       "unknown_history", "skipped"])
