"""Benchmark exact full-catalog evaluation against a faiss ``IndexFlatIP`` baseline.

Usage (from the repository root)::

    python benchmarks/evaluate.py [--quick]

Both sides answer the same question on the same vectors: the exact top-K (K = 200)
catalog items per user, score ``max_j cos(r_j, e_i)`` over s = 2 interests, the user's
history excluded.

* ours: :func:`hymirec_udfs.evaluation.scoring.topk_items` (chunked torch matmul + topk), and, for
  reference, :func:`hymirec_udfs.evaluation.scoring.rank_targets` (the exact rank of a target,
  which is what the metrics need and which faiss cannot give beyond its K).
* faiss: ``IndexFlatIP`` exact search of every interest with ``k = K + max_history``,
  then a vectorised merge by max and history filter. ``K + max_history`` per interest is
  enough for exactness: an item in the merged top-K has fewer than K non-excluded items
  above it, and at most ``max_history`` excluded ones, under its own best interest.

The two top-K lists are compared on a sample of users, and peak resident memory for a
1M-item catalog is measured in fresh subprocesses (``/proc``-free: ``getrusage``).
Results go to ``benchmarks/results/evaluate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

RESULTS_PATH = os.path.join(REPO_ROOT, "benchmarks", "results", "evaluate.json")
GB = 1024.0**3


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run.

    Attributes:
        n_items: catalog size of the throughput comparison.
        dim: embedding dimension D.
        n_users: users timed per repeat.
        n_interests: interests per user (s), merged by max.
        k: top-K list length.
        max_history: longest excluded history; lengths are uniform in [1, max_history].
        repeats: timed repeats per method (the best and the median are reported).
        check_users: users whose top-K lists are compared between the methods.
        rss_items: catalog size of the peak-memory measurement.
        rss_users: users scored in the peak-memory measurement.
        seed: RNG seed.
    """

    n_items: int
    dim: int
    n_users: int
    n_interests: int
    k: int
    max_history: int
    repeats: int
    check_users: int
    rss_items: int
    rss_users: int
    seed: int = 0


FULL = BenchConfig(
    n_items=100_000,
    dim=384,
    n_users=5_000,
    n_interests=2,
    k=200,
    max_history=50,
    repeats=3,
    check_users=500,
    rss_items=1_000_000,
    rss_users=1_024,
)
QUICK = BenchConfig(
    n_items=20_000,
    dim=384,
    n_users=1_000,
    n_interests=2,
    k=200,
    max_history=50,
    repeats=2,
    check_users=200,
    rss_items=1_000_000,
    rss_users=256,
)


# ---------------------------------------------------------------------------- data


def make_data(
    cfg: BenchConfig, n_items: int, n_users: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[np.ndarray]]:
    """Synthetic unit-norm catalog, interests, targets and histories.

    Interests are noisy copies of the target item so target ranks are realistic (a few
    to a few thousand) rather than uniform over the catalog; that matters for
    :func:`rank_targets`, whose float64 re-checks scale with the items scoring close to
    the target.

    Args:
        cfg: benchmark sizes.
        n_items: catalog size.
        n_users: number of users.

    Returns:
        ``(items (N, D), interests (U, s, D), targets (U,), histories)``.
    """
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    # Filled block by block in place: a one-shot randn + normalise would hold two
    # copies of the catalog and dominate the peak-memory measurement.
    items = np.empty((n_items, cfg.dim), dtype=np.float32)
    block = 1 << 16
    for lo in range(0, n_items, block):
        view = torch.from_numpy(items[lo : lo + block])
        view.copy_(torch.randn(view.shape, generator=gen))
        view.div_(torch.linalg.vector_norm(view, dim=1, keepdim=True))
    rng = np.random.default_rng(cfg.seed)
    targets = rng.integers(0, n_items, n_users)
    noise = torch.randn(n_users, cfg.n_interests, cfg.dim, generator=gen).numpy()
    interests = items[targets][:, None, :] * np.float32(0.3) + noise / np.sqrt(cfg.dim)
    interests /= np.linalg.norm(interests, axis=-1, keepdims=True)
    lengths = rng.integers(1, cfg.max_history + 1, n_users)
    histories = [rng.choice(n_items, size=n, replace=False) for n in lengths]
    return items, interests.astype(np.float32), targets, histories


# -------------------------------------------------------------------------- methods


