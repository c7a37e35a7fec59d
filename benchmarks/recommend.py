"""Benchmark the recommend stage's retrieval: exact vs faiss, and ANN recall.

Usage (from the repository root)::

    python benchmarks/recommend.py [--quick] [--items N] [--users U]

On a seeded clustered catalog of unit vectors (N items x D=384, 1M by default; quick:
100k) and users with s=2 unit interests near catalog items, each with 50 history items
excluded, top-100:

* ``users_per_s``: :func:`hymirec_udfs.recommend.retrieval.exact_topk` (the stage's
  default: the evaluation scorer, max over interests, history excluded, plus the
  retrieving interest), single process, all cores.
* ``faiss_flat_users_per_s`` / ``speedup_vs_faiss``: faiss ``IndexFlatIP`` on the same
  vectors (exact), searching each interest's ``100 + 50`` best and merging by max per item
  and excluding history in numpy -- the same lists, measured in the same run.
* ``ann_recall_at_100``: the stage's ``retrieval=ann`` (:class:`AnnIndex`, IVF-Flat at its
  default nlist/nprobe) against the exact lists; ``ann_users_per_s`` and its build time.
* ``ann_sweep``: recall@100 and users/s of the same index at nprobe = nlist/256 ..
  nlist/4, and ``ann_min_nprobe_for_0_95``, the smallest nprobe reaching recall 0.95 (what
  the default ``recommend.ann_nprobe`` rule is set from).

Writes ``benchmarks/results/recommend.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results", "recommend.json")
K, HISTORY, DIM, S = 100, 50, 384, 2


def make_data(n: int, users: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1024, DIM)).astype(np.float32)
    items = np.empty((n, DIM), np.float32)
    for lo in range(0, n, 131072):  # blocks: no second N x D temporary
        hi = min(lo + 131072, n)
        block = centers[rng.integers(0, 1024, hi - lo)] + 0.5 * rng.standard_normal((hi - lo, DIM)).astype(np.float32)
        items[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    anchors = items[rng.integers(0, n, (users, S))]
    interests = anchors + 0.3 * rng.standard_normal(anchors.shape).astype(np.float32)
    interests /= np.linalg.norm(interests, axis=2, keepdims=True)
    history = [rng.choice(n, HISTORY, replace=False) for _ in range(users)]
    return items, interests.astype(np.float32), history


def faiss_flat_topk(index: Any, interests: np.ndarray, exclude: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Exact lists from IndexFlatIP: each interest's k + |history| best, max-merged per item."""
    users, s, dim = interests.shape
    width = k + max(len(e) for e in exclude)
    scores, rows = index.search(interests.reshape(-1, dim), width)
    rows, scores = rows.reshape(users, s * width), scores.reshape(users, s * width)
    out = np.full((users, k), -1, np.int64)
    for u in range(users):
        keep = ~np.isin(rows[u], exclude[u])
        r, sc = rows[u][keep], scores[u][keep]
        order = np.argsort(-sc, kind="stable")
        r = r[order]
        _, first = np.unique(r, return_index=True)
        out[u] = r[np.sort(first)[:k]]
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    import faiss
    import torch

    from hymirec_udfs.recommend.retrieval import AnnIndex, exact_topk

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k items, 300 users (about a minute on 2 cores)")
    parser.add_argument("--items", type=int, default=0)
    parser.add_argument("--users", type=int, default=0)
    args = parser.parse_args(argv)
    n = args.items or (100_000 if args.quick else 1_000_000)
    users = args.users or (300 if args.quick else 1000)
    items, interests, history = make_data(n, users)
    torch.set_num_threads(os.cpu_count() or 1)
    faiss.omp_set_num_threads(os.cpu_count() or 1)

    exact_topk(interests[:8], items, K, history[:8])  # warm-up
    t0 = time.perf_counter()
    exact, _, _ = exact_topk(interests, items, K, history)
    exact_s = time.perf_counter() - t0

    flat = faiss.IndexFlatIP(DIM)
    flat.add(items)
    faiss_flat_topk(flat, interests[:8], history[:8], K)
    t0 = time.perf_counter()
    flat_lists = faiss_flat_topk(flat, interests, history, K)
    flat_s = time.perf_counter() - t0
    agree = np.mean([len(set(a) & set(b)) / K for a, b in zip(exact, flat_lists)])

    t0 = time.perf_counter()
    ann = AnnIndex(items)
    build_s = time.perf_counter() - t0
    ann.topk(interests[:8], K, history[:8])
    t0 = time.perf_counter()
    approx, _, _ = ann.topk(interests, K, history)
    ann_s = time.perf_counter() - t0
    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(approx, exact)]))
    sweep = []
    for divisor in (256, 128, 64, 32, 16, 8, 4):
        probe = max(1, ann.nlist // divisor)
        ann.index.nprobe = probe
        t0 = time.perf_counter()
        lists, _, _ = ann.topk(interests, K, history)
        took = time.perf_counter() - t0
        sweep.append({"nprobe": probe, "recall_at_100": float(np.mean([len(set(a) & set(b)) / K
                                                                       for a, b in zip(lists, exact)])),
                      "users_per_s": users / took})
        print(f"nprobe {probe:5d}  recall@100 {sweep[-1]['recall_at_100']:.4f}  users/s {users / took:.1f}", flush=True)
    ann.index.nprobe = ann.nprobe
    enough = [p["nprobe"] for p in sweep if p["recall_at_100"] >= 0.95]

    result = {
        "date": dt.date.today().isoformat(), "items": n, "users": users, "dim": DIM, "interests": S, "k": K,
        "history_excluded": HISTORY, "users_per_s": users / exact_s, "faiss_flat_users_per_s": users / flat_s,
        "speedup_vs_faiss": flat_s / exact_s, "exact_vs_faiss_list_agreement": float(agree),
        "ann_recall_at_100": recall, "ann_users_per_s": users / ann_s, "ann_build_s": build_s,
        "ann_nlist": ann.nlist, "ann_nprobe": ann.nprobe, "ann_sweep": sweep,
        "ann_min_nprobe_for_0_95": min(enough) if enough else None,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()}, "quick": args.quick,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(result, fh, indent=2)
    for key in ("users_per_s", "faiss_flat_users_per_s", "speedup_vs_faiss", "exact_vs_faiss_list_agreement",
                "ann_recall_at_100", "ann_users_per_s", "ann_build_s", "ann_nlist", "ann_nprobe"):
        print(f"{key:32s} {result[key]:.4g}")
    return result


if __name__ == "__main__":
    main()
