"""GPU figures for the paper-scale plan, in one run on one CUDA GPU.

Usage (from the repository root, on a machine with CUDA; no Spark, MLflow or Delta needed)::

    python benchmarks/gpu.py [--quick] [--out DIR]

Each part calls the package's own code on the GPU and is timed after a warm-up:

* ``embed_*``: forward-only bf16 throughput of a TinyLlama-1.1B-shaped ``LlamaModel``
  (random weights, SDPA attention) over synthetic catalog items in token-budget batches
  with mean pooling (:func:`benchmarks.embed.bench_gpu`): real tokens/s and MFU =
  ``2 x non-embedding params x tokens/s / 989 TFLOP/s`` (dense bf16 peak of H100/H200).
* ``codebook_*``: :func:`hymirec_udfs.codebook.residual.fit_residual_codebook` on
  ``N x D`` unit vectors (default 1M x 2048: a mixture of 4,096 directions plus noise,
  generated on the GPU), the base profile's 3 x 256 balanced cosine layers, 20 iterations,
  then :func:`~hymirec_udfs.codebook.residual.encode` of the whole catalog: wall seconds,
  items/s and mean reconstruction cosine.
* ``topk_*``: :func:`hymirec_udfs.evaluation.scoring.topk_items` (the exact chunked scorer
  of ``evaluate``/``recommend``) with ``device="cuda"``: users with 4 interests against
  the 1M x 2048 catalog, top-100, 50 history items excluded per user: users/s; a 64-user
  slice is checked against the CPU path (``topk_cpu_agreement``).
* ``train_*``: a TinyLlama-1.1B-shaped HyMiRec training step (bf16 autocast, AdamW) on one
  GPU (:func:`benchmarks.train.gpu_bench`): samples/s, LLM tokens/s and MFU.

Every part is run even when another fails (its error is recorded). Results go to
``benchmarks/results/gpu.json`` (and ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for path in (REPO_ROOT, BENCH_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

RESULTS_PATH = os.path.join(BENCH_DIR, "results", "gpu.json")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_catalog(n: int, d: int, seed: int, device: str) -> torch.Tensor:
    """``n x d`` unit rows: 4,096 random directions, each item one of them plus noise."""
    gen = torch.Generator(device=device).manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(4096, d, generator=gen, device=device), dim=1)
    pick = torch.randint(0, 4096, (n,), generator=gen, device=device)
    x = centers[pick] + 0.5 * torch.randn(n, d, generator=gen, device=device) / d**0.5
    return torch.nn.functional.normalize(x, dim=1)


def bench_codebook(n: int, d: int, ks: Sequence[int], iters: int, device: str) -> Dict[str, Any]:
    from hymirec_udfs.codebook.residual import decode, encode, fit_residual_codebook

    x = synthetic_catalog(n, d, 0, device)
    fit_residual_codebook(x[:20000], [8, 8], iters=2, device=device)  # warm-up: kernels
    _sync(device)
    t0 = time.perf_counter()
    book, report = fit_residual_codebook(x, ks, iters=iters, seed=0, device=device)
    _sync(device)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes, coefs, _ = encode(book, x, device=device)
    _sync(device)
    encode_s = time.perf_counter() - t0
    sample = np.random.default_rng(0).choice(n, min(n, 100_000), replace=False)
    rec = decode(book, codes[sample], coefs[sample])
    ref = x[torch.from_numpy(sample).to(device)].float().cpu().numpy()
    rec = rec / np.maximum(np.linalg.norm(rec, axis=1, keepdims=True), 1e-12)
    return {
        "codebook_items": n,
        "codebook_dim": d,
        "codebook_ks": list(ks),
        "codebook_iters": iters,
        "codebook_fit_s": fit_s,
        "codebook_encode_s": encode_s,
        "codebook_encode_items_per_s": n / encode_s,
        "codebook_recon_cos_mean": float((rec * ref).sum(1).mean()),
        "codebook_max_cluster_over_mean_l1": report.layers[0].max_cluster_over_mean,
        "codebook_peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }


def bench_topk(n: int, d: int, users: int, interests: int, k: int, device: str) -> Dict[str, Any]:
    from hymirec_udfs.evaluation.scoring import topk_items

    items = synthetic_catalog(n, d, 1, device).cpu()
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((users, interests, d)).astype(np.float32)
    exclude = [rng.choice(n, 50, replace=False) for _ in range(users)]
    topk_items(queries[:256], items, k, exclude[:256], device=device)  # warm-up + catalog copy
    _sync(device)
    t0 = time.perf_counter()
    idx, score = topk_items(queries, items, k, exclude, device=device)
    _sync(device)
    seconds = time.perf_counter() - t0
    check = 64
    ref_idx, ref_score = topk_items(queries[:check], items, k, exclude[:check])
    return {
        "topk_items": n,
        "topk_dim": d,
        "topk_users": users,
        "topk_interests": interests,
        "topk_k": k,
        "topk_seconds": seconds,
        "topk_users_per_s": users / seconds,
        "topk_user_item_pairs_per_s": users * n / seconds,
        "topk_cpu_agreement": float((idx[:check] == ref_idx).mean()),
        "topk_cpu_max_score_diff": float(np.abs(score[:check] - ref_score).max()),
    }


def bench_embed(n_items: int, device: str) -> Dict[str, Any]:
    import embed

    sizes = embed.Sizes(n_items=0, n_speedup_items=0, n_warmup_items=0, n_gpu_items=n_items)
    if device == "cpu":  # the --quick check on a CPU: a tiny Llama in float32
        tiny = dict(embed.TINYLLAMA_SHAPE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128)
        out = embed.bench_gpu(sizes, device="cpu", dtype=torch.float32, shape=tiny)
    else:
        out = embed.bench_gpu(sizes)
    return {f"embed_{k}": v for k, v in out.items()}


def bench_train(steps: int, device: str) -> Dict[str, Any]:
    import train

    from hymirec_udfs.core.config import load_config

    store = train.make_item_store()
    with tempfile.TemporaryDirectory() as tmp:
        files, _ = train.write_sequences(Path(tmp), load_config(["local"]).sequences)
        tiny = None if device == "cuda" else {"llm_hidden": 64, "llm_layers": 2, "llm_heads": 4,
                                              "llm_kv_heads": 2, "llm_intermediate": 128}
        out = train.gpu_bench(store, files, steps, device_name=device, sizes=tiny)
    return {f"train_{k.removeprefix('gpu_')}": v for k, v in out.items()}


def run_part(name: str, fn: Callable[[], Dict[str, Any]], results: Dict[str, Any]) -> None:
    print(f">> {name}", flush=True)
    t0 = time.perf_counter()
    try:
        results.update(fn())
    except Exception as exc:  # noqa: BLE001 - one part's failure must not lose the others
        traceback.print_exc()
        results[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    results[f"{name}_wall_s"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps({k: v for k, v in results.items() if k.startswith(name)}, indent=1, default=str), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (also runs on CPU, for checking)")
    parser.add_argument("--out", default="", help="also write gpu.json into this folder")
    parser.add_argument("--parts", default="embed,codebook,topk,train", help="comma-separated parts")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        parser.error("no CUDA GPU: only --quick runs on CPU")
    results: Dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
    }
    parts = set(args.parts.split(","))
    if "embed" in parts:
        run_part("embed", lambda: bench_embed(500 if args.quick else 40_000, device), results)
    if "codebook" in parts:
        n, d, ks = (5000, 64, [16, 16, 16]) if args.quick else (1_000_000, 2048, [256, 256, 256])
        run_part("codebook", lambda: bench_codebook(n, d, ks, 3 if args.quick else 20, device), results)
    if "topk" in parts:
        n, d, users = (5000, 64, 300) if args.quick else (1_000_000, 2048, 20_000)
        run_part("topk", lambda: bench_topk(n, d, users, 4, 100, device), results)
    if "train" in parts:
        run_part("train", lambda: bench_train(4 if args.quick else 40, device), results)
    for target in filter(None, [RESULTS_PATH, os.path.join(args.out, "gpu.json") if args.out else ""]):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