def ours_topk(
    items: np.ndarray, interests: np.ndarray, histories: List[np.ndarray], k: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-K with :func:`hymirec_udfs.evaluation.scoring.topk_items` (default chunks)."""
    from hymirec_udfs.evaluation.scoring import topk_items

    return topk_items(interests, items, k, histories, merge="max")


def ours_rank(
    items: np.ndarray,
    interests: np.ndarray,
    targets: np.ndarray,
    histories: List[np.ndarray],
) -> np.ndarray:
    """Exact target ranks with :func:`hymirec_udfs.evaluation.scoring.rank_targets`."""
    from hymirec_udfs.evaluation.scoring import rank_targets

    return rank_targets(interests, items, targets, histories, merge="max")


def faiss_index(items: np.ndarray) -> "object":
    """Exact inner-product index over the (already unit-norm) catalog."""
    import faiss

    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    return index


def faiss_topk(
    index: "object",
    n_items: int,
    interests: np.ndarray,
    histories: List[np.ndarray],
    k: int,
    max_history: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-K by faiss search per interest, then max-merge and history filter.

    Args:
        index: a faiss ``IndexFlatIP`` over the catalog.
        n_items: catalog size.
        interests: ``(U, s, D)`` unit-norm interests.
        histories: per user, excluded catalog indices (at most ``max_history``).
        k: list length.
        max_history: longest history, so each interest retrieves ``k + max_history``.

    Returns:
        ``(indices (U, k), scores (U, k))`` sorted by descending score, padded with -1.
    """
    n_users, n_interests, dim = interests.shape
    depth = min(k + max_history, n_items)
    scores, idx = index.search(
        np.ascontiguousarray(interests.reshape(-1, dim)), depth
    )
    scores = scores.reshape(n_users, n_interests * depth)
    idx = idx.reshape(n_users, n_interests * depth).astype(np.int64)
    valid = idx >= 0
    user_col = np.repeat(np.arange(n_users, dtype=np.int64), n_interests * depth)
    keys = user_col * n_items + idx.reshape(-1)
    hist_keys = np.concatenate(
        [u * n_items + np.asarray(h, dtype=np.int64) for u, h in enumerate(histories)]
    )
    flat_scores = scores.reshape(-1).copy()
    flat_scores[~valid.reshape(-1)] = -np.inf
    flat_scores[np.isin(keys, hist_keys)] = -np.inf
    # One entry per (user, item): keep the best interest's score (the max merge).
    order = np.lexsort((-flat_scores, keys))
    dup = np.zeros(order.size, dtype=bool)
    dup[1:] = keys[order[1:]] == keys[order[:-1]]
    flat_scores[order[dup]] = -np.inf
    merged = flat_scores.reshape(n_users, -1)
    top = np.argpartition(-merged, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(merged, top, axis=1)
    sort = np.argsort(-top_scores, axis=1, kind="stable")
    top = np.take_along_axis(top, sort, axis=1)
    top_scores = np.take_along_axis(top_scores, sort, axis=1)
    top_idx = np.take_along_axis(idx, top, axis=1)
    top_idx[np.isneginf(top_scores)] = -1
    return top_idx, top_scores.astype(np.float32)


# -------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], object]) -> Tuple[float, float, object]:
    """Wall-clock and process CPU seconds of one call, and its result.

    CPU seconds are reported next to wall time because the benchmark host may be
    shared: wall time then includes waiting for cores, CPU time mostly does not.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def compare_topk(
    ours: Tuple[np.ndarray, np.ndarray], theirs: Tuple[np.ndarray, np.ndarray]
) -> Dict[str, float]:
    """How far two top-K answers agree.

    Lists may legitimately differ only by items whose scores tie (within float32
    rounding) at the K-th position, so mismatches are reported with the largest score
    gap they involve.

    Args:
        ours: ``(indices, scores)`` of one method.
        theirs: ``(indices, scores)`` of the other.

    Returns:
        ``identical_sets`` (fraction of users with equal top-K sets),
        ``identical_order`` (equal lists), ``max_mismatch_score_gap`` and
        ``max_score_abs_diff`` (positionwise, same-order users).
    """
    ours_idx, ours_scores = ours
    their_idx, their_scores = theirs
    same_sets = 0
    same_order = 0
    gap = 0.0
    for row in range(ours_idx.shape[0]):
        a, b = set(ours_idx[row].tolist()), set(their_idx[row].tolist())
        if a == b:
            same_sets += 1
        else:
            kth = float(min(ours_scores[row][-1], their_scores[row][-1]))
            only = (a ^ b) - {-1}
            row_scores = dict(zip(ours_idx[row].tolist(), ours_scores[row].tolist()))
            row_scores.update(zip(their_idx[row].tolist(), their_scores[row].tolist()))
            gap = max(gap, max(abs(row_scores[i] - kth) for i in only))
        same_order += int(np.array_equal(ours_idx[row], their_idx[row]))
    finite = np.isfinite(ours_scores) & np.isfinite(their_scores)
    return {
        "identical_sets": same_sets / ours_idx.shape[0],
        "identical_order": same_order / ours_idx.shape[0],
        "max_mismatch_score_gap": gap,
        "max_score_abs_diff": float(np.abs(ours_scores - their_scores)[finite].max()),
    }


def peak_rss_child(method: str, cfg: BenchConfig) -> Dict[str, float]:
    """Run one method on a ``rss_items`` catalog in a fresh process; its peak RSS."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        method,
        "--child-config",
        json.dumps(asdict(cfg)),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(method: str, cfg: BenchConfig) -> None:
    """Subprocess body of :func:`peak_rss_child`: prints one JSON line."""
    import torch

    threads = available_cores()
    torch.set_num_threads(threads)
    items, interests, targets, histories = make_data(cfg, cfg.rss_items, cfg.rss_users)
    catalog_rss = _max_rss_gb()
    start = time.perf_counter()
    if method == "ours":
        ours_topk(items, interests, histories, cfg.k)
        ours_rank(items, interests, targets, histories)
    elif method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss_index(items)
        faiss_topk(index, items.shape[0], interests, histories, cfg.k, cfg.max_history)
    else:
        raise ValueError(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    peak = _max_rss_gb()
    print(
        json.dumps(
            {
                "peak_rss_gb": peak,
                "rss_after_data_gb": catalog_rss,
                "overhead_gb": peak - catalog_rss,
                "catalog_gb": items.nbytes / GB,
                "seconds": seconds,
            }
        )
    )


def _max_rss_gb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 / GB


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------- main


def run(cfg: BenchConfig, mode: str) -> Dict[str, object]:
    """Run the comparison and return the result record."""
    import faiss
    import torch

    threads = available_cores()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    load_start = os.getloadavg()[0]
    items, interests, targets, histories = make_data(cfg, cfg.n_items, cfg.n_users)

    start = time.perf_counter()
    index = faiss_index(items)
    faiss_build_s = time.perf_counter() - start

    # Warm both code paths once (thread pools, allocator) before timing.
    warm = slice(0, min(64, cfg.n_users))
    ours_topk(items, interests[warm], histories[warm], cfg.k)
    faiss_topk(
        index, cfg.n_items, interests[warm], histories[warm], cfg.k, cfg.max_history
    )

    # Interleave the methods so background load on a shared host hits both alike.
    wall: Dict[str, List[float]] = {"ours": [], "faiss": [], "rank": []}
    cpu: Dict[str, List[float]] = {"ours": [], "faiss": [], "rank": []}
    calls: Dict[str, Callable[[], object]] = {
        "ours": lambda: ours_topk(items, interests, histories, cfg.k),
        "faiss": lambda: faiss_topk(
            index, cfg.n_items, interests, histories, cfg.k, cfg.max_history
        ),
        "rank": lambda: ours_rank(items, interests, targets, histories),
    }
    outputs: Dict[str, object] = {}
    for _ in range(cfg.repeats):
        for name, call in calls.items():
            wall_s, cpu_s, outputs[name] = timed(call)
            wall[name].append(wall_s)
            cpu[name].append(cpu_s)
    ours_out, faiss_out, ranks = outputs["ours"], outputs["faiss"], outputs["rank"]
    ours_times, faiss_times, rank_times = wall["ours"], wall["faiss"], wall["rank"]

    sample = slice(0, min(cfg.check_users, cfg.n_users))
    agreement = compare_topk(
        (ours_out[0][sample], ours_out[1][sample]),
        (faiss_out[0][sample], faiss_out[1][sample]),
    )
    # Ranks and lists are separate code paths: a target at list position p must have
    # rank p + 1 (up to ties at float32 rounding).
    pos = np.full(cfg.n_users, -1)
    hit_u, hit_p = np.nonzero(ours_out[0] == targets[:, None])
    pos[hit_u] = hit_p
    in_list = pos >= 0
    rank_agreement = (
        float(np.mean(ranks[in_list] == pos[in_list] + 1)) if in_list.any() else 1.0
    )
    hits_beyond = int(np.sum((~in_list) & (ranks <= cfg.k)))

    ours_best, faiss_best = min(ours_times), min(faiss_times)
    rss_ours = peak_rss_child("ours", cfg)
    rss_faiss = peak_rss_child("faiss", cfg)

    return {
        "mode": mode,
        "users_per_s": cfg.n_users / ours_best,
        "speedup_vs_faiss": faiss_best / ours_best,
        "peak_rss_gb_1m_items": rss_ours["peak_rss_gb"],
        "machine": {
            "cores": threads,
            "gpu": None,
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "faiss": faiss.__version__,
        },
        "config": asdict(cfg),
        "topk_users_per_s": {
            "ours": cfg.n_users / ours_best,
            "faiss": cfg.n_users / faiss_best,
        },
        "topk_seconds": {"ours": ours_times, "faiss": faiss_times},
        "topk_cpu_seconds": {"ours": cpu["ours"], "faiss": cpu["faiss"]},
        "speedup_vs_faiss_cpu_time": min(cpu["faiss"]) / min(cpu["ours"]),
        "load_average_1m_start_end": [load_start, os.getloadavg()[0]],
        "speedup_vs_faiss_median": float(
            np.median(faiss_times) / np.median(ours_times)
        ),
        "rank_targets_users_per_s": cfg.n_users / min(rank_times),
        "rank_targets_seconds": rank_times,
        "faiss_index_build_s": faiss_build_s,
        "topk_agreement": agreement,
        "rank_vs_topk_position_agreement": rank_agreement,
        "targets_ranked_within_k_but_missing_from_list": hits_beyond,
        "peak_rss_1m_items": {"ours": rss_ours, "faiss": rss_faiss},
        "rss_items": cfg.rss_items,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(result: Dict[str, object]) -> None:
    """Human-readable summary of :func:`run`'s record."""
    cfg = result["config"]
    tk = result["topk_users_per_s"]
    rss = result["peak_rss_1m_items"]
    agree = result["topk_agreement"]
    print(
        f"\nexact top-{cfg['k']}, N={cfg['n_items']:,} items, D={cfg['dim']}, "
        f"U={cfg['n_users']:,} users, s={cfg['n_interests']} (max merge), history <= "
        f"{cfg['max_history']}, {result['machine']['cores']} cores [{result['mode']}]"
    )
    rows = [
        ("method", "users/s (best)", "seconds (all repeats)", "peak RSS 1M items GB"),
        (
            "ours topk_items",
            f"{tk['ours']:.0f}",
            " ".join(f"{t:.2f}" for t in result["topk_seconds"]["ours"]),
            _rss_cell(rss["ours"]),
        ),
        (
            "faiss IndexFlatIP",
            f"{tk['faiss']:.0f}",
            " ".join(f"{t:.2f}" for t in result["topk_seconds"]["faiss"]),
            _rss_cell(rss["faiss"]),
        ),
        (
            "ours rank_targets",
            f"{result['rank_targets_users_per_s']:.0f}",
            " ".join(f"{t:.2f}" for t in result["rank_targets_seconds"]),
            "",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"speedup vs faiss: {result['speedup_vs_faiss']:.2f}x best wall, "
        f"{result['speedup_vs_faiss_median']:.2f}x median wall, "
        f"{result['speedup_vs_faiss_cpu_time']:.2f}x CPU time; load average "
        f"{result['load_average_1m_start_end'][0]:.1f} -> "
        f"{result['load_average_1m_start_end'][1]:.1f}; "
        f"1M-item catalog alone: {rss['ours']['catalog_gb']:.2f} GB"
    )
    print(
        f"top-K agreement on {cfg['check_users']} users: sets "
        f"{agree['identical_sets']:.4f}, order {agree['identical_order']:.4f}, "
        f"max |score diff| {agree['max_score_abs_diff']:.2e}; rank vs list position "
        f"{result['rank_vs_topk_position_agreement']:.4f}"
    )


def _rss_cell(record: Dict[str, float]) -> str:
    return f"{record['peak_rss_gb']:.2f} (+{record['overhead_gb']:.2f} over data)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 3 min)")
    parser.add_argument("--out", default=RESULTS_PATH, help="JSON result path")
    parser.add_argument("--child", choices=["ours", "faiss"], help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child_main(args.child, BenchConfig(**json.loads(args.child_config)))
        return 0

    mode = "quick" if args.quick else "full"
    cfg = QUICK if args.quick else FULL
    start = time.perf_counter()
    result = run(cfg, mode)
    result["total_seconds"] = time.perf_counter() - start
    print_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.out} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
